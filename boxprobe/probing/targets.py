r"""Probe targets: which token each target reads, its labels, the cells that count, and its lexical heuristic.

Definitions follow Tang et al. (PootieT/entity-tracking-mi, ``probe_experiments/src/dataset.py``):

- ``empty`` (``query_last``, "contains"): is the queried box empty? After "contains" the model only has to
  choose between " the" and " nothing", so this is what that token must carry.
- ``first_object`` (``answer_prefix`` k=0, the appended " the"; Tang's ``--condition_on the``, empty boxes
  dropped as their ``include_empty=False``): which object comes first in the answer. One multiclass probe
  over the object vocabulary, its argmax restricted to the objects the description mentions (candidates).
- ``kth_object`` (``answer_prefix`` k>=1, " ... and the", the objects before it teacher-forced; Tang's
  ``min_prev_objects``): the k-th answer object, candidates the mentioned objects not yet emitted.
- ``prior_k`` (``answer_prefix`` k=0): the queried box's contents before its k-th last operation
  (:func:`boxprobe.data.labels.local_prior`, Tang's ``get_prior_operations``), one binary output per object
  counted over mentioned objects, only where the box has >= k operations; scored on items whose prior state
  differs from the current one (elsewhere it re-measures the current contents).
- ``global_state`` (the description's last period, one item per context): for each mentioned object, which
  box holds it or none: one softmax per object (Tang's 8-way global probe), not one-vs-rest cells.
- ``mention`` (``answer_prefix`` k=0, the token ``first_object`` reads): for every object of the vocabulary,
  is it mentioned anywhere in the description? Tang's mention probe (``probe_experiments/src/dataset.py``,
  ``MentionedProbeDataLoader.load_examples``: ``re.findall(r'\bthe ([^\s,.\n]+)', <description>)``; trained by
  ``Mention_Trainer`` in ``src/probe_trainer.py``, which overwrites the contents labels with ``y = mentioned``),
  read at the query's ``--condition_on`` token like their contents probes, with empty boxes dropped as for
  ``first_object``. All objects count (their accuracy is over all 100 cells). It asks what a lexical lookup
  can read at the answer token: a model that only knows which objects occur passes it, so ``first_object``
  must do better than it tells.
- ``incremental`` (each operation's box label): the box's contents after that operation, counted over the
  objects mentioned up to and including that operation.

Every target carries an ``initial`` heuristic: what the first sentence alone says (the lookup a model that
does not track would do), in the same form as a probe's prediction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from boxprobe.data.positions import parse_description

TARGETS = ("empty", "first_object", "kth_object", "prior_1", "prior_2", "prior_3", "global_state", "incremental",
           "mention")
# Cached token role each target reads.
TARGET_ROLE = {"empty": "query_last", "first_object": "answer_prefix", "kth_object": "answer_prefix",
               "prior_1": "answer_prefix", "prior_2": "answer_prefix", "prior_3": "answer_prefix",
               "global_state": ("state_end", "op_end"), "incremental": "box_mention",
               "mention": "answer_prefix"}
# Token-level targets: the probed token's type is a meaningful Hewitt–Liang control key.
TOKEN_LEVEL = ("incremental",)


@dataclass
class Target:
    """One target on one cached item set.

    ``kind`` ``class``: ``y`` [n] class index into ``classes``, ``mask`` [n, C] candidates, ``initial`` [n]
    (-1: the first sentence gives no guess). ``multilabel``: ``y`` / ``mask`` / ``initial`` [n, V] bool, ``mask``
    the counted cells. ``blocks`` (one softmax per object): ``y`` / ``initial`` [n, V] class per object (box, or
    the last class: none), ``mask`` [n, V] counted objects.
    """

    name: str
    kind: str
    rows: np.ndarray  # into the role's cached rows (and ``features``)
    y: np.ndarray
    mask: np.ndarray
    initial: np.ndarray
    groups: np.ndarray  # sample_id: the cluster of the split and of the intervals
    numops: np.ndarray  # operations on the queried (or probed) box
    scored: np.ndarray  # [n] bool: the items a test score counts
    classes: tuple
    types: list | None = None  # Hewitt–Liang control key (token-level targets only)
    query_index: np.ndarray | None = None
    token_index: np.ndarray | None = None


def _index(vocab: Sequence[str]) -> dict[str, int]:
    return {o: i for i, o in enumerate(vocab)}


def _multi_hot(lists, vocab: Sequence[str]) -> np.ndarray:
    index, out = _index(vocab), np.zeros((len(lists), len(vocab)), bool)
    for i, objects in enumerate(lists):
        out[i, [index[o] for o in objects]] = True
    return out


def _base(meta: pd.DataFrame, keep: np.ndarray) -> dict:
    sub = meta[keep]
    return {"rows": np.flatnonzero(keep), "groups": sub["sample_id"].to_numpy(), "numops": sub["numops"].to_numpy(),
            "query_index": sub["query_index"].to_numpy(), "token_index": sub["token_index"].to_numpy()}


def empty_target(meta: pd.DataFrame) -> Target:
    keep = np.ones(len(meta), bool)
    y = meta["gold"].map(len).eq(0).to_numpy().astype(int)
    initial = meta["initial"].map(len).eq(0).to_numpy().astype(int)
    return Target("empty", "class", y=y, mask=np.ones((len(meta), 2), bool), initial=initial,
                  scored=keep, classes=("contents", "empty"), **_base(meta, keep))


def object_target(meta: pd.DataFrame, vocab: Sequence[str], k: str = "first") -> Target:
    """``first_object`` (k=0 rows) or ``kth_object`` (k>=1 rows) at the answer prefix."""
    index = _index(vocab)
    ks = meta["k"].astype(int).to_numpy()
    keep = ks == 0 if k == "first" else ks >= 1
    sub = meta[keep]
    y = np.array([index[o] for o in sub["object"]])
    mask = _multi_hot(sub["mentioned"], vocab)
    initial = np.full(len(sub), -1)
    for i, (kk, gold, init) in enumerate(zip(ks[keep], sub["gold"], sub["initial"])):
        mask[i, [index[o] for o in gold[:kk]]] = False  # already emitted (teacher-forced)
        if len(init) > kk and init[kk] not in gold[:kk]:
            initial[i] = index[init[kk]]
    name = "first_object" if k == "first" else "kth_object"
    return Target(name, "class", y=y, mask=mask, initial=initial, scored=np.ones(len(sub), bool),
                  classes=tuple(vocab), **_base(meta, keep))


def prior_target(meta: pd.DataFrame, vocab: Sequence[str], k: int) -> Target:
    column = f"prior_{k}"
    keep = (meta["k"].astype(int).to_numpy() == 0) & meta[column].map(lambda v: v is not None).to_numpy()
    sub = meta[keep]
    scored = np.array([sorted(p) != sorted(g) for p, g in zip(sub[column], sub["gold"])], bool)
    return Target(column, "multilabel", y=_multi_hot(sub[column], vocab), mask=_multi_hot(sub["mentioned"], vocab),
                  initial=_multi_hot(sub["initial"], vocab), scored=scored, classes=tuple(vocab), **_base(meta, keep))


def mention_target(meta: pd.DataFrame, vocab: Sequence[str]) -> Target:
    """Tang et al.'s mention probe (see the module docstring) at the first answer prefix (k=0 rows): y [n, V]
    is "object mentioned in the description", every cell counts; the heuristic is "mentioned in the first
    sentence" (objects that later operations bring in are what it misses)."""
    keep = meta["k"].astype(int).to_numpy() == 0
    sub = meta[keep]
    initial = [[o for box in state for o in box] for state in sub["initial_state"]]
    y = _multi_hot(sub["mentioned"], vocab)
    return Target("mention", "multilabel", y=y, mask=np.ones_like(y), initial=_multi_hot(initial, vocab),
                  scored=np.ones(len(sub), bool), classes=tuple(vocab), **_base(meta, keep))


def global_target(ends: pd.DataFrame, contexts: Sequence[str], vocab: Sequence[str]) -> Target:
    """At the description's last period (``ends``: state_end and op_end rows, the row order of the features),
    one item per context, since all queries of a context share that prefix."""
    order = ends.sort_values(["query_index", "op_index"], kind="stable")
    last = order.groupby("query_index").tail(1)
    last = last.assign(context=[contexts[q] for q in last["query_index"]]).drop_duplicates("context")
    keep = np.zeros(len(ends), bool)
    keep[last.index.to_numpy()] = True
    sub = ends[keep]  # row order of ``ends``
    index = _index(vocab)
    n_boxes = len(sub["state"].iloc[0])
    y = np.full((len(sub), len(vocab)), n_boxes)
    initial = np.full_like(y, n_boxes)
    mask = _multi_hot(sub["mentioned"], vocab)
    for i, (state, init) in enumerate(zip(sub["state"], sub["initial_state"])):
        for b, contents in enumerate(state):
            y[i, [index[o] for o in contents]] = b
        for b, contents in enumerate(init):
            initial[i, [index[o] for o in contents]] = b
    base = _base(ends, keep)
    base["numops"] = sub["num_operations"].to_numpy()
    return Target("global_state", "blocks", y=y, mask=mask, initial=initial, scored=np.ones(len(sub), bool),
                  classes=tuple(f"box {b}" for b in range(n_boxes)) + ("none",), **base)


def incremental_target(meta: pd.DataFrame, contexts: Sequence[str], vocab: Sequence[str]) -> Target:
    from boxprobe.data.labels import states_from_context

    ops = meta["op_index"].fillna(-1).astype(int).to_numpy()
    keep = ops >= 0
    sub = meta[keep].assign(context=[contexts[q] for q in meta.loc[keep, "query_index"]])
    # The queries of one context repeat its mentions: keep one row per (context, operation, mention, box).
    first = ~sub.duplicated(["context", "op_index", "mention", "box"]).to_numpy()
    keep[np.flatnonzero(keep)[~first]] = False
    sub = sub[first]
    after, seen, initial = [], [], []
    for c, op, b in zip(sub["context"], sub["op_index"].astype(int), sub["box"].astype(int)):
        states = states_from_context(c)
        after.append(states[op + 1][b])
        initial.append(states[0][b])
        # Objects named up to and including this operation: the ones the model could have bound so far.
        seen.append({m.object for m in parse_description(c) if m.kind == "object" and m.op_index <= op})
    base = _base(meta, keep)
    base["numops"] = sub["op_index"].astype(int).to_numpy() + 1
    return Target("incremental", "multilabel", y=_multi_hot(after, vocab), mask=_multi_hot(seen, vocab),
                  initial=_multi_hot(initial, vocab), scored=np.ones(len(sub), bool), classes=tuple(vocab),
                  types=list(sub["box"].astype(int)), **base)


def build_target(name: str, meta: dict[str, pd.DataFrame], contexts: Sequence[str],
                 vocab: Sequence[str]) -> tuple[Target, str | tuple]:
    """The target ``name`` on one cache's metadata (a frame per role); also the role(s) its features come from."""
    role = TARGET_ROLE[name]
    if name == "empty":
        return empty_target(meta[role]), role
    if name in ("first_object", "kth_object"):
        return object_target(meta[role], vocab, "first" if name == "first_object" else "kth"), role
    if name.startswith("prior_"):
        return prior_target(meta[role], vocab, int(name.rsplit("_", 1)[1])), role
    if name == "mention":
        return mention_target(meta[role], vocab), role
    if name == "global_state":
        ends = pd.concat([meta["state_end"], meta["op_end"]], ignore_index=True)
        return global_target(ends, contexts, vocab), role
    return incremental_target(meta[role], contexts, vocab), role


def mentioned_objects(text: str, vocab: Sequence[str]) -> set[str]:
    """Objects of ``vocab`` named in ``text`` (``the <object>``)."""
    return set(re.findall(r"\bthe (\w+)", text)) & set(vocab)

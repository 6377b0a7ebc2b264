"""What is true of a query: the states its description passes through, and its probe labels.

The states are replayed from the text itself (``positions.parse_description`` then
``task.apply_operation``), so labels come from the prompt a model saw, in any of the boxes phrasings,
and a data file whose gold answer disagrees with its own description is caught.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from boxprobe.data.positions import LABEL_RE, label_box, parse_description
from boxprobe.data.prompts import Query
from boxprobe.data.task import Operation, State, apply_operation
from boxprobe.errors import DataError


def states_from_context(context: str) -> list[State]:
    """Every state a description passes through: the initial state, then one after each operation.

    Parses the text (``positions.parse_description``) and replays its operations with
    ``task.apply_operation``, so it works for any file in the boxes phrasings.
    """
    mentions = parse_description(context)
    boxes = [m.box for m in mentions if m.kind == "box" and m.op_index == -1]
    states: list[State] = [tuple(tuple(sorted(m.object for m in mentions if m.kind == "object" and m.op_index == -1
                                              and m.box == b)) for b in range(len(boxes)))]
    n_ops = 1 + max((m.op_index for m in mentions), default=-1)
    for i in range(n_ops):
        named = {m.mention: m.box for m in mentions if m.kind == "box" and m.op_index == i}
        objects = tuple(sorted(m.object for m in mentions if m.kind == "object" and m.op_index == i))
        if "move_src" in named:
            src = named["move_src"]
            op = Operation("move", objects or states[-1][src], src, named["move_dest"], all_contents=not objects)
        else:
            kind = next(k for k in ("remove", "put") if k in named)
            op = Operation(kind, objects, named[kind])
        states.append(apply_operation(states[-1], op))
    return states


def box_operations(context: str, box: int) -> list[int]:
    """Indices of the operations whose sentence names ``box`` (as put/remove target, move source or destination)."""
    return sorted({m.op_index for m in parse_description(context) if m.kind == "box" and m.op_index >= 0
                   and m.box == box})


def local_prior(states: Sequence[State], operations: Sequence[int], box: int, k: int) -> tuple[str, ...] | None:
    """The contents of ``box`` before the k-th last operation that names it (None when fewer than k do).

    Follows Tang et al.'s ``ProbeDataLoader.get_prior_operations`` / ``back_track_box_content``
    (PootieT/entity-tracking-mi, ``probe_experiments/src/dataset.py``): backtrack over the operations
    that mention the queried box, not over the description's operations. ``states[i]`` is the state before
    operation ``i``, so the state before operation ``operations[-k]`` is ``states[operations[-k]]``.
    """
    if k < 1 or len(operations) < k:
        return None
    return states[operations[-k]][box]


@lru_cache(maxsize=4096)
def _context_facts(context: str) -> tuple[tuple[State, ...], tuple[str, ...], tuple[tuple[int, ...], ...]]:
    # Per-box queries share each description between all boxes: parse it once.
    mentions = parse_description(context)
    mentioned = dict.fromkeys(m.object for m in mentions if m.kind == "object")
    states = tuple(states_from_context(context))
    ops = tuple(tuple(box_operations(context, b)) for b in range(len(states[0])))
    return states, tuple(mentioned), ops


def query_labels(query: Query) -> dict:
    """Probe labels of a query: queried box, its gold contents, the full state, mentioned objects, the
    initial state (``initial_state``; ``initial``: the queried box's contents in the first sentence), the
    queried box's contents before its k-th last operation (``prior_k``, k = 1..3, over the operations that
    name the box: :func:`local_prior`; None where fewer than k do), and ``global_prior_k``, the queried box
    k operations earlier in the whole description (the older definition, kept to show the difference)."""
    ex = query.examples[0]
    states, mentioned, ops = _context_facts(ex.context)
    box = ex.box if ex.box is not None else label_box(LABEL_RE.search(ex.statement_prefix))
    state = states[-1]
    gold = sorted(re.findall(r"\bthe (\w+)", ex.gold))
    if gold != list(state[box]):
        raise DataError(f"sample_id {ex.sample_id}: the gold answer {ex.gold!r} of box {box} disagrees with the state "
                         f"replayed from its description ({list(state[box])}); the data file is inconsistent.")
    row = {"sample_id": ex.sample_id, "query_box": box, "numops": ex.numops,
           "num_operations": ex.num_operations if ex.num_operations is not None else len(states) - 1,
           "gold": gold, "state": [list(b) for b in state], "mentioned": list(mentioned),
           "initial": list(states[0][box]), "initial_state": [list(b) for b in states[0]],
           "box_ops": len(ops[box])}
    for k in (1, 2, 3):
        prior = local_prior(states, ops[box], box, k)
        row[f"prior_{k}"] = list(prior) if prior is not None else None
    for k in (1, 2, 3):
        row[f"global_prior_{k}"] = list(states[-1 - k][box]) if len(states) > k else None
    return row

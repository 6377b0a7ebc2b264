"""Probe experiments: how do models represent box states, layer by layer?

A :class:`ProbeExperiment` wires the stages — load each model, build prompts, cache activations at
semantic positions, fit layer-wise probes on a split by ``sample_id`` (hyperparameters chosen on
validation, never test), score them against controls, compare models — and writes tidy CSVs in
the dashboard's run layout::

    from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig
    cfg = ProbeExperimentConfig(models=("assets/models/toy-base", "assets/models/toy-code"),
                                data="data/boxes/test-subsample.jsonl", out_dir="runs/probes")
    run = ProbeExperiment(cfg).run()
    fig = run.plot_probe_accuracy()

Probe targets (``targets``):

- ``contents``: at the query's last token, for every object, is it in the queried box? Reported as
  exact-set, full (all objects) and non-trivial (objects mentioned in the context) accuracy.
- ``global_state``: at the query's last token, which box (or none) holds each mentioned object.
- ``prior_1`` .. ``prior_3``: the queried box's contents 1..3 operations earlier.
- ``incremental``: at each operation's box-label token, the contents of that box after it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from boxprobe.report import plots
from boxprobe.activations.cache import CacheConfig, build_cache, file_sha256
from boxprobe.config import ConfigError, check_choice, from_dict
from boxprobe.probing.interventions import object_directions_from_cache, probe_causal_check, summarize_causal_check
from boxprobe.data.labels import states_from_context
from boxprobe.data.queries import QuerySet, prepare, resolve_spec
from boxprobe.models.loading import load_model, model_id, model_info, model_n_layers
from boxprobe.pipeline.rundir import atomic_write_csv, atomic_write_text, claim_run_dir
from boxprobe.probing.metrics import (
    bootstrap_difference,
    contents_labels,
    contents_metrics,
    control_contents_labels,
    control_state_labels,
    majority_baseline,
    majority_state_baseline,
    mentioned_mask,
    split_by_group,
)
from boxprobe.data.positions import LABEL_RE, label_box
from boxprobe.probing.probes import LayerwiseMultiLabelProbe, check_Cs, select_C
from boxprobe.data.task import load_vocabulary, read_examples

logger = logging.getLogger(__name__)
TARGETS = ("contents", "global_state", "global_state_end", "prior_1", "prior_2", "prior_3", "incremental")
# Token roles each target reads, beyond the query's last token.
_TARGET_ROLES = {"incremental": ("box_mention",), "global_state_end": ("state_end", "op_end")}


@dataclass(frozen=True)
class ProbeExperimentConfig:
    """A probing study over one or more models on one data file."""

    models: tuple[str, ...]
    """Model names, hub ids or checkpoint directories; the first is the reference in comparisons."""
    data: str
    """A boxes JSONL file (e.g. the test subsample)."""
    out_dir: str = "runs/probes"
    """Where caches and result CSVs go."""
    hook: str = "resid_post"
    """Activation to probe, as :class:`boxprobe.cache.CacheConfig` names hooks (one group, all layers)."""
    targets: tuple[str, ...] = ("contents", "global_state", "prior_1")
    """Probe targets, from :data:`TARGETS`: the queried box's contents (``contents``), which box holds each
    mentioned object at the query token (``global_state``) or at the description's last period
    (``global_state_end``, one item per context), the queried box k operations earlier (``prior_k``), and a
    box's contents after each operation, at its label in that operation (``incremental``)."""
    limit: int | None = None
    """Use only the first N per-box queries."""
    template: str | None = None
    """Prompt template (a bundled name or a JSON file); None: the checkpoint's recorded template, else ``default``."""
    chat: bool | None = None
    """Wrap prompts in the tokenizer's chat template; None: as the checkpoint records, else no."""
    layers: tuple[int, ...] | None = None
    """Layers to cache and probe; None: every layer."""
    dtype: str = "float32"
    """Storage dtype of the activation cache."""
    batch_size: int = 32
    """Prompts per forward pass when caching."""
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0)
    """Inverse L2 strengths tried per layer (scikit-learn's C); the best on validation is used. Probes use
    inverse-frequency ("balanced") class weights, since most objects are absent from most boxes."""
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Train / validation / test fractions of sample_ids."""
    random_init: str = "first"
    """Random-init baseline: probe a re-initialised copy of the ``first`` model (enough when the models
    share an architecture), of ``all`` models, or ``none``."""
    n_boot: int = 1000
    """Bootstrap resamples for intervals and model differences."""
    seed: int = 0
    """Seed of splits, controls and bootstraps."""
    device: str | None = None
    """Model device; None picks cuda when available."""
    causal_check_layer: int | None = None
    """If set, the causal check of the contents probe at this layer: project the INLP directions of the most
    frequent answer object out of the query token's residual stream, against random directions of the
    same norm (see :mod:`boxprobe.probing.interventions`); writes ``causal_check.csv``."""

    def __post_init__(self) -> None:
        for target in self.targets:
            check_choice("target", target, TARGETS)
        check_choice("random_init", self.random_init, ("first", "all", "none"))
        if not self.models:
            raise ConfigError("ProbeExperimentConfig needs at least one model.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (or null for every query), got {self.limit}.")
        check_Cs(self.Cs)
        if len(self.split) != 3 or not all(math.isfinite(f) and f > 0 for f in self.split) \
                or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"split must be three fractions > 0 (train, validation, test) that sum to 1, "
                              f"got {list(self.split)}.")
        if self.n_boot < 1:
            raise ConfigError(f"n_boot must be >= 1, got {self.n_boot}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"layers must be block indices >= 0 (or null for every layer), got {self.layers}.")
        if self.causal_check_layer is not None:
            if self.causal_check_layer < 0:
                raise ConfigError(f"causal_check_layer must be >= 0, got {self.causal_check_layer}.")
            if self.layers is not None and self.causal_check_layer not in self.layers:
                raise ConfigError(f"causal_check_layer {self.causal_check_layer} is not among the cached layers "
                                  f"{list(self.layers)}; add it to layers.")

    def check_models(self) -> None:
        """Layer indices against each model's ``config.json`` (read without loading weights)."""
        asked = sorted({*(self.layers or ()), *(() if self.causal_check_layer is None else (self.causal_check_layer,))})
        for name in self.models:
            n = model_n_layers(name)
            if n is not None and asked and asked[-1] >= n:
                raise ConfigError(f"layer {asked[-1]} (layers / causal_check_layer) does not exist in model {name!r}, "
                                  f"which has layers 0..{n - 1} by its config.json.")

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeExperimentConfig":
        return from_dict(cls, data)


@dataclass
class ProbeRun:
    """Results of a probe experiment as tidy frames (also written as CSVs to ``out_dir``)."""

    out_dir: Path
    probe_accuracy: pd.DataFrame
    probe_heatmap: pd.DataFrame
    selectivity: pd.DataFrame
    model_difference: pd.DataFrame

    def plot_probe_accuracy(self, probe: str = "contents", metric: str = "non_trivial") -> go.Figure:
        df = self.probe_accuracy
        return plots.probe_accuracy_by_layer(df[(df.probe == probe) & (df.metric == metric)],
                                             title=f"{probe} probe, {metric} accuracy")

    def plot_heatmap(self, model: str, probe: str = "contents") -> go.Figure:
        df = self.probe_heatmap
        return plots.probe_heatmap(df[(df.model == model) & (df.probe == probe)])

    def plot_selectivity(self, probe: str = "contents") -> go.Figure:
        return plots.selectivity_by_layer(self.selectivity[self.selectivity.probe == probe])

    def plot_difference(self, probe: str = "contents") -> go.Figure:
        df = self.model_difference
        return plots.model_difference(df[df.probe == probe])


# -- targets: (X rows, labels, mask) from cached metadata ------------------------------------------


@dataclass
class _Target:
    rows: np.ndarray  # indices into the cached items
    Y: np.ndarray  # [n, outputs] bool
    mask: np.ndarray  # [n, outputs] bool: the cells that count ("non-trivial")
    groups: np.ndarray  # sample_id per row
    numops: np.ndarray
    query_types: list  # for the control task
    n_classes: int = 0  # > 0: outputs are (object, class) one-hot blocks scored by argmax


def _contents_target(meta: pd.DataFrame, column: str, vocab: Sequence[str]) -> _Target:
    keep = meta[column].map(lambda v: v is not None).to_numpy()
    sub = meta[keep]
    return _Target(np.flatnonzero(keep), contents_labels(sub[column], vocab), mentioned_mask(sub["mentioned"], vocab),
                   sub["sample_id"].to_numpy(), sub["numops"].to_numpy(), list(sub["query_box"]))


def _global_target(meta: pd.DataFrame, vocab: Sequence[str]) -> _Target:
    index = {o: i for i, o in enumerate(vocab)}
    n_boxes = len(meta["state"].iloc[0])
    n_classes = n_boxes + 1  # the last class: in no box
    Y = np.zeros((len(meta), len(vocab) * n_classes), bool)
    mask = np.zeros_like(Y)
    for i, (state, mentioned) in enumerate(zip(meta["state"], meta["mentioned"])):
        where = {o: b for b, contents in enumerate(state) for o in contents}
        for obj in mentioned:
            block = index[obj] * n_classes
            Y[i, block + where.get(obj, n_boxes)] = True
            mask[i, block:block + n_classes] = True
    return _Target(np.arange(len(meta)), Y, mask, meta["sample_id"].to_numpy(), meta["numops"].to_numpy(),
                   list(meta["query_box"]), n_classes)


def _global_end_target(ends: pd.DataFrame, contexts: Sequence[str], vocab: Sequence[str]) -> _Target:
    """Global state at the description's last period (``ends``: state_end and op_end rows), one item per
    context, since all queries of a context share that prefix."""
    last = ends.sort_values(["query_index", "op_index"], kind="stable").groupby("query_index").tail(1)
    last = last.assign(context=[contexts[q] for q in last["query_index"]]).drop_duplicates("context")
    target = _global_target(last.reset_index(drop=True), vocab)
    # No query has been read yet, so the control's lexical type is the box the last sentence names first.
    last_box = ["initial" if op < 0 else label_box(LABEL_RE.search(c.rstrip(". ").rsplit(". ", 1)[-1]))
                for op, c in zip(last["op_index"], last["context"])]
    return replace(target, rows=last.index.to_numpy(), numops=last["num_operations"].to_numpy(),
                   query_types=last_box)


def _incremental_target(meta: pd.DataFrame, contexts: Sequence[str], vocab: Sequence[str]) -> _Target:
    ops = meta[meta["op_index"].fillna(-1).astype(int) >= 0]
    # The queries of one context repeat its mentions: keep one row per (context, mention).
    ops = ops.assign(context=[contexts[q] for q in ops["query_index"]])
    ops = ops.drop_duplicates(["context", "op_index", "mention", "box"])
    after = [states_from_context(c)[int(op) + 1][int(b)] for c, op, b in zip(ops["context"], ops["op_index"], ops["box"])]
    mentioned = [set(re.findall(r"\bthe (\w+)", c)) & set(vocab) for c in ops["context"]]
    return _Target(ops.index.to_numpy(), contents_labels(after, vocab), mentioned_mask(mentioned, vocab),
                   ops["sample_id"].to_numpy(), ops["op_index"].to_numpy() + 1, list(ops["box"]))


def _cell_correct(pred: np.ndarray, target: _Target, idx: np.ndarray, proba: np.ndarray | None) -> np.ndarray:
    """Per item and layer: the share of counted cells (objects) predicted right."""
    Y, M = target.Y[idx], target.mask[idx]
    if target.n_classes:  # argmax within each object's block of classes
        n, L, _ = proba.shape
        blocks = proba.reshape(n, L, -1, target.n_classes)
        truth = Y.reshape(n, -1, target.n_classes).argmax(-1)
        counted = M.reshape(n, -1, target.n_classes).any(-1)
        right = (blocks.argmax(-1) == truth[:, None, :]) & counted[:, None, :]
        return right.sum(2) / np.maximum(counted.sum(1), 1)[:, None]
    right = (pred == Y[:, None, :]) & M[:, None, :]
    return right.sum(2) / np.maximum(M.sum(1), 1)[:, None]


class ProbeExperiment:
    """Runs the stages of a :class:`ProbeExperimentConfig`; see the module docstring."""

    def __init__(self, cfg: ProbeExperimentConfig, models: Sequence | None = None,
                 queries: Sequence[QuerySet | None] | None = None, overwrite: bool = False, repair: bool = False):
        """``models`` (optional): loaded models standing for ``cfg.models`` in order, each loaded once by the
        caller; ``queries`` (optional): a prepared query set per model (None entries are prepared here).
        ``overwrite`` replaces another run in ``cfg.out_dir``; ``repair`` rebuilds damaged caches."""
        self.cfg = cfg
        self.overwrite, self.repair = overwrite, repair
        self.out = Path(cfg.out_dir)
        self.vocab = load_vocabulary("objects")
        if models is not None and len(models) != len(cfg.models):
            raise ConfigError(f"{len(models)} loaded models given for {len(cfg.models)} configured models.")
        if queries is not None and len(queries) != len(cfg.models):
            raise ConfigError(f"{len(queries)} query sets given for {len(cfg.models)} configured models.")
        self.models, self.queries = models, queries

    def _model(self, i: int, random_init: bool):
        # A loaded model is used as given; its random-init twin is rebuilt from the same checkpoint.
        given = self.models[i] if self.models is not None else None
        if given is not None and not random_init:
            return given
        source = model_info(given).path_or_id if given is not None and model_info(given) else self.cfg.models[i]
        return load_model(source, device=self.cfg.device, random_init=random_init, seed=self.cfg.seed)

    def run(self) -> ProbeRun:
        """Check the config and data, claim ``out_dir`` (:mod:`boxprobe.pipeline.rundir`), all before any
        model loads; then run every stage."""
        cfg = self.cfg
        if self.models is None:
            cfg.check_models()
        examples = read_examples(cfg.data)
        # Settings that do not change results may differ between a run and its resumption.
        signature = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "device", "batch_size")}
        with claim_run_dir(self.out, "probe", signature, overwrite=self.overwrite):
            return self._run(examples)

    def _run(self, examples) -> ProbeRun:
        cfg = self.cfg
        accuracy, heat, correct_by, causal = [], [], {}, []
        self.names: list[str] = []
        self.layer_of: dict[str, dict[int, int]] = {}
        for i in range(len(cfg.models)):
            with_random = cfg.random_init == "all" or (cfg.random_init == "first" and i == 0)
            for random_init in [False] + ([True] if with_random else []):
                model = self._model(i, random_init)
                if not random_init:
                    self.names.append(model_id(model))
                label = self.names[-1]  # a random-init baseline is reported under the model it re-initialises
                given = self.queries[i] if self.queries is not None and not random_init else None
                cache_name = model_id(model) if random_init else label
                meta, X, contexts, reader, queries = self._cache(model, examples, cache_name, given)
                if cfg.causal_check_layer is not None and not random_init:
                    causal.append(self._causal_check(model, reader, queries, label))
                layer_of = self.layer_of[label] = dict(enumerate(reader.layers(cfg.hook)))  # slot -> layer number
                for target_name in cfg.targets:
                    acc, hm, correct, groups = self._probe(target_name, meta, X, contexts, label, random_init)
                    acc["layer"], hm["layer"] = acc["layer"].map(layer_of), hm["layer"].map(layer_of)
                    accuracy.append(acc)
                    heat.append(hm)
                    if not random_init:
                        correct_by[(label, target_name)] = (correct, groups)
                del model
        accuracy = pd.concat(accuracy, ignore_index=True)
        heat = pd.concat(heat, ignore_index=True)
        selectivity = self._selectivity(accuracy)
        difference = self._differences(correct_by)
        for frame, file in ((accuracy, "probe_accuracy.csv"), (heat, "probe_heatmap.csv"),
                            (selectivity, "selectivity.csv"), (difference, "model_difference.csv")):
            atomic_write_csv(frame, self.out / file)
        if causal:
            atomic_write_csv(pd.concat(causal, ignore_index=True), self.out / "causal_check.csv")
        atomic_write_text(self.out / "probe_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        return ProbeRun(self.out, accuracy, heat, selectivity, difference)

    def _cache(self, model, examples, label: str, queries: QuerySet | None):
        cfg = self.cfg
        if queries is None:
            queries = prepare(model, examples, resolve_spec(model, cfg.template, "per-box", cfg.chat), limit=cfg.limit)
        queries.check_model(model)
        roles = tuple(dict.fromkeys(("query_last", *(r for t in cfg.targets for r in _TARGET_ROLES.get(t, ())))))
        cache_cfg = CacheConfig(hooks=(cfg.hook,), roles=roles, dtype=cfg.dtype, batch_size=cfg.batch_size,
                                layers=cfg.layers)
        # Model ids are file-name safe and differ between checkpoints that share a directory name.
        reader = build_cache(model, queries, self.out / "cache" / label, cache_cfg, data_hash=file_sha256(cfg.data),
                             repair=self.repair)
        X = {role: reader.activations(cfg.hook, role).float().numpy() for role in roles}
        meta = {role: reader.metadata(role).reset_index(drop=True) for role in roles}
        return meta, X, [it.query.examples[0].context for it in queries], reader, queries

    def _causal_check(self, model, reader, queries, label: str) -> pd.DataFrame:
        """INLP directions of the most frequent answer object, fit on train sample_ids, ablated on test ones."""
        cfg = self.cfg
        meta = reader.metadata("query_last").reset_index(drop=True)
        train, _, test = split_by_group(meta["sample_id"].to_numpy(), cfg.split, seed=cfg.seed)
        in_train = pd.Series([o for gold in meta["gold"].iloc[train] for o in gold]).value_counts()
        in_test = pd.Series([o for gold in meta["gold"].iloc[test] for o in gold]).value_counts()
        both = pd.concat([in_train, in_test], axis=1, join="inner").min(axis=1).sort_values(ascending=False, kind="stable")
        if both.empty:
            logger.warning("causal check of %s skipped: no answer object occurs in both train and test items", label)
            return pd.DataFrame()
        obj = str(both.index[0])  # the object with the most examples on both sides of the split
        directions = object_directions_from_cache(reader, obj, cfg.causal_check_layer, hook=cfg.hook,
                                                  n_directions=2, items=train)
        chosen = [i for i in test if obj in meta["gold"].iloc[i]]
        checked = probe_causal_check(model, queries.select([int(meta["query_index"].iloc[i]) for i in chosen]),
                                     [obj] * len(chosen), directions, layer=cfg.causal_check_layer, seed=cfg.seed)
        return summarize_causal_check(checked).assign(model=label, object=obj, layer=cfg.causal_check_layer)

    def _probe(self, target_name: str, meta, X, contexts, label: str, random_init: bool):
        cfg = self.cfg
        if target_name == "incremental":
            target, feats = _incremental_target(meta["box_mention"], contexts, self.vocab), X["box_mention"]
        elif target_name == "global_state_end":
            ends = pd.concat([meta["state_end"], meta["op_end"]], ignore_index=True)
            target = _global_end_target(ends, contexts, self.vocab)
            feats = np.concatenate([X["state_end"], X["op_end"]])
        elif target_name == "global_state":
            target, feats = _global_target(meta["query_last"], self.vocab), X["query_last"]
        else:
            column = "gold" if target_name == "contents" else target_name
            target, feats = _contents_target(meta["query_last"], column, self.vocab), X["query_last"]
        feats = feats[target.rows]
        train, val, test = split_by_group(target.groups, cfg.split, seed=cfg.seed)
        chosen = select_C(feats[train], target.Y[train], feats[val], target.Y[val], list(cfg.Cs),
                          estimator=LayerwiseMultiLabelProbe(class_weight="balanced"), mask_train=target.mask[train],
                          mask_val=target.mask[val])
        probe = chosen.estimator
        proba = probe.predict_proba(feats[test]) if target.n_classes else None
        correct = _cell_correct(probe.predict(feats[test]), target, test, proba)
        kind = "random-init" if random_init else "task"
        model_name = label
        rows = [self._accuracy_rows(model_name, target_name, kind, correct, target.groups[test])]
        if not random_init:
            if target.n_classes:  # one class per object block, scored by argmax like the task
                control_Y = control_state_labels(target.query_types, target.Y, target.mask, target.n_classes,
                                                 seed=cfg.seed)
            else:
                control_Y = control_contents_labels(target.query_types, target.Y, target.mask, seed=cfg.seed)
            control = LayerwiseMultiLabelProbe(C=chosen.C, class_weight="balanced")
            control.fit(feats[train], control_Y[train], mask=target.mask[train])
            ctrl_target = _Target(target.rows, control_Y, target.mask, target.groups, target.numops,
                                  target.query_types, target.n_classes)
            ctrl_proba = control.predict_proba(feats[test]) if target.n_classes else None
            ctrl_correct = _cell_correct(control.predict(feats[test]), ctrl_target, test, ctrl_proba)
            rows.append(self._accuracy_rows(model_name, target_name, "control", ctrl_correct, target.groups[test]))
            if target.n_classes:
                majority = majority_state_baseline(target.Y[train], target.Y[test], target.mask[train],
                                                   target.mask[test], target.n_classes)
            else:
                majority = majority_baseline(target.Y[train], target.Y[test], target.mask[train], target.mask[test])
            rows.append(pd.DataFrame({"model": model_name, "probe": target_name, "metric": "non_trivial",
                                      "kind": "majority", "layer": np.arange(correct.shape[1]), "value": majority}))
        numops = target.numops[test]
        heat_label = label + (" (random init)" if random_init else "")
        heat = pd.DataFrame([{"model": heat_label, "probe": target_name, "layer": layer, "numops": int(k),
                              "value": float(correct[numops == k, layer].mean())}
                             for k in np.unique(numops) for layer in range(correct.shape[1])])
        if target_name != "global_state" and not target.n_classes:
            extra = contents_metrics(probe.predict(feats[test]), target.Y[test], target.mask[test], numops)
            extra = extra[(extra.numops == "all") & (extra.metric != "non_trivial")]
            rows.append(extra.assign(model=model_name, probe=target_name, kind=kind)[
                ["model", "probe", "metric", "kind", "layer", "value"]])
        return pd.concat(rows, ignore_index=True), heat, correct, target.groups[test]

    def _accuracy_rows(self, model, probe, kind, correct, groups) -> pd.DataFrame:
        ci = bootstrap_difference(correct, np.zeros_like(correct), groups, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        return pd.DataFrame({"model": model, "probe": probe, "metric": "non_trivial", "kind": kind,
                             "layer": ci["layer"], "value": correct.mean(0), "ci_low": ci["ci_low"],
                             "ci_high": ci["ci_high"]})

    @staticmethod
    def _selectivity(accuracy: pd.DataFrame) -> pd.DataFrame:
        nt = accuracy[accuracy.metric == "non_trivial"]
        task = nt[nt.kind == "task"].set_index(["model", "probe", "layer"])["value"]
        control = nt[nt.kind == "control"].set_index(["model", "probe", "layer"])["value"]
        return (task - control).rename("selectivity").reset_index()

    def _differences(self, correct_by: dict) -> pd.DataFrame:
        cfg = self.cfg
        names = self.names
        frames = []
        for other in names[1:]:
            for target_name in cfg.targets:
                (a, groups), (b, _) = correct_by[(other, target_name)], correct_by[(names[0], target_name)]
                if a.shape != b.shape:
                    logger.warning("%s and %s differ in depth; no layer-wise difference for %s", other, names[0],
                                   target_name)
                    continue
                # Same data and split seed: both models are scored on the same test items.
                diff = bootstrap_difference(a, b, groups, n_boot=cfg.n_boot, seed=cfg.seed)
                diff["layer"] = diff["layer"].map(self.layer_of[names[0]])
                frames.append(diff.assign(probe=target_name, model_a=other, model_b=names[0]))
        cols = ["probe", "layer", "diff", "ci_low", "ci_high", "model_a", "model_b"]
        return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)

"""Probe experiments: what do models represent, layer by layer, at the tokens where they must emit it?

A :class:`ProbeExperiment` loads each model, caches activations of the training states (``train_data``,
``train_limit`` states) and of the test file (``data``) at the tokens the targets read, fits layer-wise
probes (C chosen per layer on a validation split of the training sample_ids), and scores them on the test
file next to baselines that would explain a result without tracking::

    from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig
    cfg = ProbeExperimentConfig(models=("assets/models/toy-base",), data="data/boxes/test-subsample.jsonl")
    run = ProbeExperiment(cfg).run()

Targets, positions and labels: :mod:`boxprobe.probing.targets` (after Tang et al.). Baselines and metrics:
:mod:`boxprobe.probing.baselines`. ``probe_accuracy.csv`` columns: ``model, probe, metric, kind, layer, value,
ci_low, ci_high, n, subset[, sanity]``; ``kind`` is ``task``, ``majority``, ``initial_state``, ``embedding``
(the same probe on the token embeddings), ``random_init`` (on a re-initialised copy of the model),
``permutation`` (fit on shuffled labels), ``control`` (Hewitt–Liang, token-level targets only) or
``model_argmax`` (the model's own teacher-forced answer at the same token: the argmax of its logits over the
candidate objects' first tokens, metric ``accuracy``, or over the vocabulary, metric ``accuracy_vocab``).
``sanity`` flags a last-layer ``first_object`` probe more than ``sanity_margin`` below the model's own accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from boxprobe.report import plots
from boxprobe.activations.cache import CacheConfig, build_cache, queries_sha256
from boxprobe.config import ConfigError, check_choice, from_dict
from boxprobe.data.queries import QuerySet, prepare, resolve_spec
from boxprobe.data.task import Example, load_vocabulary, read_examples
from boxprobe.errors import MissingFileError
from boxprobe.models.loading import load_model, model_id, model_info, model_n_layers
from boxprobe.models.placement import LoadConfig
from boxprobe.pipeline.rundir import atomic_write_csv, atomic_write_text, claim_run_dir
from boxprobe.probing.features import Side, joined_probe
from boxprobe.probing.probes import check_Cs
from boxprobe.probing.baselines import (FittedProbe, control_labels_for, initial_prediction, majority_prediction,
                                        metric_parts, permuted_labels, score_rows)
from boxprobe.probing.causal_check import causal_table, layers_above_baselines, run_causal_check
from boxprobe.probing.metrics import bootstrap_difference
from boxprobe.probing.targets import TARGET_ROLE, TARGETS, TOKEN_LEVEL, Target, build_target

logger = logging.getLogger(__name__)
EMBED_HOOK = "hook_embed"
# The unembedding's input, cached beside the probed hook for targets scored against the model's own answer: the
# model's logits at a cached token are then one matmul away, with no second pass over the prompts.
FINAL_HOOK = "unembed.hook_in"
OWN_ANSWER_TARGETS = ("first_object", "kth_object")


@dataclass(frozen=True)
class ProbeExperimentConfig:
    """A probing study over one or more models: probes fit on training states, scored on a test file."""

    models: tuple[str, ...]
    """Model names, hub ids or checkpoint directories; the first is the reference in comparisons."""
    data: str
    """The test file: a boxes JSONL file (e.g. the test subsample)."""
    train_data: str | None = None
    """The states the probes are fit on; None: the ``train.jsonl`` beside ``data`` (as ``boxprobe generate`` writes)."""
    train_limit: int | None = 300
    """Use this many training states (all boxes of each), drawn at random with ``seed``; None: every state."""
    out_dir: str = "runs/probes"
    """Where caches and result CSVs go."""
    hook: str = "resid_post"
    """Activation to probe, as :class:`boxprobe.cache.CacheConfig` names hooks (one group, all layers)."""
    targets: tuple[str, ...] = ("empty", "first_object", "kth_object", "prior_1", "global_state")
    """Probe targets, from :data:`boxprobe.probing.targets.TARGETS` (definitions there)."""
    limit: int | None = None
    """Use only the first N test queries."""
    template: str | None = None
    """Prompt template (a bundled name or a JSON file); None: the checkpoint's recorded template, else ``default``."""
    format: str | None = None
    """Prompt format; probes read per-box queries, so only ``per-box`` (or None) is accepted."""
    chat: bool | None = None
    """Wrap prompts in the tokenizer's chat template; None: as the checkpoint records, else no."""
    layers: tuple[int, ...] | None = None
    """Layers to cache and probe; None: every layer."""
    dtype: str = "float32"
    """Storage dtype of the activation cache."""
    batch_size: int = 32
    """Prompts per forward pass when caching."""
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0)
    """Inverse L2 strengths tried per layer (scikit-learn's C); the best on validation is used."""
    split: tuple[float, float, float] = (0.8, 0.2, 0.0)
    """Fit / validation / unused fractions of the training states' sample_ids (the test file is ``data``)."""
    random_init: str = "first"
    """Random-init baseline: probe a re-initialised copy of the ``first`` model, of ``all`` models, or ``none``."""
    baselines: tuple[str, ...] = ("majority", "initial_state", "embedding", "permutation")
    """Baselines besides ``random_init``: any of majority, initial_state, embedding, permutation."""
    sanity_margin: float = 0.10
    """Flag a last-layer ``first_object`` probe this far below the model's own accuracy at the same token."""
    causal_check: bool = False
    """Ablate the ``first_object`` probe's candidate subspace at " the" and compare random sets
    (:mod:`boxprobe.probing.causal_check`) -> ``causal_check.csv``; needs ``first_object`` in targets."""
    causal_layers: tuple[int, ...] | None = None
    """Layers of the causal check; None: every probed layer where the probe beats each baseline's upper bound."""
    causal_n: int = 200
    """Test queries (non-empty boxes) of the causal check, drawn with ``seed``; all when fewer."""
    causal_random: int = 3
    """Random direction sets (seeds) the probe's subspace is compared with."""
    n_boot: int = 1000
    """Cluster-bootstrap resamples for intervals and model differences."""
    seed: int = 0
    """Seed of training-state sampling, splits, permutations, controls and bootstraps."""
    layer_block: int | None = None
    """Layers whose features are read from the cache, upcast to float32 and probed at a time (the cache keeps
    its ``dtype`` on disk and in the read); None: every layer at once. Results do not depend on it; peak
    memory grows with it."""
    device: str | None = None
    """Model device; None picks cuda when available. Shorthand for ``load.device`` (set one of the two)."""
    load: LoadConfig = field(default_factory=LoadConfig)
    """Model placement: device, dtype, device_map, n_devices, max_memory, offload_folder
    (:class:`boxprobe.models.placement.LoadConfig`); the random-init copy loads with its device and dtype."""

    def __post_init__(self) -> None:
        if self.device is not None and self.load.device is not None and self.device != self.load.device:
            raise ConfigError(f"device {self.device!r} and load.device {self.load.device!r} disagree; set only load.device.")
        for target in self.targets:
            check_choice("target", target, TARGETS)
        for baseline in self.baselines:
            check_choice("baseline", baseline, ("majority", "initial_state", "embedding", "permutation"))
        check_choice("random_init", self.random_init, ("first", "all", "none"))
        if self.format not in (None, "per-box"):
            raise ConfigError(f"format {self.format!r}: probes read one queried box per prompt; use per-box or omit it.")
        if not self.models:
            raise ConfigError("ProbeExperimentConfig needs at least one model.")
        for name in ("limit", "train_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or null for all), got {value}.")
        check_Cs(self.Cs)
        if (len(self.split) != 3 or not all(math.isfinite(f) and f >= 0 for f in self.split)
                or min(self.split[:2]) <= 0 or abs(sum(self.split) - 1) > 1e-6):
            raise ConfigError(f"split must be three fractions (fit > 0, validation > 0, unused >= 0) that sum to 1, "
                              f"got {list(self.split)}.")
        if self.causal_check and "first_object" not in self.targets:
            raise ConfigError("causal_check ablates the first_object probe's directions; add first_object to targets.")
        if self.layer_block is not None and self.layer_block < 1:
            raise ConfigError(f"layer_block must be >= 1 (or null for every layer at once), got {self.layer_block}.")
        for name in ("n_boot", "batch_size", "causal_n", "causal_random"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"layers must be block indices >= 0 (or null for every layer), got {self.layers}.")
        if not 0 <= self.sanity_margin <= 1:
            raise ConfigError(f"sanity_margin must lie in [0, 1], got {self.sanity_margin}.")

    def check_models(self) -> None:
        """Layer indices against each model's ``config.json`` (read without loading weights)."""
        for name in self.models:
            n = model_n_layers(name)
            if n is not None and self.layers and max(self.layers) >= n:
                raise ConfigError(f"layer {max(self.layers)} (layers) does not exist in model {name!r}, "
                                  f"which has layers 0..{n - 1} by its config.json.")

    def placement(self) -> LoadConfig:
        """How each model loads: ``load``, with ``device`` as its device when only that is set."""
        return self.load if self.device is None else self.load.override(LoadConfig(device=self.device))

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeExperimentConfig":
        return from_dict(cls, data)

    def train_path(self) -> Path:
        path = Path(self.train_data) if self.train_data else Path(self.data).with_name("train.jsonl")
        if not path.exists():
            raise MissingFileError(f"No training data at {path}: set train_data, or generate the data with "
                                   "`boxprobe generate --out DIR` (it writes train.jsonl beside the test files).")
        return path


@dataclass
class ProbeRun:
    """Results of a probe experiment as tidy frames (also written as CSVs to ``out_dir``)."""

    out_dir: Path
    probe_accuracy: pd.DataFrame
    probe_heatmap: pd.DataFrame
    selectivity: pd.DataFrame
    model_difference: pd.DataFrame
    causal_check: pd.DataFrame | None = None

    def table(self, probe: str = "first_object", metric: str = "accuracy", subset: str = "all") -> pd.DataFrame:
        """Task and every baseline by layer (rows: model, kind; columns: layers)."""
        df = self.probe_accuracy
        df = df[(df.probe == probe) & (df.metric == metric) & (df.subset == subset)]
        return df.pivot_table(index=["model", "kind"], columns="layer", values="value")

    def plot_probe_accuracy(self, probe: str = "first_object", metric: str = "accuracy",
                            subset: str = "all") -> go.Figure:
        df = self.probe_accuracy
        return plots.probe_accuracy_by_layer(df[(df.probe == probe) & (df.metric == metric) & (df.subset == subset)],
                                             title=f"{probe} probe, {metric} ({subset})")

    def plot_heatmap(self, model: str, probe: str = "first_object") -> go.Figure:
        df = self.probe_heatmap
        return plots.probe_heatmap(df[(df.model == model) & (df.probe == probe)])

    def plot_difference(self, probe: str = "first_object") -> go.Figure:
        df = self.model_difference
        return plots.model_difference(df[df.probe == probe])


def sample_states(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """Every example of ``limit`` states (sample_id, num_operations) drawn at random, in file order."""
    def key(ex):
        return ex.sample_id, ex.num_operations if ex.num_operations is not None else ex.sentence.count(". ")
    states = list(dict.fromkeys(key(ex) for ex in examples))
    if limit is not None and limit < len(states):
        chosen = {states[i] for i in np.random.default_rng(seed).choice(len(states), limit, replace=False)}
        examples = [ex for ex in examples if key(ex) in chosen]
    return list(examples)


class ProbeExperiment:
    """Runs the stages of a :class:`ProbeExperimentConfig`; see the module docstring."""

    def __init__(self, cfg: ProbeExperimentConfig, models: Sequence | None = None,
                 queries: Sequence[QuerySet | None] | None = None, overwrite: bool = False, repair: bool = False):
        """``models`` (optional): loaded models standing for ``cfg.models`` in order, each loaded once by the
        caller; ``queries`` (optional): a prepared test query set per model (None entries are prepared here),
        which its random-init baseline is scored on too.
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
        load = self.cfg.placement()
        if random_init:  # load_model re-initialises on one device only
            return load_model(source, **load.single_device().kwargs(), random_init=True, seed=self.cfg.seed)
        return load_model(source, **load.kwargs())

    def run(self) -> ProbeRun:
        """Check the config and data and claim ``out_dir`` (:mod:`boxprobe.pipeline.rundir`), all before any
        model loads; then run every stage."""
        cfg = self.cfg
        if self.models is None:
            cfg.check_models()
        test_examples = read_examples(cfg.data)
        train_examples = sample_states(read_examples(cfg.train_path()), cfg.train_limit, cfg.seed)
        # Settings that do not change results may differ between a run and its resumption.
        signature = {k: v for k, v in asdict(cfg).items()
                     if k not in ("out_dir", "device", "batch_size", "load", "layer_block")}
        if cfg.load.dtype is not None:  # where a model sits changes nothing, its dtype does
            signature["model_dtype"] = cfg.load.dtype
        with claim_run_dir(self.out, "probe", signature, overwrite=self.overwrite):
            return self._run(test_examples, train_examples)

    def _run(self, test_examples, train_examples) -> ProbeRun:
        cfg = self.cfg
        accuracy, heat, correct_by, causal = [], [], {}, []
        self.names: list[str] = []
        self.layer_of: dict[str, dict[int, int]] = {}
        prepared = None  # (spec, test queries, train queries) of the last real model, for its random-init twin
        for i in range(len(cfg.models)):
            with_random = cfg.random_init == "all" or (cfg.random_init == "first" and i == 0)
            for random_init in [False] + ([True] if with_random else []):
                model = self._model(i, random_init)
                if not random_init:
                    self.names.append(model_id(model))
                label = self.names[-1]  # a random-init baseline is reported under the model it re-initialises
                cache_name = model_id(model)
                given = self.queries[i] if self.queries is not None and not random_init else None
                spec = resolve_spec(model, cfg.template, "per-box", cfg.chat)
                if random_init and prepared is not None and prepared[0] == spec:  # same checkpoint, same tokens
                    test_q, train_q = prepared[1:]
                else:
                    test_q = given if given is not None else prepare(model, test_examples, spec, limit=cfg.limit)
                    train_q = prepare(model, train_examples, spec)
                    prepared = (spec, test_q, train_q)
                test = self._cache(model, test_q, cache_name, "test")
                train = self._cache(model, train_q, cache_name, "train")
                layer_of = self.layer_of[label] = dict(enumerate(test.layers))  # cached slot -> layer number
                for name in cfg.targets:
                    acc, hm, correct = self._probe(name, model, train, test, label, random_init)
                    acc["layer"], hm["layer"] = acc["layer"].map(layer_of), hm["layer"].map(layer_of)
                    accuracy.append(acc)
                    heat.append(hm)
                    if not random_init:
                        correct_by[(label, name)] = correct
                if not random_init:
                    real, first = model, getattr(self, "_first", None)
                del model
            if cfg.causal_check:
                causal.append(self._causal(real, first, pd.concat(accuracy, ignore_index=True)))
            del real
        accuracy = self._flag_sanity(pd.concat(accuracy, ignore_index=True))
        heat = pd.concat(heat, ignore_index=True)
        selectivity = self._selectivity(accuracy)
        difference = self._differences(correct_by)
        for frame, file in ((accuracy, "probe_accuracy.csv"), (heat, "probe_heatmap.csv"),
                            (selectivity, "selectivity.csv"), (difference, "model_difference.csv")):
            if frame.empty:  # e.g. no token-level target: no selectivity; a stale file would mislead
                (self.out / file).unlink(missing_ok=True)
            else:
                atomic_write_csv(frame, self.out / file)
        causal = pd.concat(causal, ignore_index=True) if causal else None
        if causal is not None:
            atomic_write_csv(causal, self.out / "causal_check.csv")
        else:
            (self.out / "causal_check.csv").unlink(missing_ok=True)
        atomic_write_text(self.out / "probe_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        return ProbeRun(self.out, accuracy, heat, selectivity, difference, causal)

    def _causal(self, model, first, accuracy: pd.DataFrame) -> pd.DataFrame:
        """The causal check of one model's first_object probe (see :mod:`boxprobe.probing.causal_check`)."""
        cfg, label = self.cfg, self.names[-1]
        probe, target, queries = first
        slot_of = {layer: slot for slot, layer in self.layer_of[label].items()}
        layers = list(cfg.causal_layers) if cfg.causal_layers is not None else layers_above_baselines(accuracy, label)
        missing = [layer for layer in layers if layer not in slot_of]
        if missing:
            raise ConfigError(f"causal_layers {missing} were not probed; pick from the probed layers {sorted(slot_of)}.")
        cols = ["model", "layer", "condition", "metric", "value", "ci_low", "ci_high", "n"]
        if not layers:
            logger.warning("%s: the first_object probe beats its baselines at no layer; no causal check", label)
            return pd.DataFrame(columns=cols)
        raw = run_causal_check(model, queries, target, probe.models[0], {layer: slot_of[layer] for layer in layers},
                               self.vocab, n=cfg.causal_n, n_random=cfg.causal_random, hook=cfg.hook, seed=cfg.seed,
                               batch_size=cfg.batch_size)
        return causal_table(raw, label, cfg.n_boot, cfg.seed)

    def _cache(self, model, queries: QuerySet, label: str, split: str) -> Side:
        cfg = self.cfg
        queries.check_model(model)
        roles = []
        for t in cfg.targets:
            role = TARGET_ROLE[t]
            roles += list(role) if isinstance(role, tuple) else [role]
        roles = tuple(dict.fromkeys(roles))
        hooks = (cfg.hook, EMBED_HOOK) if "embedding" in cfg.baselines else (cfg.hook,)
        if any(t in OWN_ANSWER_TARGETS for t in cfg.targets):
            hooks += (FINAL_HOOK,)
        cache_cfg = CacheConfig(hooks=hooks, roles=roles, dtype=cfg.dtype, batch_size=cfg.batch_size, layers=cfg.layers)
        # Model ids are file-name safe and differ between checkpoints that share a directory name.
        # One directory per request (roles, hooks), so runs with other targets never meet a mismatched cache.
        request = hashlib.sha256(json.dumps([roles, hooks, cfg.layers, cfg.dtype]).encode()).hexdigest()[:8]
        reader = build_cache(model, queries, self.out / "cache" / label / f"{split}-{request}", cache_cfg,
                             data_hash=queries_sha256(queries), repair=self.repair)
        # the probed hook's layers stay on disk, read a block at a time (Side.features); the embedding is one layer
        embed = ({role: reader.activations(EMBED_HOOK, role).float().numpy() for role in roles}
                 if EMBED_HOOK in hooks else {})
        meta = {role: reader.metadata(role).reset_index(drop=True) for role in roles}
        return Side(meta, reader, cfg.hook, embed, [it.query.examples[0].context for it in queries], queries,
                     reader.layers(cfg.hook))

    def _probe(self, name: str, model, train: Side, test: Side, label: str, random_init: bool):
        cfg = self.cfg
        tr, role = build_target(name, train.meta, train.contexts, self.vocab)
        te, _ = build_target(name, test.meta, test.contexts, self.vocab)
        L, items = len(train.layers), np.arange(len(te.y))
        kw = {"n_layers": L, "n_boot": cfg.n_boot, "seed": cfg.seed, "model": label, "probe": name}
        # Layers are fit independently, so a block at a time gives the all-layer fit's probes; only the block's
        # features are ever upcast and held.
        block = cfg.layer_block or L
        probes, preds, perms, ctrls = [], [], [], []
        for start in range(0, L, block):
            sl = slice(start, min(start + block, L))
            Xtr, Xte = train.features(role, sl)[tr.rows], test.features(role, sl)[te.rows]
            probe = FittedProbe(tr, cfg.Cs, cfg.seed, split=cfg.split).fit(Xtr, tr)
            probes.append(probe)
            preds.append(probe.predict(Xte, te))
            if not random_init and "permutation" in cfg.baselines:
                perm = FittedProbe(tr, cfg.Cs, cfg.seed, split=cfg.split).fit(Xtr, tr, C=probe.C,
                                                                              y=permuted_labels(tr, cfg.seed))
                perms.append(perm.predict(Xte, te))
            if not random_init and name in TOKEN_LEVEL:
                ctr = FittedProbe(tr, cfg.Cs, cfg.seed, split=cfg.split).fit(
                    Xtr, tr, C=probe.C, y=control_labels_for(tr, cfg.seed))
                ctrls.append(ctr.predict(Xte, te))
            del Xtr, Xte
        pred = np.concatenate(preds, 1)
        rows = [score_rows(pred, te, items, kind="random_init" if random_init else "task", **kw)]
        if not random_init:
            if "majority" in cfg.baselines:
                rows.append(score_rows(majority_prediction(tr, te), te, items, kind="majority", **kw))
            if "initial_state" in cfg.baselines:
                rows.append(score_rows(initial_prediction(tr, te), te, items, kind="initial_state", **kw))
            if "embedding" in cfg.baselines and train.embed:
                Etr, Ete = train.embedding(role)[tr.rows], test.embedding(role)[te.rows]
                if np.ptp(Etr, axis=0).max() == 0:  # one token type (e.g. "contains"): only the intercept is left
                    emb_pred = majority_prediction(tr, te)
                else:
                    emb_pred = FittedProbe(tr, cfg.Cs, cfg.seed, split=cfg.split).fit(Etr, tr).predict(Ete, te)[:, :1]
                rows.append(score_rows(emb_pred, te, items, kind="embedding", **kw))
            if perms:
                rows.append(score_rows(np.concatenate(perms, 1), te, items, kind="permutation", **kw))
            if ctrls:
                te_ctrl = Target(**{**vars(te), "y": control_labels_for(te, cfg.seed)})
                rows.append(score_rows(np.concatenate(ctrls, 1), te_ctrl, items, kind="control", **kw))
            if name in OWN_ANSWER_TARGETS:
                rows += self._model_argmax(model, test, role, te, kw)
        if name == "first_object" and not random_init:
            self._first = (joined_probe(probes), te, test.queries)
        num, den = metric_parts(pred, te)["accuracy"][0]
        correct = (num / np.maximum(den, 1e-12), te.groups, den[:, 0] > 0)
        heat = pd.DataFrame([{"model": label + (" (random init)" if random_init else ""), "probe": name,
                              "layer": layer, "numops": int(k),
                              "value": float(num[te.numops == k, layer].sum() / max(den[te.numops == k, layer].sum(), 1))}
                             for k in np.unique(te.numops) for layer in range(L)])
        return pd.concat(rows, ignore_index=True), heat, correct

    def _model_argmax(self, model, test: Side, role, t: Target, kw: dict) -> list[pd.DataFrame]:
        """The model's own teacher-forced answer at the probed " the": argmax over candidate objects' first
        tokens (the probe's decision space; metric ``accuracy``) and over the vocabulary (``accuracy_vocab``).
        Its logits are the unembedding applied to the cached unembedding input (``FINAL_HOOK``) at that token,
        stored in the cache's ``dtype`` (a bfloat16 cache of a float32 model rounds that input first)."""
        tok = model.tokenizer
        first = np.array([tok(" " + o, add_special_tokens=False)["input_ids"][0] for o in self.vocab])
        final = test.rows(FINAL_HOOK, role)[t.rows]
        gold_next = np.array([test.queries.items[int(q)].ids[int(pos) + 1]
                              for q, pos in zip(t.query_index, t.token_index)])
        vocab_top, cand_top = np.empty(len(t.y), np.int64), np.empty(len(t.y), np.int64)
        weight = next(model.unembed.parameters())
        step = max(1, 2**26 // max(int(model.cfg.d_vocab), 1))  # logits of this many rows at a time: 256 MiB float32
        with torch.inference_mode():
            for start in range(0, len(final), step):
                rows = slice(start, start + step)
                x = final[rows, None].to(device=weight.device, dtype=weight.dtype)
                logits = model.unembed(x)[:, 0].float().cpu().numpy()
                vocab_top[rows] = logits.argmax(1)
                # over the mentioned objects' first tokens only (ties: the first object, as argmax takes)
                cand_top[rows] = first[np.where(t.mask[rows], logits[:, first], -np.inf).argmax(1)]
        vocab_right, cand_right = vocab_top == gold_next, cand_top == gold_next
        items = np.arange(len(t.y))
        base = {k: v for k, v in kw.items() if k != "n_layers"}
        cand_pred = np.where(cand_right, t.y, -1)
        vocab_pred = np.where(vocab_right, t.y, -1)
        cand = score_rows(cand_pred, t, items, kind="model_argmax", n_layers=1, **base)
        voc = score_rows(vocab_pred, t, items, kind="model_argmax", n_layers=1, **base)
        voc = voc[voc.metric == "accuracy"].assign(metric="accuracy_vocab")
        last = kw["n_layers"] - 1
        return [cand.assign(layer=last), voc.assign(layer=last)]

    def _flag_sanity(self, acc: pd.DataFrame) -> pd.DataFrame:
        """``sanity`` on the task row of the last layer of ``first_object``: ok, or how far below the model."""
        acc = acc.assign(sanity="")
        sel = (acc.probe == "first_object") & (acc.metric == "accuracy") & (acc.subset == "all")
        for model, rows in acc[sel].groupby("model"):
            own = rows[rows.kind == "model_argmax"]
            task = rows[rows.kind == "task"]
            if own.empty or task.empty:
                continue
            last = task[task.layer == task.layer.max()]
            gap = float(own.value.iloc[0] - last.value.iloc[0])
            flag = "ok" if gap <= self.cfg.sanity_margin else f"probe {gap:.2f} below the model's own accuracy"
            if flag != "ok":
                logger.warning("%s: last-layer first_object %s", model, flag)
            acc.loc[last.index, "sanity"] = flag
        return acc

    @staticmethod
    def _selectivity(accuracy: pd.DataFrame) -> pd.DataFrame:
        """Hewitt–Liang selectivity (task minus control accuracy), only for token-level targets."""
        acc = accuracy[(accuracy.metric == "accuracy") & (accuracy.subset == "all")]
        task = acc[acc.kind == "task"].set_index(["model", "probe", "layer"])["value"]
        control = acc[acc.kind == "control"].set_index(["model", "probe", "layer"])["value"]
        out = (task - control).rename("selectivity").dropna().reset_index()
        return out

    def _differences(self, correct_by: dict) -> pd.DataFrame:
        cfg = self.cfg
        names = self.names
        frames = []
        for other in names[1:]:
            for target_name in cfg.targets:
                (a, groups, keep), (b, _, _) = correct_by[(other, target_name)], correct_by[(names[0], target_name)]
                if a.shape != b.shape:
                    logger.warning("%s and %s differ in depth; no layer-wise difference for %s", other, names[0],
                                   target_name)
                    continue
                # Same data and seeds: both models are scored on the same test items.
                diff = bootstrap_difference(a[keep], b[keep], groups[keep], n_boot=cfg.n_boot, seed=cfg.seed)
                diff["layer"] = diff["layer"].map(self.layer_of[names[0]])
                frames.append(diff.assign(probe=target_name, model_a=other, model_b=names[0]))
        cols = ["probe", "layer", "diff", "ci_low", "ci_high", "model_a", "model_b"]
        return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)

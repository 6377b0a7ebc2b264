"""The main job: every analysis stage on the bundled toy models, into one run directory.

``run_demo`` is a small runner: each stage is a function that takes its dependencies (loaded
models, examples, the run directory) as arguments and writes tidy CSVs in the dashboard's layout,
so a stage can be rerun or replaced alone. ``boxprobe demo --out DIR`` calls it.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from boxprobe import __version__
from boxprobe.activations.attention import (AttentionConfig, aggregate_attention, attention_heads_table,
                                            attention_to_roles)
from boxprobe.config import ConfigError, check_choice, from_dict
from boxprobe.report.dashboard import dashboard_from_run
from boxprobe.behaviour.evaluate import EvalConfig, evaluate
from boxprobe.data.queries import QuerySet, prepare
from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig
from boxprobe.models.loading import BUNDLED_MODELS_DIR, load_model, model_id, model_info
from boxprobe.models.placement import LoadConfig
from boxprobe.behaviour.scoring import accuracy_by_numops
from boxprobe.data.task import TaskConfig, generate_dataset, read_examples
from boxprobe.errors import MissingFileError
from boxprobe.pipeline.rundir import atomic_write_csv, atomic_write_text, claim_run_dir

logger = logging.getLogger(__name__)
STAGES = ("behaviour", "probes", "attention", "patching", "dashboard")
BUNDLED = tuple(str(BUNDLED_MODELS_DIR / name) for name in ("toy-base", "toy-code", "toy-control"))


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. Defaults: the three bundled toy models on a fresh test subsample."""

    models: tuple[str, ...] = BUNDLED
    """Models to analyse; the first is the base, the second the code-trained model, in comparisons."""
    out_dir: str = "runs/demo"
    """The run directory (data, CSVs, caches, dashboard.html)."""
    per_numops: int = 12
    """States per numops value in the generated test subsample (all 7 boxes each)."""
    seed: int = 2255
    """Seed of the generated data."""
    stages: tuple[str, ...] = STAGES
    """Stages to run, in order."""
    batch_size: int = 32
    """Prompts per forward pass."""
    attention_queries: int = 200
    """Queries used for the attention analysis."""
    patching_pairs: int = 16
    """Random-query pairs (one per context) for circuit discovery and patching; CMAP uses up to as many
    pairs the base model gets wrong."""
    probe_train_states: int = 300
    """Training states (all 7 boxes each) the probes are fit on; the probe stage's cost grows with it. 300 is the
    probe experiment's default; below about 300 the toy models' last-layer first_object probes fall short of the
    models' own accuracy by more than the sanity margin."""
    threads: int | None = None
    """torch CPU threads (None: torch's default, every core); results agree across thread counts up to float
    rounding."""
    load: LoadConfig = field(default_factory=LoadConfig)
    """Model placement: device, dtype, device_map, n_devices, max_memory, offload_folder."""

    def __post_init__(self) -> None:
        for stage in self.stages:
            check_choice("stage", stage, STAGES)

    @classmethod
    def from_dict(cls, data: dict) -> "DemoConfig":
        return from_dict(cls, data)


def behaviour_stage(models: dict, queries: dict[str, QuerySet], out: Path, batch_size: int) -> pd.DataFrame:
    """Behavioural accuracy by numops of each model -> ``behaviour.csv``."""
    tables = []
    for name, model in models.items():
        result = evaluate(model, queries[name], EvalConfig(batch_size=batch_size))
        result.save(out / "behaviour" / safe_name(name))
        tables.append(accuracy_by_numops(result.frame).assign(model=name))
    frame = pd.concat(tables, ignore_index=True)
    atomic_write_csv(frame, out / "behaviour.csv")
    return frame


def probes_stage(models: dict, queries: dict[str, QuerySet], model_paths: Sequence[str], data: Path, out: Path,
                 batch_size: int, train_limit: int = 100) -> None:
    """Emptiness (at "contains"), first-answer-object (at the appended " the") and local prior-state probes at
    every layer, fit on ``train_limit`` training states with one C and scored on the test subsample next to the
    majority, initial-state, embedding, label-permutation and (first model) random-init baselines ->
    ``probe_*.csv``. Kept small so the demo stays quick: the other targets (kth_object, global_state,
    incremental) and a C search are one ``boxprobe probe CONFIG.yaml`` away."""
    cfg = ProbeExperimentConfig(models=tuple(model_paths), data=str(data), out_dir=str(out),
                                targets=("empty", "first_object", "prior_1"), train_limit=train_limit,
                                batch_size=batch_size, n_boot=300, random_init="first", Cs=(1.0,),
                                baselines=("majority", "initial_state", "embedding", "permutation"))
    ProbeExperiment(cfg, models=list(models.values()), queries=[queries[n] for n in models]).run()


def attention_stage(models: dict, queries: dict[str, QuerySet], out: Path, n_queries: int,
                    batch_size: int) -> pd.DataFrame:
    """Attention of each head from the query token to semantic roles -> ``attention_heads.csv``."""
    frames = []
    for name, model in models.items():
        raw = attention_to_roles(model, queries[name][:n_queries], AttentionConfig(batch_size=batch_size))
        frames.append(attention_heads_table(aggregate_attention(raw)))
    frame = pd.concat(frames, ignore_index=True)
    atomic_write_csv(frame, out / "attention_heads.csv")
    return frame


def patching_stage(models: dict, queries: dict[str, QuerySet], out: Path, n_pairs: int, batch_size: int) -> None:
    """The base model's circuit (Prakash et al.) on random-query pairs, with CMAP from the second model.

    Writes ``circuit.json`` / ``circuit_scores.csv`` / ``circuit_sets.csv`` (discovery and evaluation,
    :func:`boxprobe.causal.study.circuit_study`), ``cmap.csv`` (the second model's group outputs patched
    into the base on pairs the base gets wrong), ``patching_resid.csv`` (the residual stream at each
    layer and key role) and ``patching_heads.csv`` (each head at the answer position), both noising with
    the relative change of the correct object's probability.
    """
    from boxprobe.causal.patching import patch_heads, patch_resid_pre, prob_change
    from boxprobe.causal.study import CircuitStudyConfig, circuit_study

    (base_name, base), *others = models.items()
    donor = others[0][1] if others else None
    cfg = CircuitStudyConfig(n_pairs=n_pairs, n_reference=max(4, n_pairs // 3), top_k=(3, 3, 2, 1), n_random=3,
                             minimality=False, cmap_pairs=n_pairs, max_batch=max(batch_size, 64))
    circuit = circuit_study(base, queries[base_name], out, cfg, donor=donor)
    logger.info("circuit of %s: %s (faithfulness %s)", base_name, circuit.groups, circuit.faithfulness)
    batch = circuit.batch
    loop = {"max_batch": max(batch_size, 64), "progress": False, "metric": prob_change, "direction": "noising"}
    roles = ["box_mention", "query_box", "query_last", "answer_prefix"]
    atomic_write_csv(patch_resid_pre(base, batch, positions=roles, **loop).assign(model=base_name),
                     out / "patching_resid.csv")
    atomic_write_csv(patch_heads(base, batch, positions="answer_prefix", **loop).assign(model=base_name),
                     out / "patching_heads.csv")


def run_demo(cfg: DemoConfig = DemoConfig(), overwrite: bool = False) -> Path:
    """Run the configured stages into ``cfg.out_dir``; returns the dashboard path (or the run dir).

    The run directory is claimed before any model loads (:mod:`boxprobe.pipeline.rundir`): another
    run's directory is refused unless ``overwrite``, which replaces that run as a whole; the same
    config (any subset of its stages) reruns into its own directory."""
    # Checked before anything is written: from a wheel the bundled models are absent.
    missing = [Path(m).name for m in cfg.models if str(m).startswith(str(BUNDLED_MODELS_DIR)) and not Path(m).exists()]
    if missing:
        raise MissingFileError(
            f"The bundled toy model(s) {', '.join(missing)} are not in {BUNDLED_MODELS_DIR}: they ship in assets/models "
            "of the boxprobe source repository, not in the installed package. Run the demo from a clone of the "
            "repository, or name other models (DemoConfig.models, --models on the command line).")
    # Stages, threads and batch size do not change what a stage writes: a rerun of some stages is the same run.
    signature = {k: v for k, v in asdict(cfg).items()
                 if k not in ("out_dir", "stages", "threads", "batch_size", "load")}
    if cfg.load.dtype is not None:  # where a model sits changes nothing, its dtype does
        signature["model_dtype"] = cfg.load.dtype
    with claim_run_dir(cfg.out_dir, "demo", signature, overwrite=overwrite):
        return _run_demo(cfg, Path(cfg.out_dir))


def _run_demo(cfg: DemoConfig, out: Path) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    paths = generate_dataset(TaskConfig(seed=cfg.seed), out / "data", subsample_per_numops=cfg.per_numops)
    data = paths["test-subsample"]
    examples = read_examples(data)
    models = {}
    for m in cfg.models:  # each model is loaded once, its queries prepared once, for every stage
        model = load_model(m, **cfg.load.kwargs())
        models[model_id(model)] = model
    if len(models) < len(cfg.models):
        raise ConfigError("Two of the demo's models are the same checkpoint; list each model once.")
    queries = {name: prepare(model, examples) for name, model in models.items()}
    timings["data_and_models"] = time.perf_counter() - started
    for stage in cfg.stages:
        t0 = time.perf_counter()
        if stage == "behaviour":
            behaviour_stage(models, queries, out, cfg.batch_size)
        elif stage == "probes":
            probes_stage(models, queries, cfg.models, data, out, cfg.batch_size, cfg.probe_train_states)
        elif stage == "attention":
            attention_stage(models, queries, out, cfg.attention_queries, cfg.batch_size)
        elif stage == "patching":
            patching_stage(models, queries, out, cfg.patching_pairs, cfg.batch_size)
        elif stage == "dashboard":
            _write_run_info(cfg, models, timings, out)
            dashboard_from_run(out)
        timings[stage] = round(time.perf_counter() - t0, 2)
        logger.info("stage %s done in %.1f s", stage, timings[stage])
    timings["total"] = round(time.perf_counter() - started, 2)
    _write_run_info(cfg, models, timings, out)
    return out / "dashboard.html" if "dashboard" in cfg.stages else out


def safe_name(name: str) -> str:
    """A file-system-safe directory name for a model id."""
    return re.sub(r"[^\w.@-]+", "_", name).strip("_")


def _write_run_info(cfg: DemoConfig, models: dict, timings: dict, out: Path) -> None:
    infos = {name: model_info(m) for name, m in models.items()}
    info = {
        "models": list(models), "weight_mode": sorted({i.weight_mode for i in infos.values() if i}),
        "revisions": {n: i.revision for n, i in infos.items() if i}, "boxprobe": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": asdict(cfg), "timings_s": timings,
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                    f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
    }
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=str) + "\n")

"""Sweeps: analysis stages over many models, run as units through submitit (SLURM job arrays on a cluster,
its local executor on one machine), then merged into tidy tables.

A unit is (stage, model, data, config). It writes under ``out_dir/<stage>/<model-id>/`` and writes its
done-marker ``DONE.json`` last, atomically. :func:`run_sweep` skips a unit whose marker exists and whose
recorded request matches; a unit without a marker (killed, failed) is rerun from scratch: its directory
is emptied first, except ``cache/``, which :func:`boxprobe.activations.cache.build_cache` resumes shard by
shard. A unit that finds the marker of another request refuses to overwrite it. Every start, skip and
finish is appended to ``out_dir/sweep_log.jsonl``, so a rerun can be checked for work redone.

The model id of a unit's directory is predicted before loading (a local checkpoint's content hash, a hub
model's cached commit) so a done unit is skipped without loading its model; the unit checks it after
loading and records the loaded id in its marker.

:func:`collect` merges the done units into ``out_dir/collected/``: ``behaviour.csv`` (accuracy by numops
per model with normal and Wilson intervals), ``behaviour_items.csv`` (every item), ``comparisons.csv``
(treated minus base accuracy for the registry's code / math / alignment pairs and the config's own pairs,
overall and by numops, paired cluster bootstrap over states, ``boxprobe.probing.metrics.bootstrap_difference``),
and for the other stages each unit's CSVs stacked with a ``model_id`` column.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from boxprobe.config import check_choice, load_yaml_config, to_dict
from boxprobe.errors import ConfigError, DataError, MissingFileError
from boxprobe.models.placement import LoadConfig
from boxprobe.models.registry import COMPARISONS, REGISTRY, pairs as registry_pairs

logger = logging.getLogger(__name__)
STAGES = ("behaviour", "probes", "attention", "patching")
MARKER = "DONE.json"
LOG = "sweep_log.jsonl"
KEEP_ON_RETRY = ("cache",)


@dataclass(frozen=True)
class ExecutorConfig:
    """How units are launched (submitit)."""

    kind: Literal["local", "slurm", "debug"] = "local"
    """local: subprocesses on this machine; slurm: a job array; debug: in this process (for debugging)."""
    timeout_min: int = 240
    """Wall-clock limit per unit."""
    gpus_per_node: int = 1
    """GPUs per unit (SLURM's --gpus-per-node); 0 on a CPU machine."""
    cpus_per_task: int = 8
    """CPU cores per unit."""
    mem_gb: int = 64
    """Host memory per unit."""
    slurm_partition: str | None = None
    """SLURM partition."""
    array_parallelism: int = 16
    """SLURM units running at once."""
    local_parallelism: int = 1
    """Local units running at once (each loads its own model)."""
    slurm_additional: dict | None = None
    """Extra sbatch parameters, e.g. {"constraint": "h100", "account": "lab"}."""


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: which models, which data, which stages, where, and how to launch."""

    models: tuple[str, ...]
    """Registry names, hub ids or checkpoint directories; ``pairs:code`` / ``pairs:math`` /
    ``pairs:alignment`` / ``pairs:all`` expand to every model of the registry's pairs of that kind."""
    data: str
    """Boxes JSONL file (the same for every unit)."""
    out_dir: str
    """Sweep directory: ``<stage>/<model-id>/`` per unit, ``collected/`` for merged tables."""
    stages: tuple[str, ...] = ("behaviour",)
    """Among behaviour, probes, attention, patching."""
    limit: int | None = None
    """Use only the first N queries of the data."""
    batch_size: int = 16
    """Starting batch size (halved on out-of-memory)."""
    pairs: tuple[tuple[str, str, str], ...] = ()
    """Extra (comparison, base, treated) model pairs to compare, besides the registry's."""
    n_boot: int = 1000
    """Bootstrap resamples of the pair comparisons."""
    attention_queries: int = 200
    """Queries of the attention stage."""
    patching_pairs: int = 16
    """Counterfactual pairs of the patching stage."""
    threads: int | None = None
    """torch CPU threads per unit (None: torch's default)."""
    load: LoadConfig = field(default_factory=LoadConfig)
    """Model placement: device, dtype, device_map, n_devices, max_memory, offload_folder."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Launch options."""

    def __post_init__(self) -> None:
        for stage in self.stages:
            check_choice("stage", stage, STAGES)
        if not self.models:
            raise ConfigError("models is empty; list registry names, checkpoint directories or pairs:code.")


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read a sweep YAML file; relative ``data``/``out_dir``/model paths stay relative to the working directory."""
    return load_yaml_config(SweepConfig, path)


def expand_models(names: tuple[str, ...]) -> list[str]:
    """Models in order, ``pairs:<kind>`` expanded, each once."""
    out: list[str] = []
    for name in names:
        if name.startswith("pairs:"):
            kind = name.split(":", 1)[1]
            chosen = registry_pairs(None if kind == "all" else kind)
            out += [m for p in chosen for m in (p.base, p.treated)]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def expected_model_id(name: str) -> str:
    """The id ``load_model(name)`` will give, computed without loading (see module docstring)."""
    from boxprobe.models import loading

    resolved = loading.resolve_model_name(name)
    if Path(resolved).is_dir():
        ckpt = loading.check_checkpoint_dir(resolved, name)
        return loading._make_model_id(str(ckpt), "local", loading.checkpoint_fingerprint(ckpt))
    if Path(resolved).is_file():
        from boxprobe.models.gguf import file_sha256

        return loading._make_model_id(resolved, "gguf", file_sha256(resolved))
    return loading._make_model_id(resolved, "hub", loading._cached_hub_revision(resolved, None))


@dataclass(frozen=True)
class Unit:
    """One unit of work and where it writes."""

    stage: str
    model: str
    model_id: str
    config: SweepConfig

    @property
    def directory(self) -> Path:
        return Path(self.config.out_dir) / self.stage / self.model_id

    def request(self) -> dict[str, Any]:
        """What the unit's marker must match to count as this unit's result."""
        cfg = to_dict(self.config)
        for key in ("executor", "out_dir", "models", "pairs", "n_boot", "threads", "load"):
            cfg.pop(key)
        request = {"stage": self.stage, "model": self.model, "model_id": self.model_id, "config": cfg,
                   "data_sha256": _data_hash(self.config.data)}
        return json.loads(json.dumps(request))  # as a marker reads back: tuples become lists


def _data_hash(path: str) -> str:
    from boxprobe.activations.cache import file_sha256

    if not Path(path).is_file():
        raise MissingFileError(f"sweep data {path} does not exist; generate it with `boxprobe generate`.")
    return file_sha256(path)


def plan_units(cfg: SweepConfig) -> list[Unit]:
    """Every (stage, model) unit of the sweep, stages outermost."""
    ids = {m: expected_model_id(m) for m in expand_models(cfg.models)}
    if len(set(ids.values())) < len(ids):
        raise ConfigError("two of the sweep's models are the same checkpoint; list each model once.")
    return [Unit(stage, m, ids[m], cfg) for stage in cfg.stages for m in ids]


def is_done(unit: Unit) -> bool:
    """Whether the unit's marker exists and records this unit's request."""
    path = unit.directory / MARKER
    if not path.is_file():
        return False
    marker = json.loads(path.read_text())
    if marker.get("request") != unit.request():
        raise DataError(f"{path} records another request (other data or settings); delete {unit.directory} "
                        "to rerun it, or pick another out_dir.")
    return True


def _log(out_dir: str, unit: Unit, event: str, **extra) -> None:
    line = json.dumps({"time": time.time(), "pid": os.getpid(), "stage": unit.stage, "model_id": unit.model_id,
                       "event": event, **extra})
    with (Path(out_dir) / LOG).open("a") as f:  # one short line per write: appends do not interleave
        f.write(line + "\n")


def run_unit(unit: Unit) -> str:
    """Run one unit unless done; returns "skipped" or "done". Runs in the submitit worker."""
    import torch

    if is_done(unit):
        _log(unit.config.out_dir, unit, "skip")
        return "skipped"
    cfg, out = unit.config, unit.directory
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if out.exists():  # a killed or failed attempt: start over, keeping resumable caches
        for child in out.iterdir():
            if child.name not in KEEP_ON_RETRY:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _log(cfg.out_dir, unit, "start")
    started = time.perf_counter()
    from boxprobe.models.loading import load_model, model_id

    model = load_model(unit.model, **cfg.load.kwargs())
    loaded = model_id(model)
    if loaded != unit.model_id:
        logger.warning("%s loaded as %s, planned as %s (its hub revision changed?)", unit.model, loaded, unit.model_id)
    _STAGE_RUNNERS[unit.stage](unit, model, out)
    marker = {"request": unit.request(), "loaded_model_id": loaded, "elapsed_s": round(time.perf_counter() - started, 2),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, out / MARKER)  # last: the unit counts as done once the marker exists
    _log(cfg.out_dir, unit, "done")
    return "done"


def _queries(unit: Unit, model):
    from boxprobe.data.queries import prepare, resolve_spec

    return prepare(model, unit.config.data, resolve_spec(model), limit=unit.config.limit)


def _behaviour(unit: Unit, model, out: Path) -> None:
    from boxprobe.behaviour.evaluate import EvalConfig, evaluate

    result = evaluate(model, _queries(unit, model), EvalConfig(batch_size=unit.config.batch_size, progress=False))
    result.summary["data"] = unit.config.data
    result.save(out)


def _attention(unit: Unit, model, out: Path) -> None:
    from boxprobe.pipeline.demo import attention_stage

    attention_stage({unit.model_id: model}, {unit.model_id: _queries(unit, model)}, out,
                    unit.config.attention_queries, unit.config.batch_size)


def _patching(unit: Unit, model, out: Path) -> None:
    from boxprobe.pipeline.demo import patching_stage

    patching_stage({unit.model_id: model}, {unit.model_id: _queries(unit, model)}, out,
                   unit.config.patching_pairs, unit.config.batch_size)


def _probes(unit: Unit, model, out: Path) -> None:
    from boxprobe.pipeline.demo import probes_stage

    probes_stage({unit.model_id: model}, {unit.model_id: _queries(unit, model)}, [unit.model],
                 Path(unit.config.data), out, unit.config.batch_size)


_STAGE_RUNNERS = {"behaviour": _behaviour, "attention": _attention, "patching": _patching, "probes": _probes}


def _executor(cfg: SweepConfig, kind: str):
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweeps need submitit: pip install 'boxprobe[sweep]' (or pip install submitit).") from None
    ex, folder = cfg.executor, Path(cfg.out_dir) / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    params: dict[str, Any] = {"timeout_min": ex.timeout_min, "name": "boxprobe-sweep"}
    if kind == "slurm":
        params.update(gpus_per_node=ex.gpus_per_node, cpus_per_task=ex.cpus_per_task, mem_gb=ex.mem_gb,
                      slurm_array_parallelism=ex.array_parallelism)
        if ex.slurm_partition:
            params["slurm_partition"] = ex.slurm_partition
        if ex.slurm_additional:
            params["slurm_additional_parameters"] = dict(ex.slurm_additional)
    executor.update_parameters(**params)
    return executor


def run_sweep(cfg: SweepConfig, executor: str | None = None) -> pd.DataFrame:
    """Run every unit not yet done; returns one row per unit: stage, model, model_id, status, error.

    SLURM gets all pending units as one job array; the local executor runs them in waves of
    ``executor.local_parallelism``. A failed unit is reported and the others still run."""
    kind = executor or cfg.executor.kind
    check_choice("executor", kind, ("local", "slurm", "debug"))
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    units = plan_units(cfg)
    rows = {id(u): {"stage": u.stage, "model": u.model, "model_id": u.model_id, "status": "pending", "error": ""}
            for u in units}
    pending = []
    for u in units:
        if is_done(u):
            _log(cfg.out_dir, u, "skip")
            rows[id(u)]["status"] = "skipped"
        else:
            pending.append(u)
    if pending:
        ex = _executor(cfg, kind)
        wave = len(pending) if kind == "slurm" else max(1, cfg.executor.local_parallelism)
        for i in range(0, len(pending), wave):
            group = pending[i:i + wave]
            jobs = ex.map_array(run_unit, group)
            for u, job in zip(group, jobs):
                try:
                    rows[id(u)]["status"] = job.result()
                except Exception as err:  # noqa: BLE001 - one failed unit must not lose the others
                    rows[id(u)].update(status="failed", error=str(err).strip().splitlines()[-1][:300])
                    logger.error("unit %s/%s failed: %s", u.stage, u.model_id, rows[id(u)]["error"])
    return pd.DataFrame(list(rows.values()))


# -- collecting -----------------------------------------------------------------------------------


def collect(cfg: SweepConfig) -> dict[str, Path]:
    """Merge the done units into ``out_dir/collected/``; returns the written tables by name."""
    from boxprobe.behaviour.scoring import accuracy_by_numops

    out = Path(cfg.out_dir) / "collected"
    out.mkdir(parents=True, exist_ok=True)
    units = [u for u in plan_units(cfg) if is_done(u)]
    missing = len(plan_units(cfg)) - len(units)
    if missing:
        logger.warning("%d unit(s) are not done yet; collecting the rest (run the sweep again to finish them)",
                       missing)
    written: dict[str, Path] = {}
    behaviour = [u for u in units if u.stage == "behaviour"]
    if behaviour:
        items = pd.concat([pd.read_csv(u.directory / "results.csv").assign(model=u.model, model_id=u.model_id)
                           for u in behaviour], ignore_index=True)
        table = pd.concat([accuracy_by_numops(items[items.model_id == u.model_id]).assign(
            model=u.model, model_id=u.model_id) for u in behaviour], ignore_index=True)
        written["behaviour"] = _write(table, out / "behaviour.csv")
        written["behaviour_items"] = _write(items, out / "behaviour_items.csv")
        comparisons = compare_pairs(items, cfg)
        if len(comparisons):
            written["comparisons"] = _write(comparisons, out / "comparisons.csv")
    for stage in ("probes", "attention", "patching"):
        done = [u for u in units if u.stage == stage]
        names = sorted({p.name for u in done for p in u.directory.glob("*.csv")})
        for name in names:
            parts = [pd.read_csv(u.directory / name).assign(model_id=u.model_id)
                     for u in done if (u.directory / name).is_file()]
            written[f"{stage}_{name[:-4]}"] = _write(pd.concat(parts, ignore_index=True), out / f"{stage}_{name}")
    return written


def _write(frame: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def compare_pairs(items: pd.DataFrame, cfg: SweepConfig) -> pd.DataFrame:
    """Treated minus base accuracy for every pair whose two models are in ``items``, overall and by
    numops, with paired cluster-bootstrap percentile intervals (clusters: states, sample_id x num_operations)."""
    from boxprobe.probing.metrics import bootstrap_difference

    chosen = [(p.comparison, p.base, p.treated) for p in registry_pairs()] + [tuple(p) for p in cfg.pairs]
    for comparison, *_ in cfg.pairs:
        check_choice("pair comparison", comparison, COMPARISONS)
    key = ["sample_id", "num_operations", "box", "numops"]
    rows = []
    for comparison, base, treated in dict.fromkeys(chosen):
        a, b = items[items.model == treated], items[items.model == base]
        if not len(a) or not len(b):
            continue
        merged = a[key + ["correct"]].merge(b[key + ["correct"]], on=key, suffixes=("_treated", "_base"))
        if len(merged) < len(a):
            raise DataError(f"{treated} and {base} were evaluated on different items; rerun both on the same data.")
        for numops, part in [("all", merged)] + [(str(k), g) for k, g in merged.groupby("numops")]:
            state = part["sample_id"].astype(str) + "/" + part["num_operations"].astype(str)
            diff = bootstrap_difference(part["correct_treated"].to_numpy(float), part["correct_base"].to_numpy(float),
                                        state.to_numpy(), n_boot=cfg.n_boot).iloc[0]
            rows.append({"comparison": comparison, "base": base, "treated": treated, "numops": numops,
                         "n": len(part), "n_states": state.nunique(),
                         "accuracy_base": part["correct_base"].mean(), "accuracy_treated": part["correct_treated"].mean(),
                         "diff": diff["diff"], "ci_low": diff["ci_low"], "ci_high": diff["ci_high"],
                         "known_pair": base in REGISTRY and treated in REGISTRY})
    return pd.DataFrame(rows)


def from_yaml_dict(data: dict) -> SweepConfig:
    """A sweep config from a mapping, as read from YAML."""
    from boxprobe.config import from_dict

    return from_dict(SweepConfig, data)

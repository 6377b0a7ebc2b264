"""Sweeps: a killed sweep reruns without redoing or losing units, and collects what an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import submitit  # noqa: F401  (the dev extra installs it; sweeps run through it)
import yaml

from boxprobe.data.task import TaskConfig, generate_dataset
from boxprobe.errors import BoxprobeError
from boxprobe.models.loading import BUNDLED_MODELS_DIR
from boxprobe.pipeline.sweep import MARKER, expand_models, from_yaml_dict, is_done, plan_units

ROOT = Path(__file__).resolve().parents[1]
MODELS = [str(BUNDLED_MODELS_DIR / "toy-base"), str(BUNDLED_MODELS_DIR / "toy-code")]


def _config(tmp_path, out: str, **extra) -> Path:
    data = tmp_path / "data" / "test-subsample.jsonl"
    if not data.exists():
        generate_dataset(TaskConfig(num_samples=30, num_operations=2), tmp_path / "data", subsample_per_numops=6)
    cfg = {"models": MODELS, "data": str(data), "out_dir": str(tmp_path / out), "limit": 21, "threads": 1,
           "n_boot": 200, "pairs": [["code", *MODELS]], "load": {"device": "cpu"},
           "executor": {"kind": "local", "timeout_min": 10}, **extra}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "boxprobe", *args], env=env, cwd=ROOT, **popen)


def _kill_tree(pid: int) -> None:
    import psutil

    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:  # only the processes this test started
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sweep_log.jsonl").read_text().splitlines()]


def test_pairs_expand_to_registry_models():
    models = expand_models(("pairs:code", "Llama-2-7b"))
    assert len(models) == 10 and models[:2] == ["Llama-2-7b", "CodeLlama-7b"]


def test_killed_sweep_reruns_without_redoing_or_losing(tmp_path):
    interrupted = _config(tmp_path, "killed")
    out = tmp_path / "killed"
    proc = _cli("sweep", "run", str(interrupted))
    deadline = time.time() + 400
    while not list(out.glob(f"behaviour/*/{MARKER}")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    _kill_tree(proc.pid)
    proc.wait()
    first = [p for p in out.glob(f"behaviour/*/{MARKER}")]
    assert len(first) >= 1, "the first unit never finished"
    before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in first}
    killed_at = len(_events(out))

    assert _cli("sweep", "run", str(interrupted)).wait(timeout=600) == 0
    rerun = _events(out)[killed_at:]
    done_first = {p.parent.name for p in first}
    assert not [e for e in rerun if e["model_id"] in done_first and e["event"] == "start"], "a done unit was redone"
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in first} == before
    units = plan_units(from_yaml_dict(yaml.safe_load(interrupted.read_text())))
    assert all(is_done(u) for u in units), "a unit was lost"

    clean = _config(tmp_path, "clean", executor={"kind": "local", "timeout_min": 10, "local_parallelism": 2})
    assert _cli("sweep", "run", str(clean)).wait(timeout=600) == 0
    for cfg in (interrupted, clean):
        assert _cli("sweep", "collect", str(cfg)).wait(timeout=300) == 0
    for table in ("behaviour.csv", "behaviour_items.csv", "comparisons.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / "collected" / table),
                                      pd.read_csv(tmp_path / "clean" / "collected" / table))
    comparisons = pd.read_csv(out / "collected" / "comparisons.csv")
    assert (comparisons.ci_low <= comparisons["diff"]).all() and (comparisons["diff"] <= comparisons.ci_high).all()


def test_a_marker_of_another_request_is_refused(tmp_path):
    cfg_path = _config(tmp_path, "other")
    cfg = from_yaml_dict(yaml.safe_load(cfg_path.read_text()))
    unit = plan_units(cfg)[0]
    unit.directory.mkdir(parents=True)
    (unit.directory / MARKER).write_text(json.dumps({"request": {"stage": "behaviour", "config": {"limit": 7}}}))
    with pytest.raises(BoxprobeError, match="another request"):
        is_done(unit)


def test_bundled_sweep_configs_load():
    from boxprobe.pipeline.sweep import load_sweep_config

    configs = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_sweep_config(path)
        assert expand_models(cfg.models)  # pairs:code becomes the paper's code pairs

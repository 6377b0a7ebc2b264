"""Issue 13, section 2: no run overwrites or mixes with another; writes are atomic; one writer per directory."""

import errno
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import boxprobe.pipeline.rundir as rundir
from boxprobe.cli import main
from boxprobe.errors import ArgumentError, ConfigError
from boxprobe.pipeline.rundir import LOCK, MARKER, RunDirError, claim_run_dir

TOY = "assets/models/toy-base"


def run_main(capsys, *argv):
    status = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    return status, out, lines[-1].removeprefix("boxprobe: error: ") if lines else ""


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")
    import boxprobe.behaviour.evaluate as evaluate
    import boxprobe.pipeline.demo as demo
    import boxprobe.probing.experiment as experiment
    for module in (evaluate, experiment, demo):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir_data")
    assert main(["generate", "--out", str(out), "--num-samples", "10", "--num-operations", "2"]) == 0
    return out / "test-subsample.jsonl"


def test_other_run_is_refused_same_config_resumes_overwrite_replaces(tmp_path):
    with claim_run_dir(tmp_path, "probe", {"models": ["a"]}):
        (tmp_path / "probe_accuracy.csv").write_text("old\n")
    assert json.loads((tmp_path / MARKER).read_text())["command"] == "probe"
    assert not (tmp_path / LOCK).exists()
    with claim_run_dir(tmp_path, "probe", {"models": ["a"]}):  # the same run resumes
        pass
    for command, config in (("probe", {"models": ["b"]}), ("demo", {"models": ["a"]})):
        with pytest.raises(RunDirError, match=r"holds a probe run with another config.*--overwrite"):
            with claim_run_dir(tmp_path, command, config):
                pass
    with claim_run_dir(tmp_path, "probe", {"models": ["b"]}, overwrite=True):
        assert not (tmp_path / "probe_accuracy.csv").exists()
        (tmp_path / "probe_accuracy.csv").write_text("new\n")
    with pytest.raises(RunDirError, match="another config"):
        with claim_run_dir(tmp_path / ".", "probe", {"models": ["a"]}):
            pass


def test_results_without_a_marker_are_protected_and_failed_runs_are_not(tmp_path):
    (tmp_path / "behaviour.csv").write_text("x\n")
    with pytest.raises(RunDirError, match=r"results of another run \(behaviour.csv\)"):
        with claim_run_dir(tmp_path, "demo", {}):
            pass
    other = tmp_path / "failed"
    with pytest.raises(ValueError):  # a run that fails before writing a result
        with claim_run_dir(other, "probe", {"layers": [99]}):
            raise ValueError("bad layer")
    with claim_run_dir(other, "probe", {"layers": [1]}):  # may be rerun with a corrected config
        pass


def test_a_second_process_is_refused_with_the_first_ones_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": rundir.socket.gethostname(),
                                                 "command": "probe", "started": "now"}))
        with pytest.raises(RunDirError, match=rf"in use by process {holder.pid} .*\(probe, since now\)"):
            with claim_run_dir(tmp_path, "probe", {}):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_run_dir(tmp_path, "probe", {}):  # its process is gone: the stale lock is taken over
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_full_disk_leaves_the_old_results_and_summary(tmp_path, monkeypatch):
    from boxprobe.behaviour.evaluate import EvalResult

    EvalResult(pd.DataFrame({"a": [1, 2]}), {"run": "old"}).save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the second file hits a full disk
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space"):
        EvalResult(pd.DataFrame({"a": range(1000)}), {"run": "new"}).save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_eval_out_file_is_refused_before_the_model_loads(capsys, tmp_path, data, no_model):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    status, _, err = run_main(capsys, "eval", "--model", TOY, "--data", data, "--out", target)
    assert status == 2 and err == f"--out {target} is a file; give a directory for the run's results."
    assert target.read_text() == "mine"


def test_second_probe_run_into_one_out_dir_is_refused_before_loading(capsys, tmp_path, data, no_model):
    out = tmp_path / "probes"
    first = tmp_path / "a.yaml"
    first.write_text(f"models: [{TOY}]\ndata: {data}\nout_dir: {out}\nlayers: [1]\n")
    with claim_run_dir(out, "probe", {}):  # the first run's results
        (out / "probe_accuracy.csv").write_text("model,layer\n")
    status, _, err = run_main(capsys, "probe", first)
    assert status == 2 and f"{out} holds a probe run with another config" in err and "--overwrite" in err


@pytest.mark.parametrize("extra, message", [
    ("layers: [99]", r"layer 99 \(layers\) does not exist in model .*toy-base.*0\.\.3"),
    ("causal_check_layer: 99", "unknown key"),
    ("Cs: []", "Cs must be a non-empty list"),
    ("Cs: [.nan]", "Cs must be a non-empty list of finite numbers > 0"),
    ("split: [0.5, 0.5, 0.5]", "split must be three fractions"),
    ("split: [0.8, 0.0, 0.2]", "split must be three fractions"),
    ("n_boot: 0", "n_boot must be >= 1"),
])
def test_probe_config_is_checked_before_any_model_loads(capsys, tmp_path, data, no_model, extra, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"models: [{TOY}]\ndata: {data}\nout_dir: {tmp_path / 'o'}\n{extra}\n")
    status, _, err = run_main(capsys, "probe", config)
    assert status == 2
    assert __import__("re").search(message, err), err


def test_demo_into_another_run_is_refused_and_overwrite_shows_only_the_new_run(tmp_path, no_model, monkeypatch):
    from boxprobe.pipeline.demo import DemoConfig, run_demo

    out = tmp_path / "run"
    with claim_run_dir(out, "demo", {"models": ["someone else's"]}):
        pd.DataFrame({"model": ["old-model"], "layer": [0], "value": [0.9], "kind": ["task"]}).to_csv(
            out / "probe_accuracy.csv", index=False)
    cfg = DemoConfig(out_dir=str(out), models=(TOY,), stages=("dashboard",), per_numops=1)
    with pytest.raises(RunDirError, match="holds a demo run with another config"):
        run_demo(cfg)
    monkeypatch.setattr("boxprobe.pipeline.demo.load_model", lambda m: __import__(
        "boxprobe.models.loading", fromlist=["x"]).load_model(m, device="cpu"))
    run_demo(cfg, overwrite=True)
    assert not (out / "probe_accuracy.csv").exists()
    assert "old-model" not in (out / "dashboard.html").read_text()

"""The command line: every failure is one line on stderr and a non-zero status; start-up stays light."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from boxprobe import cli
from boxprobe.cli import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "transformer_lens", "pandas", "plotly", "sklearn", "numpy", "yaml")


def run_main(capsys, *argv):
    """(status, stdout, stderr) of an in-process ``boxprobe`` call."""
    status = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("boxprobe: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("boxprobe: error: ")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_data")
    assert main(["generate", "--out", str(out), "--num-samples", "10", "--num-operations", "2"]) == 0
    return out


def test_generate_rejects_bad_counts_before_any_work(capsys, tmp_path):
    for flag, value, message in (("--num-samples", 0, "num_samples must be >= 1, got 0"),
                                 ("--num-samples", -5, "num_samples must be >= 1, got -5"),
                                 ("--num-operations", -1, "num_operations must be >= 0, got -1")):
        status, out, err = run_main(capsys, "generate", "--out", tmp_path / "gen", flag, value)
        assert status == 2 and one_error_line(err) == message and out == ""
    assert not (tmp_path / "gen").exists()


def test_probe_config_errors(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models: [m]\ndata: d.jsonl\nn_boot: abc\n")
    status, _, err = run_main(capsys, "probe", config)
    assert status == 2 and one_error_line(err) == f"{config}: n_boot must be an int, got 'abc' (str)."
    config.write_text("models: [m]\ndata: d.jsonl\nn_bot: 10\n")
    status, _, err = run_main(capsys, "probe", config)
    assert status == 2 and "unknown key(s) 'n_bot' (did you mean 'n_boot'?)" in one_error_line(err)
    status, _, err = run_main(capsys, "probe", tmp_path / "missing.yaml")
    assert status == 2 and one_error_line(err) == f"No config file at {tmp_path / 'missing.yaml'}."
    config.write_text("models: [m\n")  # PyYAML's message spans several lines
    status, _, err = run_main(capsys, "probe", config)
    assert status == 2 and "not valid YAML" in one_error_line(err)


def test_eval_data_file_errors(capsys, tmp_path, data_dir):
    missing = tmp_path / "nope.jsonl"
    status, _, err = run_main(capsys, "eval", "--model", "m", "--data", missing, "--out", tmp_path / "o")
    assert status == 2 and one_error_line(err).startswith(f"No data file at {missing}.")
    good = (data_dir / "test-subsample.jsonl").read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n{{not json\n")
    status, _, err = run_main(capsys, "eval", "--model", "m", "--data", bad, "--out", tmp_path / "o")
    assert status == 2 and one_error_line(err).startswith(f"{bad}:2: not valid JSON")


def test_eval_cuda_without_cuda(capsys, tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    status, _, err = run_main(capsys, "eval", "--model", "m", "--data", data_dir / "test-subsample.jsonl",
                              "--out", tmp_path / "o", "--device", "cuda")
    assert status == 2 and "device 'cuda' asked for, but CUDA is not available" in one_error_line(err)


def test_unexpected_exception_is_one_line_unless_debug(capsys, tmp_path, monkeypatch):
    def broken(args):
        raise KeyError("hook_resid_post")

    monkeypatch.setattr(cli, "_generate", broken)
    status, _, err = run_main(capsys, "generate", "--out", tmp_path)
    assert status == 1
    assert one_error_line(err) == "unexpected KeyError: 'hook_resid_post' (run with --debug for the traceback)"
    for argv in (("--debug", "generate", "--out", tmp_path), ("generate", "--out", tmp_path, "--debug")):
        status, _, err = run_main(capsys, *argv)
        assert status == 1 and "Traceback (most recent call last)" in err and "in broken" in err
        assert err.strip().splitlines()[-1].startswith("boxprobe: error: unexpected KeyError")


def test_os_errors_and_interrupts(capsys, tmp_path, monkeypatch):
    def full_disk(args):
        raise OSError(28, "No space left on device", "runs/x/shard.safetensors")

    monkeypatch.setattr(cli, "_generate", full_disk)
    status, _, err = run_main(capsys, "generate", "--out", tmp_path)
    assert status == 1 and one_error_line(err) == "No space left on device: runs/x/shard.safetensors"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_generate", interrupted)
    status, _, err = run_main(capsys, "generate", "--out", tmp_path)
    assert status == 130 and err.strip() == "boxprobe: interrupted"


def test_eval_limit_and_batch_size_are_checked_by_the_parser(capsys, tmp_path):
    for flag in ("--limit", "--batch-size"):
        with pytest.raises(SystemExit) as info:
            main(["eval", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path), flag, "0"])
        assert info.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_eval_passes_chat(monkeypatch, tmp_path, capsys):
    import boxprobe.behaviour.evaluate as evaluate

    seen = {}

    def fake_evaluate_file(*args, **kwargs):
        seen.update(kwargs)
        raise evaluate.ConfigError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_file", fake_evaluate_file)
    run_main(capsys, "eval", "--model", "m", "--data", "d.jsonl", "--out", tmp_path, "--chat")
    assert seen["chat"] is True
    run_main(capsys, "eval", "--model", "m", "--data", "d.jsonl", "--out", tmp_path, "--no-chat")
    assert seen["chat"] is False
    run_main(capsys, "eval", "--model", "m", "--data", "d.jsonl", "--out", tmp_path)
    assert seen["chat"] is None  # unset: the checkpoint's boxprobe.json decides


def test_demo_stages_match_the_pipeline():
    from boxprobe.pipeline.demo import STAGES

    assert cli.DEMO_STAGES == STAGES


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_startup_is_light_and_fast():
    code = f"import sys, boxprobe.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert loaded.stdout.strip() == "[]"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "boxprobe", "--help"], capture_output=True, text=True, env=_env())
    elapsed = time.perf_counter() - started
    assert done.returncode == 0 and "generate" in done.stdout
    assert elapsed < 4.0, f"boxprobe --help took {elapsed:.1f} s"  # ~0.1 s idle; generous for a loaded machine


@pytest.mark.parametrize("command", ["eval", "circuit", "demo", "probe", "probe-config"])
def test_placement_flags_reach_load_model(command, capsys, tmp_path, data_dir, monkeypatch):
    """Every command that loads a model takes the same placement flags (or a config's ``load``) and hands
    them to load_model as they are."""
    import boxprobe.models.loading as loading
    import boxprobe.pipeline.demo as demo
    import boxprobe.probing.experiment as experiment
    from boxprobe.config import ConfigError

    seen = []

    def fake_load_model(name, **kwargs):
        seen.append(kwargs)
        raise ConfigError("stop here")

    for module in (loading, demo, experiment):
        monkeypatch.setattr(module, "load_model", fake_load_model)
    device_map = '{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": "cpu"}'
    flags = ["--device-map", device_map, "--max-memory", '{"cpu": "2GiB"}', "--dtype", "float32",
             "--offload-folder", tmp_path / "off"]
    expected = {"device_map": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                               "lm_head": "cpu"}, "max_memory": {"cpu": "2GiB"}, "dtype": "float32",
                "offload_folder": str(tmp_path / "off")}
    data = data_dir / "test-subsample.jsonl"
    if command == "eval":
        argv = ["eval", "--model", "m", "--data", data, "--out", tmp_path / "out", *flags]
    elif command == "circuit":
        argv = ["circuit", "--model", "m", "--data", data, "--out", tmp_path / "out", *flags]
    elif command == "demo":
        argv = ["demo", "--out", tmp_path / "out", "--models", "m", *flags]
    else:
        config = tmp_path / "probe.yaml"
        load = "" if command == "probe" else (
            "load:\n  device_map: {model.embed_tokens: cpu, model.layers.0: cpu, model.layers.1: disk, lm_head: cpu}\n"
            "  max_memory: {cpu: 2GiB}\n  dtype: float32\n" f"  offload_folder: {tmp_path / 'off'}\n")
        config.write_text(f"models: [m]\ndata: {data}\nout_dir: {tmp_path / 'out'}\ntrain_limit: 5\n{load}")
        argv = ["probe", config, *(flags if command == "probe" else [])]
    status, _, err = run_main(capsys, *argv)
    assert status == 2 and "stop here" in err, err
    assert seen and seen[0] == expected

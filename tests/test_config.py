"""from_dict checks value types against the dataclass's hints, and its errors name the file, key and type."""

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from boxprobe.config import ConfigError, from_dict, load_yaml_config
from boxprobe.errors import BoxprobeError
from boxprobe.pipeline.demo import DemoConfig
from boxprobe.probing.experiment import ProbeExperimentConfig

REPO = Path(__file__).resolve().parents[1]
BASE = {"models": ["m"], "data": "d.jsonl"}


@pytest.mark.parametrize("key, value, message", [
    ("n_boot", "abc", "toy.yaml: n_boot must be an int, got 'abc' (str)."),
    ("n_boot", True, "n_boot must be an int, got True (bool)"),
    ("n_boot", 2.5, "n_boot must be an int, got 2.5 (float)"),
    ("limit", "all", "limit must be an int or None, got 'all' (str)"),
    ("Cs", [0.1, "x"], "Cs[1] must be a number, got 'x' (str)"),
    ("Cs", 0.1, "Cs must be a list of number values, got 0.1 (float)"),
    ("Cs", ["1e-3"], "write 1.0e-3"),
    ("split", [0.5, 0.5], "split must be a list of 3 values"),
    ("models", [1], "models[0] must be a str, got 1 (int)"),
    ("data", ["a.jsonl"], "data must be a str, got ['a.jsonl'] (list)"),
    ("device", 0, "device must be a str or None, got 0 (int)"),
])
def test_probe_config_rejects_wrong_types(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(ProbeExperimentConfig, {**BASE, key: value}, where="experiments/probes/toy.yaml")


def test_probe_config_converts_and_accepts():
    cfg = from_dict(ProbeExperimentConfig, {**BASE, "Cs": [1, 0.5], "split": [0.6, 0.2, 0.2], "limit": None,
                                            "models": "only-one"})
    assert cfg.Cs == (1.0, 0.5) and isinstance(cfg.Cs[0], float) and cfg.split == (0.6, 0.2, 0.2)
    assert cfg.models == ("only-one",)  # a bare string is one model, not its characters


def test_probe_config_limits_and_required_keys():
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        from_dict(ProbeExperimentConfig, {**BASE, "limit": -3})
    with pytest.raises(ConfigError, match="missing required key\\(s\\) 'data'"):
        from_dict(ProbeExperimentConfig, {"models": ["m"]}, where="x.yaml")


def test_demo_config_types():
    assert DemoConfig.from_dict({"per_numops": 3, "threads": None}).threads is None
    for data, message in (({"per_numops": "3"}, "per_numops must be an int, got '3' (str)"),
                          ({"threads": 1.0}, "threads must be an int or None, got 1.0 (float)"),
                          ({"stages": ["behaviour", 2]}, "stages[1] must be a str, got 2 (int)"),
                          ({"models": {"a": 1}}, "models must be a list of str values")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            DemoConfig.from_dict(data)


def test_literal_nested_and_bool():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        lr: float = 1.0

    @dataclasses.dataclass(frozen=True)
    class Outer:
        mode: Literal["a", "b"] = "a"
        flag: bool = False
        inner: Inner = Inner()
        phases: tuple[Inner, ...] = ()

    cfg = from_dict(Outer, {"mode": "b", "flag": True, "inner": {"lr": 2}, "phases": [{"lr": 3}, {}]})
    assert cfg.inner == Inner(2.0) and cfg.phases == (Inner(3.0), Inner())
    cases = (({"mode": "c"}, "mode must be one of 'a', 'b', got 'c'"), ({"flag": 1}, "flag must be a bool"),
             ({"inner": {"lr": "x"}}, "f.yaml.inner: lr must be a number"),
             ({"inner": {"lrr": 1}}, "did you mean 'lr'"), ({"phases": [{"lr": None}]}, r"phases\[0\]: lr must be"))
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            from_dict(Outer, data, where="f.yaml")


def test_bundled_probe_configs_load():
    paths = sorted((REPO / "experiments" / "probes").glob("*.yaml"))
    assert paths
    for path in paths:
        assert load_yaml_config(ProbeExperimentConfig, path).models


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [m]\ndata: d.jsonl\nn_boot: abc\n")
    with pytest.raises(ConfigError, match=f"{bad}: n_boot must be an int, got 'abc'"):
        load_yaml_config(ProbeExperimentConfig, bad)
    with pytest.raises(FileNotFoundError, match="No config file") as info:
        load_yaml_config(ProbeExperimentConfig, tmp_path / "nope.yaml")
    assert isinstance(info.value, BoxprobeError)
    bad.write_text("models: [m\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_config(ProbeExperimentConfig, bad)

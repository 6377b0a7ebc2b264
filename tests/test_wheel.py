"""The wheel is enough on its own: built, unpacked off the source tree, its CLI generates data and evaluates a model.

Guards the package data (templates, vocabularies) and any path that silently leans on the repository.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from boxprobe.models.toy import ModelShape, save_random_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The built wheel unpacked into a folder (importable like site-packages, not an editable install)."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build writes build/ and *.egg-info into the checkout.
    src = root / "src"
    shutil.copytree(REPO / "boxprobe", src / "boxprobe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("boxprobe-*.whl")
    site = root / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert any(n.startswith("boxprobe/data/templates/") and n.endswith(".json") for n in names)
    assert any(n.startswith("boxprobe/data/vocab/") and n.endswith(".txt") for n in names)
    assert not any(n.startswith(("assets/", "tests/", "experiments/")) for n in names)
    return site


def boxprobe(site: Path, cwd: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "boxprobe", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_wheel_generates_and_evaluates(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import boxprobe; print(boxprobe.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed), where

    done = boxprobe(installed, work, "generate", "--out", "data", "--num-samples", "10")
    assert done.returncode == 0, done.stderr
    assert (work / "data" / "test-subsample.jsonl").stat().st_size > 0

    model = save_random_checkpoint(tmp_path / "toy", ModelShape(n_layers=1, d_model=32, n_heads=2, d_mlp=64))
    done = boxprobe(installed, work, "eval", "--model", model, "--data", "data/test-subsample.jsonl", "--out", "out",
                    "--limit", "7", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert (work / "out" / "summary.json").exists() and (work / "out" / "results.csv").exists()


def test_wheel_demo_without_bundled_models_says_so(installed, tmp_path):
    done = boxprobe(installed, tmp_path, "demo", "--out", "run")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("boxprobe: error: The bundled toy model(s) toy-base, toy-code, toy-control are not in ")
    assert "source repository" in lines[0] and "--models" in lines[0]
    assert not (tmp_path / "run").exists()

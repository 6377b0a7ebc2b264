"""The README's Python examples run as written (on the bundled toy checkpoints)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "./setup.sh && .venv/bin/boxprobe demo --out runs/demo" in text
    test_command = "./setup.sh && .venv/bin/python -m pytest -q"
    assert test_command in text
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_python_examples_run(tmp_path, monkeypatch):
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "probes" / "probe_accuracy.csv").exists()
    assert set(namespace["cmap"].metric) == {"accuracy", "correct_prob", "prob_change", "logit_diff", "logprob"}
    assert set(namespace["cmap"].stage) == {"before", "after", "donor"}
    assert namespace["result"].summary["n_by_numops"]

"""The probe benchmark script runs and reports in the documented format (no timing is asserted)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_probe_speed_reports_ratio_and_gaps():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "probe_speed.py"), "--n-items", "300", "--n-layers", "2",
         "--repeats", "1"], capture_output=True, text=True, check=True, timeout=300).stdout
    lines = out.strip().splitlines()
    assert re.fullmatch(r"ratio=\d+\.\d\d accuracy_gap=\d+\.\d\d", lines[-1])
    ours_gap = float(re.search(r"ours (\d+\.\d+)", lines[-2]).group(1))
    assert ours_gap <= 1.0  # the batched probe lands on the float64 optimum's predictions


def test_eval_speed_reports_ratio_agreement_and_token_ratio():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_speed.py"), "--model", str(ROOT / "assets" / "models" / "toy-base"),
         "--template", "toy", "--queries", "16", "--batch-size", "8"],
        capture_output=True, text=True, check=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout  # this checkout's boxprobe, not an installed one
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio=\d+\.\d\d agreement=\d\.\d{4} token_ratio=\d+\.\d\d", last)
    assert float(re.search(r"agreement=(\S+)", last).group(1)) == 1.0  # same greedy answers, same verdicts
    assert float(re.search(r"token_ratio=(\S+)", last).group(1)) > 1.0

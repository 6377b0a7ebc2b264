"""The toy pretraining lab is an experiment (``experiments/toy_pretraining/lab``), not part of the library."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "toy_pretraining"))

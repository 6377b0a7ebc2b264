"""The shipped toy checkpoints load like any checkpoint and copy box contents (numops 0)."""

from pathlib import Path

import pytest

from boxprobe.behaviour.evaluate import EvalConfig, evaluate
from boxprobe.data.queries import prepare
from boxprobe.models.loading import load_model, model_info
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples

MODELS = Path(__file__).resolve().parents[2] / "assets" / "models"


@pytest.fixture(scope="module")
def numops_zero_examples():
    cfg = TaskConfig(num_samples=40, seed=99)
    examples = [ex for seq in generate_sequences(cfg) for ex in sequence_examples(seq, cfg)]
    return [ex for ex in examples if ex.numops == 0 and ex.num_operations >= 2][:40]


@pytest.mark.parametrize("name", ["toy-base", "toy-code", "toy-control"])
def test_bundled_checkpoint_loads_and_answers_numops_zero(name, numops_zero_examples):
    model = load_model(MODELS / name)
    info = model_info(model)
    assert info.metadata["prompt_template"] == "toy" and info.prompt_format == "per-box"
    assert (MODELS / name / "README.md").exists()
    result = evaluate(model, prepare(model, numops_zero_examples), EvalConfig(method="generate", progress=False))
    # Copying a box's initial description is what every bundled model has learnt.
    assert result.frame["correct"].mean() >= 0.8
    assert result.frame["correct"].iloc[0]


def test_bundled_checkpoints_fit_the_size_budget():
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total <= 30 * 2**20

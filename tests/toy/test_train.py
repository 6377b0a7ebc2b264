"""A short schedule runs the whole recipe, resumes, and yields a checkpoint that load_model loads."""

import dataclasses
import json

import torch

from boxprobe.models.loading import load_model
from lab.train import ModelShape, Phase, TrainConfig, train

TINY = ModelShape(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=512)


def short_recipe(out_dir, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        out_dir=str(out_dir), model=TINY, batch_size=4, eval_every=2, eval_documents=4, warmup_steps=2,
        phases=(Phase(num_boxes=3, max_operations=0, until_accuracy=0.9), Phase(num_boxes=7, max_operations=2, tokens=800),
                Phase(num_boxes=7, max_operations=12)),
        total_tokens=3000, checkpoint_every_s=0.0)
    return dataclasses.replace(cfg, **overrides)


def test_short_schedule_trains_and_loads_through_load_model(tmp_path):
    checkpoint = train(short_recipe(tmp_path / "base"))
    meta = json.loads((checkpoint / "boxprobe.json").read_text())
    assert meta["prompt_template"] == "toy" and meta["prompt_format"] == "per-box"
    assert meta["training"]["progress"]["tokens"] >= 3000
    history = json.loads((tmp_path / "base" / "history.json").read_text())
    assert history and history[0]["loss"] > 0

    model = load_model(checkpoint)
    tokens = model.to_tokens("Description: Box 0 contains the apple.\nStatement: Box 0 contains")
    with torch.inference_mode():
        logits = model(tokens)
    assert logits.shape[-1] == len(model.tokenizer)
    assert torch.isfinite(logits).all()

    # The code continuation starts from the base checkpoint and keeps its tokenizer.
    code = train(short_recipe(tmp_path / "code", init_from=str(checkpoint), code_fraction=0.5, total_tokens=1500))
    assert (code / "model.safetensors").exists()
    assert json.loads((code / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((checkpoint / "tokenizer.json").read_text())["model"]["vocab"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole = train(short_recipe(tmp_path / "whole", total_tokens=2000))
    # Stop after the first step, then resume to the same budget.
    train(short_recipe(tmp_path / "parts", total_tokens=2000, max_seconds=0.0))
    parts = train(short_recipe(tmp_path / "parts", total_tokens=2000))
    from safetensors.torch import load_file
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_sigterm_saves_and_stops_resumably(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, dataclasses; sys.path.insert(0, sys.argv[2]); from test_train import short_recipe; "
            "from lab.train import train; train(short_recipe(sys.argv[1], total_tokens=10**9))")
    lab_dir = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "toy_pretraining")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([lab_dir, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), os.path.dirname(__file__)], env=env)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "history.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert 0 < state["progress"]["tokens"] < 10**9

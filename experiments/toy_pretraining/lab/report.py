"""Evaluation, model cards and the +code vs +control comparison of the toy checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from boxprobe.behaviour.evaluate import EvalConfig, evaluate
from boxprobe.data.queries import prepare
from boxprobe.models.loading import load_model
from boxprobe.report.plots import behaviour_accuracy
from boxprobe.behaviour.scoring import accuracy_by_numops
from boxprobe.data.task import Example

TOY_MODELS = ("toy-base", "toy-code", "toy-control")


def always_nothing_by_numops(examples: Sequence[Example]) -> pd.DataFrame:
    """Accuracy of always answering "nothing": the share of empty boxes at each numops."""
    frame = pd.DataFrame({"numops": [ex.numops for ex in examples], "correct": [ex.gold == "nothing" for ex in examples]})
    table = accuracy_by_numops(frame)
    return table.rename(columns={"accuracy": "always_nothing"})[["numops", "n", "always_nothing"]]


def evaluate_checkpoints(checkpoints: dict[str, str | Path], examples: Sequence[Example], batch_size: int = 64,
                         progress: bool = True) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Per-numops accuracy (with 95% intervals) of each checkpoint, as one tidy frame, plus summaries."""
    tables, summaries = [], {}
    for name, path in checkpoints.items():
        model = load_model(path)
        result = evaluate(model, prepare(model, examples), EvalConfig(batch_size=batch_size, progress=progress))
        summaries[name] = result.summary
        tables.append(accuracy_by_numops(result.frame).assign(model=name))
    return pd.concat(tables, ignore_index=True), summaries


def quality_checks(accuracy: pd.DataFrame, baseline: pd.DataFrame, model: str = "toy-base") -> dict[str, bool]:
    """Issue 3's bar: >= 90% at numops 0, and at numops 1-3 at least twice always-"nothing"."""
    acc = accuracy[accuracy.model == model].set_index("numops")["accuracy"]
    base = baseline.set_index("numops")["always_nothing"]
    checks = {"numops 0 >= 0.90": bool(acc.get(0, 0) >= 0.9)}
    for k in (1, 2, 3):
        checks[f"numops {k} >= 2x always-nothing"] = bool(acc.get(k, 0) >= 2 * base.get(k, 1))
    return checks


def accuracy_figure(accuracy: pd.DataFrame, baseline: pd.DataFrame) -> go.Figure:
    """Accuracy by numops of the toy models, with the always-"nothing" baseline."""
    fig = behaviour_accuracy(accuracy, overlay_paper=False, title="Toy checkpoints: accuracy by number of operations")
    fig.add_trace(go.Scatter(x=baseline.numops, y=baseline.always_nothing, name='always "nothing"',
                             mode="lines", line={"dash": "dot", "color": "gray"}))
    return fig


def markdown_table(accuracy: pd.DataFrame, baseline: pd.DataFrame) -> str:
    """numops columns; one row per model (accuracy [95% CI]) and one for always-"nothing"."""
    numops = sorted(accuracy.numops.unique())
    lines = ["| model | " + " | ".join(str(k) for k in numops) + " |", "|---" * (len(numops) + 1) + "|"]
    for model, rows in accuracy.groupby("model", sort=False):
        rows = rows.set_index("numops")
        cells = [f"{rows.accuracy[k]:.2f} [{rows.ci_low[k]:.2f}, {rows.ci_high[k]:.2f}]" for k in numops]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    base = baseline.set_index("numops")
    lines.append('| always "nothing" | ' + " | ".join(f"{base.always_nothing[k]:.2f}" for k in numops) + " |")
    lines.append("| n | " + " | ".join(str(int(base.n[k])) for k in numops) + " |")
    return "\n".join(lines)


def model_card(name: str, checkpoint: str | Path, accuracy: pd.DataFrame, baseline: pd.DataFrame,
               description: str, data_note: str) -> str:
    """A model card in Markdown, from the checkpoint's boxprobe.json and its evaluation."""
    meta = json.loads((Path(checkpoint) / "boxprobe.json").read_text())
    training = meta.get("training", {})
    cfg, progress = training.get("config", {}), training.get("progress", {})
    shape = cfg.get("model", {})
    return f"""# {name}

{description}

A `LlamaForCausalLM` ({shape.get('n_layers')} layers, d_model {shape.get('d_model')}, {shape.get('n_heads')} heads,
MLP {shape.get('d_mlp')}, tied embeddings) with boxprobe's word-level toy tokenizer, saved in Hugging Face
format. Load it like any checkpoint: `boxprobe.models.load_model("assets/models/{name}")`. Its
`boxprobe.json` records the prompt it was trained on (template `{meta.get('prompt_template')}`, format
`{meta.get('prompt_format')}`: `Description: ...` then `Statement: Box k contains`), which
`boxprobe eval` uses by default.

## Training
- Data mix: {data_note}
- Tokens: {progress.get('tokens', 0):,} in {progress.get('step', 0):,} steps of {cfg.get('batch_size')} documents
  (this stage; see `boxprobe.json` for the whole config).
- Recipe: AdamW, learning rate {cfg.get('learning_rate')}, betas {cfg.get('betas')}, weight decay
  {cfg.get('weight_decay')}, {cfg.get('warmup_steps')} warm-up steps; loss weight {cfg.get('weights', {}).get('answer')}
  on answers, {cfg.get('weights', {}).get('context')} on context, {cfg.get('weights', {}).get('query')} on the query prompt.
  Curriculum (boxes : max operations): {', '.join(f"{p['num_boxes']}:{p['max_operations']}" for p in cfg.get('phases', []))},
  with {cfg.get('replay_prob')} replay of earlier phases. Continued from: `{cfg.get('init_from')}`.
- Seed: {cfg.get('seed')}.
- Hardware: {training.get('hardware')}; wall time {progress.get('wall_s', 0) / 60:.1f} minutes.
- Reproduce: `python experiments/toy_pretraining/train.py experiments/toy_pretraining/<config>.yaml`
  (see `experiments/toy_pretraining/README.md`).

## Accuracy by number of operations (greedy exact match, 95% normal intervals)
{markdown_table(accuracy[accuracy.model == name], baseline)}

Against always answering "nothing" (the bar for toy-base: at least 2x at numops 1, 2 and 3, and
at least 0.90 at numops 0): {_ratios(accuracy[accuracy.model == name], baseline)}.
Evaluated on a fresh standard test subsample (`boxprobe generate` defaults, seed 2255) by
`experiments/toy_pretraining/report.py`.
"""


def _ratios(accuracy: pd.DataFrame, baseline: pd.DataFrame) -> str:
    merged = accuracy.merge(baseline, on="numops")
    return ", ".join(f"numops {int(r.numops)}: {r.accuracy / r.always_nothing:.2f}x" for r in merged.itertuples())

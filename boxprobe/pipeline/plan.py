"""``boxprobe plan``: size a run from the model's shape before renting GPUs.

From a :class:`~boxprobe.models.shapes.ModelShape` (typed in for the registry's models, read from
``config.json`` for a local checkpoint) and the dataset's prompt lengths, :func:`make_plan` estimates:

- weight memory per dtype, and how many GPUs of a kind hold the model with its working memory;
- the key-value cache of one prompt and of one batch (the shared prefix of a context expanded to its
  queries, as :func:`boxprobe.behaviour.decoding.prefix_cache` does);
- the activation cache on disk for the chosen roles, layers and storage dtype;
- peak activation memory of one forward pass at the batch size, with logits at every position (what a
  plain forward computes) and at the read positions only;
- forward FLOPs and wall time per stage: the larger of compute time at an assumed utilisation and the
  time to stream the weights from memory once per forward pass.

Everything is an estimate from formulas, labelled as such in the ``basis`` column; token counts are
exact when the checkpoint's tokenizer is on disk and ``chars / CHARS_PER_TOKEN`` otherwise. A model
spread over GPUs with a device map runs its blocks one after another, so more GPUs add memory, not speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import pandas as pd

from boxprobe.config import check_choice
from boxprobe.errors import ArgumentError, ConfigError
from boxprobe.models.shapes import ModelShape, model_shape

STAGES = ("eval", "cache", "probe", "patch")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
# Characters per token of boxes prompts where no tokenizer is at hand: SmolLM2's 49k BPE gives 3.9 on the
# default template; Llama's 32k SentencePiece splits a little finer.
CHARS_PER_TOKEN = 3.5
# Rows one per-box query contributes to each role of the activation cache (2-shot default template,
# 7 boxes): the description's roles are stored once per context of 7 queries (cache.CONTEXT_ROLES).
ROWS_PER_QUERY = {"query_last": 1, "query_box": 1, "answer_prefix": 2, "answer_object": 2, "box_mention": 30 / 7,
                  "object_first": 40 / 7, "object_last": 40 / 7, "state_end": 3 / 7, "op_end": 12 / 7}
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """An accelerator: usable memory and dense bf16 tensor throughput, from the vendor's datasheet."""

    name: str
    memory_gib: float
    bf16_flops: float
    bandwidth: float
    """Memory bandwidth in bytes/s."""


GPUS = {
    "h100-80gb": GPU("NVIDIA H100 SXM 80GB", 80, 989e12, 3.35e12),
    "h200-141gb": GPU("NVIDIA H200 SXM 141GB", 141, 989e12, 4.8e12),
    "a100-80gb": GPU("NVIDIA A100 SXM 80GB", 80, 312e12, 2.04e12),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40, 312e12, 1.56e12),
    "l40s-48gb": GPU("NVIDIA L40S 48GB", 48, 362e12, 0.864e12),
}


@dataclass(frozen=True)
class PlanConfig:
    """What to size: the model, the stages, the hardware and the workload."""

    model: str
    """Registry name or local checkpoint directory."""
    stages: tuple[str, ...] = STAGES
    """Among eval, cache, probe, patch."""
    gpu: str = "h100-80gb"
    """A key of ``GPUS``."""
    dtype: str = "bfloat16"
    """Dtype the model runs in."""
    data: str | None = None
    """Boxes JSONL file; None: a generated sample of the default task for prompt lengths."""
    n_queries: int | None = None
    """Queries to plan for; None: those of ``data``, else 800 (100 per numops, the paper's subsample)."""
    batch_size: int = 16
    """Queries per forward pass."""
    roles: tuple[str, ...] = ("query_last",)
    """Cached roles."""
    layers: tuple[int, ...] | None = None
    """Cached layers (None: all)."""
    store_dtype: str = "bfloat16"
    """Dtype of cached activations on disk."""
    patch_pairs: int = 50
    """Clean/corrupt pairs per patching sweep."""
    patch_positions: int = 3
    """Positions patched per layer."""
    utilisation: float = 0.35
    """Fraction of the GPU's peak FLOPs assumed for forward passes."""

    def __post_init__(self) -> None:
        for s in self.stages:
            check_choice("stage", s, STAGES)
        check_choice("gpu", self.gpu, GPUS)
        check_choice("dtype", self.dtype, DTYPE_BYTES)
        check_choice("store_dtype", self.store_dtype, ("float32", "bfloat16", "float16"))
        if self.batch_size < 1 or (self.n_queries is not None and self.n_queries < 1):
            raise ConfigError("batch_size and n_queries must be >= 1.")


@dataclass
class Workload:
    """Token counts of the planned queries."""

    n_queries: int
    prompt_tokens: float
    gold_tokens: float
    max_tokens: int
    queries_per_context: float
    shared_tokens: float
    basis: str


def _workload(cfg: PlanConfig) -> Workload:
    from boxprobe.data.prompts import build_queries, load_template
    from boxprobe.data.task import TaskConfig, generate_sequences, read_examples, sequence_examples

    if cfg.data is not None:
        examples = read_examples(cfg.data)
    else:
        task = TaskConfig(num_samples=20)
        examples = [e for s in generate_sequences(task) for e in sequence_examples(s, task)]
    queries = build_queries(examples, load_template("default"))
    n = cfg.n_queries or (len(queries) if cfg.data is not None else 800)
    sample = queries[:: max(1, len(queries) // 200)]
    count, basis = _counter(cfg.model)
    prompt = np.array([count(q.prompt) for q in sample], dtype=float)
    gold = np.array([count(q.continuation) for q in sample], dtype=float)
    contexts = len({q.examples[0].context for q in queries})
    # The prompt up to the description's end is shared by a context's queries; only the statement differs.
    statement = np.array([count(q.prompt[q.prompt.rfind("\n"):]) for q in sample], dtype=float)
    return Workload(n, float(prompt.mean()), float(gold.mean()), int((prompt + gold).max()),
                    len(queries) / max(contexts, 1), float((prompt - statement).mean()), basis)


def _counter(model: str):
    """A token counter: the checkpoint's tokenizer when on disk, else characters / CHARS_PER_TOKEN."""
    if Path(model).is_dir():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
            return (lambda text: len(tok(text)["input_ids"])), "tokenizer"
        except (OSError, ValueError):
            pass
    return (lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)), f"chars/{CHARS_PER_TOKEN}"


def forward_flops(shape: ModelShape, tokens: float, context: float, logits_positions: float) -> float:
    """FLOPs of a forward pass over ``tokens`` tokens attending to ``context`` tokens on average, with
    ``logits_positions`` positions unembedded (2 FLOPs per multiply-add)."""
    per_layer = (shape.d_model * shape.d_head * (2 * shape.n_heads + 2 * shape.n_kv_heads)
                 + 3 * shape.d_model * shape.d_mlp)
    attention = 2 * shape.n_heads * shape.d_head * context  # scores and weighted values
    return 2 * tokens * shape.n_layers * (per_layer + attention) + 2 * logits_positions * shape.d_model * shape.vocab


def activation_peak(shape: ModelShape, batch: int, seq: int, dtype_bytes: float, logits_positions: int) -> float:
    """Bytes of the largest live activations in one forward pass (one block at a time): the residual
    stream and its normed copy, attention scores (eager attention), the gated MLP's hidden tensors, and
    the logits (float32) of ``logits_positions`` positions per row."""
    resid = 3 * batch * seq * shape.d_model * dtype_bytes
    scores = 2 * batch * shape.n_heads * seq * seq * dtype_bytes
    mlp = 3 * batch * seq * shape.d_mlp * dtype_bytes
    logits = batch * logits_positions * shape.vocab * 4
    return resid + max(scores, mlp) + logits


@dataclass
class Plan:
    """The estimates as a tidy frame: stage, quantity, value, unit, basis."""

    config: PlanConfig
    shape: ModelShape
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)

    def text(self) -> str:
        s, c, gpu = self.shape, self.config, GPUS[self.config.gpu]
        head = (f"plan for {c.model} on {gpu.name} ({gpu.memory_gib:g} GiB), {c.dtype}, batch {c.batch_size}\n"
                f"shape: {s.n_layers} layers, d_model {s.d_model}, {s.n_heads} heads / {s.n_kv_heads} kv heads "
                f"(d_head {s.d_head}), d_mlp {s.d_mlp}, vocab {s.vocab}, {s.params / 1e9:.2f}B parameters\n"
                f"source: {s.source}\n")
        shown = self.frame.drop(columns="model").assign(value=self.frame["value"].map(lambda v: f"{v:,.4g}"))
        return head + shown.to_string(index=False)


def make_plan(cfg: PlanConfig) -> Plan:
    """Estimate memory, disk, FLOPs and time of ``cfg.stages`` for ``cfg.model`` on ``cfg.gpu``."""
    shape, gpu, work = model_shape(cfg.model), GPUS[cfg.gpu], _workload(cfg)
    b, nbytes, store = cfg.batch_size, DTYPE_BYTES[cfg.dtype], DTYPE_BYTES[cfg.store_dtype]
    rows: list[tuple] = []

    def add(stage, quantity, value, unit, basis="formula"):
        rows.append((stage, quantity, float(value), unit, basis))

    for name, size in DTYPE_BYTES.items():
        add("weights", f"weights {name}", shape.params * size / GIB, "GiB")
    weights = shape.params * nbytes
    seq = work.max_tokens
    kv_prompt = shape.kv_bytes_per_token(nbytes) * work.prompt_tokens
    kv_batch = shape.kv_bytes_per_token(nbytes) * b * seq
    add("kv", "kv cache per prompt", kv_prompt / GIB, "GiB", work.basis)
    add("kv", f"kv cache per batch of {b}", kv_batch / GIB, "GiB", work.basis)
    add("kv", "mean prompt tokens", work.prompt_tokens, "tokens", work.basis)
    add("kv", "longest prompt+gold", seq, "tokens", work.basis)
    peak_all = activation_peak(shape, b, seq, nbytes, seq)
    peak_read = activation_peak(shape, b, seq, nbytes, 1)
    add("memory", "activation peak, logits at every position", peak_all / GIB, "GiB")
    add("memory", "activation peak, logits at read positions", peak_read / GIB, "GiB")
    usable = gpu.memory_gib * GIB * 0.95  # the CUDA context and allocator fragmentation take the rest
    n_gpus = next((n for n in range(1, 65) if weights / n + kv_batch / n + peak_all <= usable), None)
    add("memory", f"{cfg.gpu} needed", n_gpus if n_gpus is not None else float("nan"), "GPUs",
        "weights and kv split evenly, one block's activations on each")

    reuse_tokens = work.n_queries / work.queries_per_context * work.shared_tokens + work.n_queries * (
        work.prompt_tokens - work.shared_tokens + work.gold_tokens)
    context = (work.prompt_tokens + work.gold_tokens) / 2

    def timing(stage: str, tokens: float, forwards: float, logits_positions: float) -> None:
        flops = forward_flops(shape, tokens, context, logits_positions)
        seconds = max(flops / (gpu.bf16_flops * cfg.utilisation), forwards * weights / gpu.bandwidth)
        add(stage, "forward tokens", tokens, "tokens", work.basis)
        add(stage, "FLOPs", flops, "FLOP")
        add(stage, "wall time", seconds / 60, "min", f"max(compute at {cfg.utilisation:.0%} of peak, weights "
            "read once per forward)")

    n_batches = math.ceil(work.n_queries / b)
    if "eval" in cfg.stages:
        timing("eval", reuse_tokens, n_batches * 2, reuse_tokens)  # prefix pass + suffix pass per batch
    if "cache" in cfg.stages:
        layers = list(range(shape.n_layers)) if cfg.layers is None else list(cfg.layers)
        if any(not 0 <= layer < shape.n_layers for layer in layers):
            raise ArgumentError(f"layers must lie in 0..{shape.n_layers - 1} for {cfg.model}")
        rows_per_query = sum(ROWS_PER_QUERY.get(r, 1) for r in cfg.roles)
        disk = work.n_queries * rows_per_query * len(layers) * shape.d_model * store
        add("cache", "activation cache on disk", disk / GIB, "GiB", "rows per role: ROWS_PER_QUERY")
        depth = (max(layers) + 1) / shape.n_layers  # the pass stops after the last cached layer
        timing("cache", reuse_tokens * depth, n_batches * 2 * depth, 0)
    if "probe" in cfg.stages:
        rows_per_query = sum(ROWS_PER_QUERY.get(r, 1) for r in cfg.roles)
        per_layer = work.n_queries * rows_per_query * shape.d_model * store
        add("probe", "features per layer in RAM", per_layer / GIB, "GiB", f"stored dtype {cfg.store_dtype}")
        add("probe", "features of all layers as float32", per_layer * shape.n_layers * 4 / store / GIB, "GiB",
            "what loading every layer at once would take")
    if "patch" in cfg.stages:
        sites = shape.n_layers * cfg.patch_positions
        tokens = sites * cfg.patch_pairs * work.prompt_tokens
        source = 2 * cfg.patch_pairs * work.prompt_tokens * shape.d_model * nbytes
        add("patch", "patched activations, every layer", source * shape.n_layers / GIB, "GiB",
            "clean and corrupt resid_pre of all layers")
        add("patch", "patched activations, one layer", source / GIB, "GiB", "only the layer being patched")
        timing("patch", tokens, sites * math.ceil(cfg.patch_pairs / b), sites * cfg.patch_pairs)
    frame = pd.DataFrame(rows, columns=["stage", "quantity", "value", "unit", "basis"])
    frame.insert(0, "model", cfg.model)
    return Plan(cfg, shape, frame)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"all"``/None, ``"0-7"`` or ``"3,5,9"`` as layer indices."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ArgumentError(f"layers {text!r}: write 'all', a range like 0-7, or a list like 3,5,9") from None
    return tuple(out)

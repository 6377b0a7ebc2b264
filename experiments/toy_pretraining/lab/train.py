"""Training of the toy checkpoints: a curriculum over boxes and operations, resumable and seeded.

The recipe follows the feasibility study in issue 3: a small Llama, answers weighted 1, context
0.1, query prompt 0; a curriculum that starts with few boxes and no operations, with replay of
earlier phases. Phases end by accuracy (measured on a fixed, seeded evaluation batch) or by token
budget, never by wall time, so a run is reproducible from its config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lab.corpus import CorpusWeights, Segment, boxes_document, code_document
from boxprobe.models.toy import ModelShape, build_model, build_tokenizer, save_checkpoint, save_random_checkpoint  # noqa: F401

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: documents of ``num_boxes`` boxes with 0..``max_operations`` operations."""

    num_boxes: int = 7
    """Boxes in each training document."""
    max_operations: int = 12
    """Each document draws its number of operations uniformly from 0..max_operations."""
    until_accuracy: float | None = None
    """End the phase once exact-match accuracy on the phase's eval batch reaches this."""
    tokens: int | None = None
    """End the phase after this many training tokens (None: run until the total budget)."""


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. Every field is in the saved checkpoint's ``boxprobe.json``."""

    out_dir: str = "runs/toy-base"
    """Where checkpoints, the training state and the log go."""
    init_from: str | None = None
    """A checkpoint directory to continue from (for toy-code and toy-control); None trains from scratch."""
    model: ModelShape = field(default_factory=ModelShape)
    """Architecture, used only when training from scratch."""
    phases: tuple[Phase, ...] = (Phase(),)
    """The curriculum, in order; the last phase runs until ``total_tokens``."""
    total_tokens: int = 10_000_000
    """Stop after this many training tokens."""
    replay_prob: float = 0.2
    """Probability that a document is drawn from an earlier phase instead of the current one."""
    code_fraction: float = 0.0
    """Probability that a document is a Python program (toy-code's continuation)."""
    alt_forms_prob: float = 0.0
    """Probability that a boxes document uses the AltForms phrasing."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate, constant after warm-up."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    batch_size: int = 16
    """Documents per optimiser step."""
    weights: CorpusWeights = field(default_factory=CorpusWeights)
    """Loss weights of answer, context and query tokens."""
    seed: int = 0
    """Seed of data sampling and initialisation."""
    eval_every: int = 100
    """Steps between evaluations on the fixed eval batch."""
    eval_documents: int = 64
    """Documents in each phase's fixed eval batch."""
    checkpoint_every_s: float = 300.0
    """Seconds between saved training states (the run resumes from the latest)."""
    max_seconds: float | None = None
    """Stop (after saving) once this much wall time has passed in this process; resume later."""
    threads: int = 1
    """torch threads; two 1-thread runs side by side beat one 2-thread run on 2 cores."""


def sample_document(rng: np.random.Generator, cfg: TrainConfig, phase_index: int) -> list[Segment]:
    if rng.random() < cfg.code_fraction:
        final = cfg.phases[-1]
        return code_document(rng, final.num_boxes, final.max_operations, weights=cfg.weights)
    if phase_index > 0 and rng.random() < cfg.replay_prob:
        phase_index = int(rng.integers(phase_index))
    phase = cfg.phases[phase_index]
    return boxes_document(rng, phase.num_boxes, phase.max_operations,
                         alt_forms_prob=cfg.alt_forms_prob, weights=cfg.weights)


def collate(documents: list[list[Segment]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, pos]`` (right-padded, BOS first) and the loss weight of each token."""
    texts = [text for doc in documents for text, _ in doc]
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    rows, row_weights, i = [], [], 0
    for doc in documents:
        ids, weights = [tokenizer.bos_token_id], [0.0]
        for _, weight in doc:
            ids += encoded[i].ids
            weights += [weight] * len(encoded[i].ids)
            i += 1
        rows.append(ids)
        row_weights.append(weights)
    length = max(map(len, rows))
    tokens = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.zeros((len(rows), length))
    for r, (ids, w) in enumerate(zip(rows, row_weights)):
        tokens[r, : len(ids)] = torch.tensor(ids)
        weights[r, : len(w)] = torch.tensor(w)
    return tokens, weights


def weighted_loss(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    target_weights = weights[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return (losses * target_weights.reshape(-1)).sum() / target_weights.sum().clamp_min(1e-8)


def answer_exact_match(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, answer_weight: float) -> float:
    """Fraction of answers whose every token is the argmax (greedy decoding would produce them)."""
    correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    is_answer = weights[:, 1:] == answer_weight
    # Answers are maximal runs of answer tokens: number the runs, then count runs with no miss.
    starts = is_answer & ~torch.nn.functional.pad(is_answer[:, :-1], (1, 0), value=False)
    run_ids = torch.cumsum(starts.reshape(-1).long(), 0).reshape(is_answer.shape) - 1
    n_runs = int(starts.sum())
    if n_runs == 0:
        return 0.0
    misses = torch.zeros(n_runs).index_add_(0, run_ids[is_answer], (~correct[is_answer]).float())
    return float((misses == 0).float().mean())


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the directory of the latest HF checkpoint."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    state_path = out / "state.pt"
    # A resumed or continued run keeps the tokenizer it was trained with, even if the word lists change.
    source = out / "checkpoint" if state_path.exists() else Path(cfg.init_from) if cfg.init_from else None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source) if source else build_tokenizer("boxprobe-toy")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = LlamaForCausalLM.from_pretrained(cfg.init_from)
    else:
        model = build_model(cfg.model, len(tokenizer), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)
    progress = {"step": 0, "tokens": 0, "phase": 0, "phase_tokens": 0, "wall_s": 0.0, "history": []}
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        progress = state["progress"]
        log.info("resumed %s at step %d (%d tokens, phase %d)", out, progress["step"], progress["tokens"], progress["phase"])

    eval_batches = {}

    def eval_batch(phase_index: int):
        if phase_index not in eval_batches:
            eval_rng = np.random.default_rng([cfg.seed, 1000 + phase_index])
            phase = cfg.phases[phase_index]
            docs = [boxes_document(eval_rng, phase.num_boxes, phase.max_operations, weights=cfg.weights)
                    for _ in range(cfg.eval_documents)]
            eval_batches[phase_index] = collate(docs, tokenizer)
        return eval_batches[phase_index]

    def evaluate(phase_index: int) -> float:
        tokens, weights = eval_batch(phase_index)
        model.eval()
        with torch.inference_mode():
            logits = model(tokens).logits
        model.train()
        return answer_exact_match(logits, tokens, weights, cfg.weights.answer)

    def metadata() -> dict:
        return {
            "prompt_template": "toy", "prompt_format": "per-box",
            "training": {"config": asdict(cfg), "progress": {k: v for k, v in progress.items() if k != "history"},
                         "hardware": f"{platform.processor() or platform.machine()}, {cfg.threads} torch thread(s), "
                                     f"{os.cpu_count()} cores, {'cuda' if torch.cuda.is_available() else 'cpu'}"},
        }

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "progress": progress}, tmp)
        tmp.replace(state_path)
        save_checkpoint(model, tokenizer, out / "checkpoint", metadata())
        (out / "history.json").write_text(json.dumps(progress["history"]))

    started = last_save = time.time()
    wall_at_start = progress["wall_s"]
    stop_requested = []
    # SIGTERM (e.g. a session ending) saves the state before stopping; handlers only work in the main thread.
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.append(True)) for sig in (signal.SIGTERM,)
                if in_main}
    model.train()
    while progress["tokens"] < cfg.total_tokens and not stop_requested:
        step = progress["step"]
        lr = cfg.learning_rate * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        docs = [sample_document(rng, cfg, progress["phase"]) for _ in range(cfg.batch_size)]
        tokens, weights = collate(docs, tokenizer)
        loss = weighted_loss(model(tokens).logits, tokens, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        n_tokens = int((tokens != tokenizer.pad_token_id).sum())
        progress["step"] += 1
        progress["tokens"] += n_tokens
        progress["phase_tokens"] += n_tokens
        progress["wall_s"] = wall_at_start + time.time() - started
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate.")

        phase = cfg.phases[progress["phase"]]
        if progress["step"] % cfg.eval_every == 0:
            acc = evaluate(progress["phase"])
            progress["history"].append({"step": progress["step"], "tokens": progress["tokens"], "phase": progress["phase"],
                                        "loss": round(loss.item(), 4), "exact_match": round(acc, 4),
                                        "wall_s": round(progress["wall_s"], 1)})
            log.info("step %d tokens %d phase %d loss %.4f exact %.3f", progress["step"], progress["tokens"],
                     progress["phase"], loss.item(), acc)
            done = phase.until_accuracy is not None and acc >= phase.until_accuracy
            if phase.tokens is not None and progress["phase_tokens"] >= phase.tokens:
                done = True
            if done and progress["phase"] + 1 < len(cfg.phases):
                progress["phase"] += 1
                progress["phase_tokens"] = 0
                log.info("entering phase %d: %s", progress["phase"], cfg.phases[progress["phase"]])
        if time.time() - last_save > cfg.checkpoint_every_s:
            save_state()
            last_save = time.time()
        if cfg.max_seconds is not None and time.time() - started > cfg.max_seconds:
            log.info("max_seconds reached; saving and stopping (resume by running again)")
            break
    if stop_requested:
        log.info("SIGTERM received; saving and stopping (resume by running again)")
    save_state()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    return out / "checkpoint"

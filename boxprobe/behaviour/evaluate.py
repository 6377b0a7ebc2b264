"""Behavioural accuracy on the boxes task: greedy decoding's answers, scored with the set rule.

``method="greedy"`` (the default) returns exactly the tokens greedy decoding produces, at about the
cost of one teacher-forced pass: speculative decoding with the gold answer as the draft, continued
only where greedy leaves the gold, over a key-value cache shared by the whole run (instruction and
demonstrations), by each context (its description) and by nothing else (see
:mod:`boxprobe.behaviour.speculative`). ``summary["tokens"]`` compares the positions it computed with
what a per-prompt greedy run computes. ``constrained=True`` restricts every greedy step to tokens
that keep the statement a prefix of a match of the template's regular expression, the protocol of
Kim, Schuster & Toshniwal (2024) (:mod:`boxprobe.behaviour.constrained`). ``summary["protocol"]``
records template, format and decoding.

``method="generate"`` decodes greedily (left-padded batches with an explicit attention mask) until a
token holding "." or a newline, EOS, or ``max_new_tokens``; predictions are scored with the set rule
of :mod:`boxprobe.behaviour.scoring`. ``method="fast"`` teacher-forces the gold continuation (with its closing
".") in one pass: greedy decoding reproduces the gold tokens exactly iff the argmax at every gold
position is the gold token, the gold ends with a stop token and has none before. The fast verdict
is therefore *token exact match*; it counts as wrong an answer that names the right objects in
another order or spacing, which set scoring accepts. ``method="both"`` runs both and records in
``summary["agreement"]`` how often they agree (``exact_match``: fast vs generated-tokens-equal-gold,
1.0 by construction; ``correct``: fast vs set-scored generation). They disagree where the set rule
accepts an answer that is not the gold's tokens: a repeated object ("the saw and the saw.") or
another order.

All-boxes prompts answer the seven boxes in one statement. Generation splits it with
:func:`boxprobe.scoring.split_all_boxes_statement` (a box never mentioned is wrong). The fast path
forces the whole statement and judges box k correct iff every argmax in box k's span (its
"Box k contains", its objects and the following "," or ".") is right; later boxes are conditioned
on the gold earlier ones, so a box after a mistake may pass here although generation, which
carries the mistake forward, fails it.

Context reuse: the per-box queries of one context differ only in the final statement, so the
shared token prefix runs once per context and its key-value cache is expanded to the queries.
TransformerBridge 4.3 accepts ``past_key_values`` and ``return_type="logits_and_cache"``, but its
attention bridges read the cache from the ``past_key_values`` keyword while transformers 5 passes
it as ``cache``; the cache then stays empty and cached logits are silently wrong (so are those of
``TransformerBridge.generate`` with its KV cache). :func:`cache_keyword_fix` copies the keyword
while evaluation runs, and before relying on it :func:`kv_cache_works` checks on the data that
cached and uncached logits agree; if they do not, evaluation runs without cache, only slower.
Generation thus reuses contexts too, so the fast path saves the decoding steps, not the prompt pass.
``benchmarks/eval_speed.py`` compares the default with plain transformers ``generate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from boxprobe.config import ConfigError, check_choice
from boxprobe.behaviour.constrained import constraint_for, statement_regex
from boxprobe.behaviour.decoding import (
    batches_by_context,
    cache_keyword_fix,
    fast_batch,
    generate_batch,
    kv_cache_works,
    stop_ids,
)
from boxprobe.behaviour.speculative import SharedPrefix, TokenCount, count_per_prompt, greedy_batch
from boxprobe.data.prompts import PromptTemplate
from boxprobe.data.queries import ContextLengthError, EncodedQuery, QuerySet, prepare, resolve_spec
from boxprobe.models.batching import BatchSizer
from boxprobe.models.loading import load_model, model_id, model_info, model_label
from boxprobe.behaviour.scoring import (accuracy_by_numops, accuracy_table, contents_match, split_all_boxes_statement,
                                       state_accuracy)
from boxprobe.data.task import OPERATION_KINDS, read_examples

logger = logging.getLogger(__name__)
Method = Literal["greedy", "fast", "generate", "both"]
METHODS = ("greedy", "fast", "generate", "both")
NUMOPS_KEYS = range(8)


@dataclass
class EvalResult:
    """One row per example (``frame``) and a JSON-friendly ``summary``."""

    frame: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)

    def accuracy(self) -> pd.DataFrame:
        """Tidy accuracy per numops and overall (:func:`boxprobe.behaviour.scoring.accuracy_table`): intervals
        clustered by state, and the always-"nothing" baseline beside each cell."""
        return accuracy_table(self.frame)

    def table(self) -> str:
        """Accuracy per numops and overall, with 95% intervals clustered by state, beside the score of
        always answering "nothing"; then state accuracy and the protocol."""
        fmt = lambda x: "    -" if pd.isna(x) else f"{x:.3f}"  # noqa: E731
        lines = [f"{'numops':>6} {'n':>6} {'accuracy':>9}  {'95% CI (clustered)':<18}  always-nothing"]
        for r in self.accuracy().itertuples():
            key = "all" if r.scope == "all" else str(r.numops)
            lines.append(f"{key:>6} {r.n:>6} {fmt(r.accuracy):>9}  [{fmt(r.ci_low)}, {fmt(r.ci_high)}]    "
                         f"{fmt(r.nothing_baseline)}")
        s = self.summary
        lines.append(f"state accuracy {fmt(s['state_accuracy'])}  ({s['method']}, {s['prompt_format']}, "
                     f"template {s['template']}, {s['protocol']['decoding']}, {s['model']})")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> None:
        """Write ``results.csv`` (the frame) and ``summary.json`` to ``out_dir``."""
        from boxprobe.pipeline.rundir import atomic_write_bytes

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Both files or neither: a full disk leaves the old pair, never a cut CSV beside a new summary.
        atomic_write_bytes({out_dir / "results.csv": self.frame.to_csv(index=False).encode(),
                            out_dir / "summary.json": (json.dumps(self.summary, indent=2) + "\n").encode()})


# -- results --------------------------------------------------------------------------------------


def _rows(item: EncodedQuery, method: str, argmax: list[int] | None, generated: list[int] | None, tokenizer,
          stops: set[int]) -> list[dict[str, Any]]:
    q, rows = item.query, []
    if argmax is not None:  # the verdict greedy decoding would give: every argmax right, stopping exactly at the end
        hits = [a == g for a, g in zip(argmax, item.gold)]
        valid = item.gold[-1] in stops and not any(t in stops for t in item.gold[:-1])
        exact_fast = valid and all(hits)
    if generated is not None:
        text = tokenizer.decode(generated, skip_special_tokens=True).strip()
        exact_gen = generated == item.gold
        if q.prompt_format == "all-boxes":
            label = q.examples[0].statement_prefix.rsplit(" ", 2)[0]
            n_boxes = max((ex.box or 0) for ex in q.examples) + 1
            per_box = split_all_boxes_statement(f"{q.examples[0].statement_prefix} {text}", n_boxes, label)
    for ex, (start, end) in zip(q.examples, item.spans):
        row = {"sample_id": ex.sample_id, "num_operations": ex.num_operations, "box": ex.box, "numops": ex.numops,
               **{f"numops_{k}": ex.numops_by_op.get(k) for k in OPERATION_KINDS},
               "gold": ex.gold, "prompt_format": q.prompt_format, "method": method}
        if argmax is not None:  # an all-boxes box also passes if it ends with "." where gold has ","
            ends_ok = hits[end - 1] or argmax[end - 1] in stops
            row["correct_fast"] = bool(exact_fast if len(item.spans) == 1 else all(hits[start:end - 1]) and ends_ok)
            row["exact_fast"] = bool(exact_fast)
        if generated is not None:
            prediction = per_box.get(ex.box) if q.prompt_format == "all-boxes" and len(q.examples) > 1 else text
            row["prediction"] = prediction
            row["correct_generate"] = bool(contents_match(prediction, ex.gold))
            row["exact_generate"] = bool(exact_gen)
        row["correct"] = row["correct_fast"] if method == "fast" else row["correct_generate"]
        rows.append(row)
    return rows


def _nan_to_none(x: float) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def _by_numops(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    values = sorted(set(NUMOPS_KEYS) | {int(v) for v in frame["numops"].unique()})
    return accuracy_by_numops(frame.assign(correct=frame[column]), values)


def _keyed(table: pd.DataFrame, *columns: str) -> dict[str, Any]:
    """``{"0": value, ...}`` of one column, or ``{"0": [low, high], ...}`` of two."""
    pick = lambda r: [_nan_to_none(getattr(r, c)) for c in columns]  # noqa: E731
    return {str(r.numops): pick(r) if len(columns) > 1 else pick(r)[0] for r in table.itertuples()}


def _summary(frame: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    tidy = accuracy_table(frame, sorted(set(NUMOPS_KEYS) | {int(v) for v in frame["numops"].unique()}))
    table, overall = tidy[tidy["scope"] == "numops"], tidy[tidy["scope"] == "all"].iloc[0]
    out = {**meta, "n_examples": int(overall["n"]), "accuracy": _nan_to_none(overall["accuracy"]),
           "accuracy_ci": [_nan_to_none(overall["ci_low"]), _nan_to_none(overall["ci_high"])],
           "ci_method": "Wilson at the effective sample size, clustered by state (sample_id, num_operations)",
           "nothing_baseline": _nan_to_none(overall["nothing_baseline"]),
           "accuracy_by_numops": _keyed(table, "accuracy"),
           "n_by_numops": {str(r.numops): int(r.n) for r in table.itertuples()},
           "ci_by_numops": _keyed(table, "ci_low", "ci_high"),
           "nothing_baseline_by_numops": _keyed(table, "nothing_baseline"),
           "state_accuracy": _nan_to_none(state_accuracy(frame))}
    if meta["method"] == "both":
        out["accuracy_fast"] = _nan_to_none(frame["correct_fast"].mean())
        out["accuracy_fast_by_numops"] = _keyed(_by_numops(frame, "correct_fast"), "accuracy")
        per_query = frame.groupby("query")[["exact_fast", "exact_generate"]].first()
        out["agreement"] = {
            "exact_match": float((per_query["exact_fast"] == per_query["exact_generate"]).mean()),
            "correct": float((frame["correct_fast"] == frame["correct_generate"]).mean()),
            "generate_right_fast_wrong": int((frame["correct_generate"] & ~frame["correct_fast"]).sum()),
            "fast_right_generate_wrong": int((frame["correct_fast"] & ~frame["correct_generate"]).sum()),
        }
    return out


# -- entry points ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate` decodes and batches; the prompt itself is fixed by the query set's spec."""

    method: Method = "greedy"
    """``greedy`` (greedy decoding's own answers, speculatively with the gold as the draft; set rule),
    ``generate`` (plain batched greedy decoding, same answers, slower), ``fast`` (teacher-forced token
    exact match in one pass) or ``both`` (fast and generate side by side)."""
    constrained: bool = False
    """Restrict greedy decoding to the template's ``answer_regex`` (derived from the format if empty)."""
    batch_size: int = 16
    """Queries per forward pass."""
    max_new_tokens: int | None = None
    """Generation budget; None: the longest gold answer plus 8 tokens."""
    kv_cache: bool | None = None
    """Decode incrementally through the key-value cache; None: when :func:`kv_cache_works` on the data."""
    reuse_context: bool | None = None
    """Run each context's shared prefix once; None: whenever the cache is used."""
    progress: bool = True
    """Show a progress bar."""
    draft_tokens: int = 4
    """``method="greedy"``: tokens drafted by prompt lookup and verified per step once an answer leaves
    the gold; 0 decodes one token per step. Changes the speed, never the answers."""
    partial_path: str | None = None
    """If a batch fails, the rows computed so far are written here before the error is re-raised."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if self.constrained and self.method == "fast":
            raise ConfigError("constrained=True needs decoding: method 'greedy', 'generate' or 'both', not 'fast'.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.draft_tokens < 0:
            raise ConfigError(f"draft_tokens must be >= 0, got {self.draft_tokens}.")


def _constraint(template: PromptTemplate, items: list[EncodedQuery], tokenizer):
    """The regex automaton and each item's start state (after the statement opening the prompt holds)."""
    def pattern(q):
        if template.answer_regex:
            return template.answer_regex
        label = q.examples[0].statement_prefix.rsplit(" ", 2)[0]
        boxes = [ex.box for ex in q.examples] if q.prompt_format == "all-boxes" else None
        return statement_regex(template.statement_prefix, label, boxes)
    patterns = {pattern(it.query) for it in items}
    if len(patterns) > 1:
        raise ValueError(f"constrained decoding needs one regular expression per run; these queries need {len(patterns)} "
                         "(all-boxes states with different boxes). Set the template's answer_regex.")
    constraint = constraint_for(patterns.pop(), tokenizer)
    starts = [constraint.start(template.statement_prefix + it.query.examples[0].statement_prefix) for it in items]
    return constraint, starts


def evaluate(model: TransformerBridge, queries: QuerySet, config: EvalConfig = EvalConfig()) -> EvalResult:
    """Behavioural accuracy of a loaded model on a query set (:func:`boxprobe.data.queries.prepare`).

    One row per example in ``result.frame``; the summary records the prompt spec and decoding.
    """
    if not isinstance(queries, QuerySet):
        raise ConfigError("evaluate takes a query set: queries = boxprobe.prepare(model, examples, spec).")
    queries.check_model(model)
    cfg, items = config, list(queries.items)
    tok, label = model.tokenizer, model_label(model)
    stops = stop_ids(tok)
    pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0) if i is not None)
    longest = max(len(it.gold) for it in items)
    max_new_tokens = cfg.max_new_tokens or longest + 8
    if cfg.method != "fast" and max_new_tokens < longest:
        logger.warning("max_new_tokens=%d is below the longest gold answer (%d tokens).", max_new_tokens, longest)
    use_cache = cfg.kv_cache is not False and kv_cache_works(model, items[0].prompt)
    if (cfg.kv_cache or cfg.reuse_context) and not use_cache:
        logger.warning("the key-value cache of %s is off or gives wrong logits; evaluating without it.", label)
    reuse = use_cache and cfg.reuse_context is not False
    constraint, cstates = (_constraint(queries.spec.template, items, tok) if cfg.constrained
                           else (None, [None] * len(items)))
    state_of = {id(it): s for it, s in zip(items, cstates)}
    counts = TokenCount()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(total=len(items), desc=f"eval {cfg.method}", unit="query", disable=not cfg.progress)
    sizer = BatchSizer(cfg.batch_size, f"eval {label}")  # halves on out-of-memory, keeps the size it settles on
    try:
        with torch.inference_mode(), cache_keyword_fix(model):
            shared = SharedPrefix(model, items, counts, reuse) if use_cache and cfg.method == "greedy" else None
            for batch in batches_by_context(items, cfg.batch_size):
                flat = [it for c in batch for it in c]
                states = lambda b: [state_of[id(it)] for c in b for it in c]  # noqa: E731
                tops = (sizer.run_chunks(batch, lambda b: fast_batch(model, b, reuse, pad_id))
                        if cfg.method in ("fast", "both") else [None] * len(flat))
                if cfg.method == "greedy":
                    gens = sizer.run_chunks(batch, lambda b: greedy_batch(
                        model, b, shared, reuse, pad_id, max_new_tokens, stops, counts, constraint, states(b),
                        cfg.draft_tokens))
                    count_per_prompt(flat, gens, counts)
                elif cfg.method != "fast":
                    gens = sizer.run_chunks(batch, lambda b: generate_batch(
                        model, b, reuse, use_cache, pad_id, max_new_tokens, stops, constraint, states(b)))
                else:
                    gens = [None] * len(flat)
                for it, h, g in zip(flat, tops, gens):
                    query = rows[-1]["query"] + 1 if rows else 0
                    rows += [{"query": query, **r} for r in _rows(it, cfg.method, h, g, tok, stops)]
                bar.update(len(flat))
    except BaseException as err:
        if rows and cfg.partial_path is not None:
            Path(cfg.partial_path).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(cfg.partial_path, index=False)
            logger.error("evaluation failed; wrote the %d rows computed so far to %s", len(rows), cfg.partial_path)
            if hasattr(err, "add_note"):
                err.add_note(f"boxprobe: the {len(rows)} rows computed before the failure are in {cfg.partial_path}")
        raise
    finally:
        bar.close()
    info, frame = model_info(model), pd.DataFrame(rows)
    compat = "compatibility" if getattr(model, "compatibility_mode", False) else "raw"
    spec = queries.spec
    meta = {"model": label, "model_id": model_id(model), "revision": info.revision if info else None,
            "weight_mode": info.weight_mode if info else compat,
            "prompt_format": spec.format, "template": spec.template.name, "method": cfg.method, "chat": spec.chat,
            "n_queries": len(items), "batch_size": cfg.batch_size, "batch_size_settled": sizer.settled,
            "context_reuse": reuse, "kv_cache": use_cache,
            "max_new_tokens": max_new_tokens if cfg.method != "fast" else None, "n_ctx": queries.n_ctx,
            "device": str(model.cfg.device), "dtype": str(model.cfg.dtype).removeprefix("torch."),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "protocol": {"template": spec.template.name,
                         "template_reference": spec.template.reference or "ours (boxprobe)",
                         "format": spec.format, "chat": spec.chat,
                         "decoding": "token exact match (teacher-forced)" if cfg.method == "fast" else
                         ("greedy, regex-constrained" if cfg.constrained else "greedy"),
                         "regex": constraint.pattern if constraint is not None else None},
            "tokens": {"computed": counts.computed, "per_prompt_run": counts.per_prompt,
                       "ratio": None if counts.ratio is None else round(counts.ratio, 3)} if cfg.method == "greedy" else None}
    return EvalResult(frame, _summary(frame, meta))


def evaluate_file(model_name_or_path_or_model: str | Path | TransformerBridge, data_path: str | Path,
                  out_dir: str | Path, *, prompt_format: str | None = None, template: str | Path | None = None,
                  chat: bool | None = None, limit: int | None = None, device: str | None = None,
                  dtype: str | None = None, config: EvalConfig = EvalConfig(), overwrite: bool = False) -> EvalResult:
    """Load the model (unless given one) and a JSONL file, evaluate, and write ``out_dir/summary.json`` and
    ``out_dir/results.csv``. The prompt spec is resolved from the arguments, then the checkpoint.

    ``out_dir`` is claimed first (:func:`boxprobe.pipeline.rundir.claim_run_dir`): a directory holding
    another run's results is refused unless ``overwrite``, and so is one another process is writing."""
    from boxprobe.pipeline.rundir import claim_run_dir

    examples = read_examples(data_path)  # before loading: a bad file should not wait for a large model
    name = model_name_or_path_or_model
    signature = {"model": model_id(name) if isinstance(name, TransformerBridge) else str(name),
                 "data": str(Path(data_path).resolve()), "format": prompt_format,
                 "template": None if template is None else str(template), "chat": chat, "limit": limit,
                 "method": config.method}
    with claim_run_dir(out_dir, "eval", signature, overwrite=overwrite):
        return _evaluate_file(name, data_path, examples, out_dir, prompt_format, template, chat, limit, device,
                              dtype, config)


def _evaluate_file(model, data_path, examples, out_dir, prompt_format, template, chat, limit, device, dtype,
                   config) -> EvalResult:
    if not isinstance(model, TransformerBridge):
        model = load_model(model, device=device, dtype=dtype)
    out_dir = Path(out_dir)
    partial = out_dir / "results.partial.csv"
    spec = resolve_spec(model, template, prompt_format, chat)
    try:
        queries = prepare(model, examples, spec, limit=limit)
    except ContextLengthError as err:
        index = next(i for i, ex in enumerate(examples) if ex is err.example)
        with Path(data_path).open(encoding="utf-8") as f:
            lines = [n for n, line in enumerate(f, start=1) if line.strip()]
        raise ContextLengthError(f"{data_path}:{lines[index]}: {err}", err.example) from None
    result = evaluate(model, queries, dataclasses.replace(config, partial_path=str(partial)))
    result.summary["data"] = str(data_path)
    result.save(out_dir)
    partial.unlink(missing_ok=True)  # a stale partial file from an earlier failed run would mislead
    return result

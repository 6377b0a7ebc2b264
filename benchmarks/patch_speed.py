"""Residual-stream patching over layers x positions: boxprobe vs ``transformer_lens.patching``, side by side.

    .venv/bin/python benchmarks/patch_speed.py [--model PATH] [--pairs 4] [--kind random-query] [--also KIND ...]

Without --model it builds a random toy-sized Llama (4 layers, d_model 128, 8 heads, d_mlp 512) with the
toy tokenizer in a temporary directory. Inputs: ``--pairs`` equal-length, unpadded pairs of ``--kind``
built from numops-0 per-box examples of a generated dataset (TransformerLens passes no attention mask,
so it can only be compared without padding). The default kind is ``random-query``, the pairs circuit
discovery uses (Prakash et al.: another context at an unused label; built here without the
answered-correctly filter, since the default model is random). Both compute the logit difference for every
(layer, position) patch of ``blocks.{l}.hook_resid_pre`` (clean into corrupt) on the same model, pairs
and device, after a warm-up each: TransformerLens with ``get_act_patch_resid_pre`` (one forward per
patch), boxprobe with ``patch_resid_pre`` (``--max-batch`` rows per forward). Each kind in ``--also``
gets an informative line first, and the ``--kind`` run is also timed with ``shortcuts=False`` (batching
alone). On a CPU the forwards are compute-bound, so batching alone gains little; the speed-up comes
from the exact shortcuts of ``generic_patch``: no-op sites are skipped; a site at position p runs only
positions p.. on the target's cached keys and values; a site at block L starts there from the target's
residual stream without running the blocks below (``skip_blocks``); the last block's MLP and the
unembedding run at the read position only; and sites are grouped into forwards by a cost estimate
(``plan_chunks``). Query-box pairs differ only near the end, so most of their sites are skipped;
random-query prompts come from different contexts and differ from their first description token on, so
they rely on the layer and position skips. The last line reads
``ratio=<TransformerLens time / boxprobe time> max_abs_diff=<largest difference of the two results>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformer_lens.patching as tl_patching  # noqa: E402

from boxprobe.models.loading import load_model  # noqa: E402
from boxprobe.data.pairs import build_pairs, collate_pairs  # noqa: E402
from boxprobe.data.queries import prepare, resolve_spec  # noqa: E402
from boxprobe.causal.patching import logit_diff, patch_resid_pre  # noqa: E402
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples  # noqa: E402
from boxprobe.models.toy import ModelShape, save_random_checkpoint  # noqa: E402


def random_toy_model(directory: Path) -> Path:
    return save_random_checkpoint(directory, ModelShape(n_layers=4, d_model=128, n_heads=8, d_mlp=512))


def equal_length_batch(model, kind: str, n_pairs: int, seed: int):
    cfg = TaskConfig(num_samples=40, num_operations=1, seed=seed)
    examples = [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg) if e.num_operations == 0]
    extra = {"correct_only": False} if kind == "random-query" else {}
    pairs, _ = build_pairs(model, prepare(model, examples, resolve_spec(model)), kind, seed=seed, limit=None, **extra)
    length, _ = Counter(len(p.clean_ids) for p in pairs).most_common(1)[0]
    chosen = [p for p in pairs if len(p.clean_ids) == length][:n_pairs]
    return collate_pairs(chosen, model.tokenizer.pad_token_id, device=model.cfg.device)


def run_tl(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(batch.clean_tokens)
        return tl_patching.get_act_patch_resid_pre(model, batch.corrupt_tokens, clean_cache,
                                                  lambda logits: logit_diff(logits, batch).mean())


def run_ours(model, batch, max_batch: int, shortcuts: bool = True) -> torch.Tensor:
    frame = patch_resid_pre(model, batch, metric=logit_diff, max_batch=max_batch, shortcuts=shortcuts, progress=False)
    return torch.tensor(frame["value"].to_numpy()).reshape(model.cfg.n_layers, batch.n_pos)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def compare(model, kind: str, args) -> tuple[float, float, float]:
    batch = equal_length_batch(model, kind, args.pairs, args.seed)
    warm = batch.select([0])
    run_tl(model, warm), run_ours(model, warm, args.max_batch)  # warm-up
    t_tl, tl = timed(run_tl, model, batch)
    t_ours, ours = timed(run_ours, model, batch, args.max_batch)
    diff = float((ours.to(tl.device) - tl).abs().max())
    print(f"{kind}: {len(batch)} pairs x {batch.n_pos} tokens, {model.cfg.n_layers} layers; "
          f"TransformerLens {t_tl:.2f}s, boxprobe {t_ours:.2f}s, ratio {t_tl / t_ours:.1f}, max_abs_diff {diff:.2e}",
          flush=True)
    return t_tl, t_ours, diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory or hub id (default: a random toy model)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--kind", default="random-query", help="pair kind of the final line")
    parser.add_argument("--also", nargs="*", default=["query-box"], help="kinds measured first")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: many small multi-threaded forwards time erratically "
                             "on a busy machine)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_toy_model(Path(tmp) / "toy")
        model = load_model(path, device=args.device)
        print(f"model {path} on {model.cfg.device} ({torch.get_num_threads()} threads); pairs of the last line: "
              f"{args.kind}", flush=True)
        for kind in args.also:
            compare(model, kind, args)
        t_tl, t_ours, diff = compare(model, args.kind, args)
        batch = equal_length_batch(model, args.kind, args.pairs, args.seed)
        t_plain, _ = timed(run_ours, model, batch, args.max_batch, shortcuts=False)
        print(f"{args.kind} with shortcuts=False (batching only): boxprobe {t_plain:.2f}s, ratio {t_tl / t_plain:.1f}")
    print(f"ratio={t_tl / t_ours:.2f} max_abs_diff={diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

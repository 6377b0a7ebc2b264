"""Peak memory of a fixed workload against model depth: eval, caching and patching on random toy-width
Llamas of 4, 8 and 16 layers, side by side in one run.

    .venv/bin/python benchmarks/memory.py [--depths 4 8 16] [--queries 14] [--pairs 4] [--d-model 256] [--layers 4]

Each (stage, depth) runs in a fresh subprocess. The figure is the workload's peak beyond what the
process held after loading the model, preparing the queries and one warm-up forward (weights, which do
grow with depth, are not counted): on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before
the workload; on CPU the peak resident set during the workload (``VmHWM``, restarted through
``/proc/self/clear_refs`` after ``malloc_trim``) minus the resident set when it starts. (The lifetime peak
``ru_maxrss`` would hide whatever the workload needs below the transient peak of loading the weights,
which is larger for deeper models; it is used only where ``clear_refs`` is unavailable.) Children run with
glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor then gets its own mapping,
returned to the system when freed, so the resident set follows the tensors alive (glibc otherwise raises
the threshold as it goes and keeps freed tensors in its heap, which made repeated runs differ by half). Workloads: ``evaluate`` (fast method) on ``--queries`` queries; ``build_cache`` of
``resid_post`` at ``query_last`` over ``--layers`` layers spread evenly over the depth (first to last);
``patch_resid_pre`` over the same layers at the query-box pairs' ``query_last`` position. The layer count
is fixed so the workload is: patching every layer would run one site per layer, and with up to
``max_batch`` rows per forward a deeper model's forwards would be wider, which is more work, not more
memory per unit of work. The ratio column is the peak over the shallowest model's; the goal is 1.0 +- 0.1
for caching and patching.

Caching runs each context's shared prefix once by packing it with its queries' suffixes into one row
(:mod:`boxprobe.activations.packing`), which holds no per-layer state. Patching's position shortcut would
hold the target run's keys and values of every layer for the whole pass (``kv MB``: their size from the
shapes); by default (``kv_prefix=None``) it is used only where that adds at most
``boxprobe.causal.engine.KV_SHARE`` to a forward's activations, and otherwise each chunk starts from its
start layer's residual stream at every position, which holds nothing per layer. ``--no-kv`` turns both
shortcuts off (``reuse_context=False``, ``kv_prefix=False``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STAGES = ("eval", "cache", "patch")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def _start_window() -> float | None:
    """Return freed heap to the system and restart the peak-RSS counter; the resident set now (MB), or None
    where /proc/self/clear_refs is unavailable (then the lifetime peak ``ru_maxrss`` is all there is)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_mb("VmRSS")
    except OSError:
        return None


def child(args) -> None:
    import torch

    from boxprobe.activations.cache import CacheConfig, build_cache
    from boxprobe.behaviour.evaluate import EvalConfig, evaluate
    from boxprobe.causal.patching import patch_resid_pre
    from boxprobe.data.pairs import build_pairs, collate_pairs
    from boxprobe.data.queries import prepare, resolve_spec
    from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
    from boxprobe.models.loading import load_model

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    model = load_model(args.checkpoint, device="cuda" if cuda else "cpu")
    task = TaskConfig(num_samples=30, num_operations=3)
    examples = [e for s in generate_sequences(task) for e in sequence_examples(s, task)]
    queries = prepare(model, examples[:max(args.queries, 200)], resolve_spec(model))
    batch = None
    if args.stage == "patch":
        pairs, _ = build_pairs(model, queries, "query-box", seed=0)
        batch = collate_pairs(pairs[:args.pairs], model.tokenizer.pad_token_id, device=model.cfg.device)
    with torch.inference_mode():
        model(torch.tensor([queries[0].ids], device=model.cfg.device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        window = _start_window()
        base = _rss_mb() if window is None else window
    started = time.perf_counter()
    layers = sorted({round(i * (model.cfg.n_layers - 1) / max(args.layers - 1, 1)) for i in range(args.layers)})
    kv_row = 2 * model.cfg.n_layers * (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads) \
        * model.cfg.d_head * 4 / 2**20  # MB of keys and values per token, every layer, float32
    if args.stage == "patch":
        kv_mb = 0.0 if args.no_kv else batch.clean_tokens.numel() * kv_row
    else:  # eval holds its own decoding cache; caching packs prefixes and holds none
        kv_mb = float("nan")
    if args.stage == "eval":
        evaluate(model, queries[:args.queries], EvalConfig(batch_size=args.queries, progress=False))
    elif args.stage == "cache":
        with tempfile.TemporaryDirectory() as tmp:
            build_cache(model, queries[:args.queries], tmp, CacheConfig(batch_size=args.queries, layers=layers,
                                                                        reuse_context=not args.no_kv), progress=False)
    else:
        patch_resid_pre(model, batch, layers=layers, positions="query_last", progress=False,
                        kv_prefix=False if args.no_kv else None)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_rss_mb() if window is None else _status_mb("VmHWM")) - base
    print(json.dumps({"peak_mb": peak, "kv_mb": kv_mb, "seconds": time.perf_counter() - started, "device": "cuda" if cuda else "cpu"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--queries", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="layers cached and patched, spread over the depth")
    parser.add_argument("--no-kv", action="store_true", help="cache and patch without the key-value prefix shortcuts")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return child(args)
    from boxprobe.models.toy import ModelShape, save_random_checkpoint

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            ckpt = save_random_checkpoint(Path(tmp) / f"L{depth}", ModelShape(
                n_layers=depth, d_model=args.d_model, n_heads=8, d_mlp=4 * args.d_model))
            for stage in args.stages:
                cmd = [sys.executable, __file__, "--stage", stage, "--checkpoint", str(ckpt),
                       "--queries", str(args.queries), "--pairs", str(args.pairs), "--layers", str(args.layers)]
                cmd += ["--no-kv"] if args.no_kv else []
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"{stage} at depth {depth} failed:\n{out.stderr[-2000:]}")
                rows.append({"stage": stage, "layers": depth, **json.loads(out.stdout.strip().splitlines()[-1])})
    first = {r["stage"]: r["peak_mb"] for r in rows if r["layers"] == args.depths[0]}
    print(f"d_model {args.d_model}, {args.queries} queries, {args.pairs} pairs, {args.layers} layers cached/patched, "
          f"key-value shortcuts {'off' if args.no_kv else 'on'}, device {rows[0]['device']}")
    print(f"{'stage':>6} {'layers':>6} {'peak MB':>9} {'kv MB':>7} {'seconds':>8} {'vs ' + str(args.depths[0]) + ' layers':>12}")
    for r in rows:
        ratio = r["peak_mb"] / first[r["stage"]] if first[r["stage"]] > 0 else float("nan")
        print(f"{r['stage']:>6} {r['layers']:>6} {r['peak_mb']:>9.1f} {r['kv_mb']:>7.1f} {r['seconds']:>8.2f} {ratio:>12.2f}")


if __name__ == "__main__":
    main()

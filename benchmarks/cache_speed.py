"""Throughput of ``boxprobe.cache.build_cache`` against a plain forward pass over the same batches.

    python benchmarks/cache_speed.py [--model PATH] [--layers 4] [--queries 300] [--rounds 3]

Without ``--model`` a randomly initialised toy Llama (d_model 128, 8 heads, d_mlp 512) is used.
Both sides see the same left-padded batches with their attention mask; the forward side gets them
pre-tokenized, while the caching side is timed end to end (``prepare``'s tokenization and token
positions, labels, hooks, the copy to the host and the shard files); it runs each context's shared
prefix once through the key-value cache, as ``build_cache`` does by default. Rounds alternate which side runs first; the ratio
is the median over rounds of the wall-clock throughput ratio (process CPU time is printed beside it,
as it is less sensitive to other load on the machine). The last line is
``ratio=<caching/forward throughput> bytes_per_item=<bytes on disk per query>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from boxprobe.activations.cache import CacheConfig, build_cache  # noqa: E402
from boxprobe.models.loading import load_model  # noqa: E402
from boxprobe.data.queries import prepare, resolve_spec  # noqa: E402
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples  # noqa: E402
from boxprobe.models.toy import ModelShape, save_random_checkpoint  # noqa: E402


def toy_checkpoint(directory: Path, n_layers: int) -> Path:
    return save_random_checkpoint(directory, ModelShape(n_layers=n_layers, d_model=128, n_heads=8, d_mlp=512))


def sample_examples(n: int, seed: int):
    cfg = TaskConfig(num_samples=max(4, n // 20), num_operations=12, seed=seed)
    examples = [e for s in generate_sequences(cfg) for e in sequence_examples(s, cfg)]
    picks = np.random.default_rng(seed).choice(len(examples), size=min(n, len(examples)), replace=False)
    return [examples[i] for i in sorted(picks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id (default: a random toy model)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the toy model")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="cache storage dtype")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids thread thrashing on small shared machines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cache_speed_"))
    model = load_model(args.model or toy_checkpoint(tmp / "model", args.layers), device=args.device)
    examples = sample_examples(args.queries, seed=0)
    spec = resolve_spec(model, format="per-box")
    queries = prepare(model, examples, spec)
    n = len(queries)
    cfg = CacheConfig(hooks=("resid_post",), roles=("query_last", "box_mention"), dtype=args.dtype,
                      batch_size=args.batch_size, shard_size=max(n // 3, args.batch_size))
    device = next(model.parameters()).device
    # The batches build_cache forms: consecutive slices of batch_size inside each shard.
    batches = []
    for lo in range(0, n, cfg.shard_size):
        for s in range(lo, min(n, lo + cfg.shard_size), cfg.batch_size):
            enc = model.tokenizer([q.prompt for q in queries.queries[s:min(s + cfg.batch_size, n, lo + cfg.shard_size)]],
                                  padding=True, padding_side="left", return_tensors="pt")
            batches.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))

    def timed(fn) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    def forward() -> None:
        with torch.inference_mode():
            for tokens, mask in batches:
                model(tokens, attention_mask=mask)

    def caching(r: int):
        return lambda: build_cache(model, prepare(model, examples, spec), tmp / f"cache{r}", cfg, progress=False)

    timed(forward), timed(caching(-1))  # warm-up: allocator, kernels, tokenizer caches
    fwd, cache = [], []
    for r in range(args.rounds):
        if r % 2:
            cache.append(timed(caching(r))), fwd.append(timed(forward))
        else:
            fwd.append(timed(forward)), cache.append(timed(caching(r)))
        print(f"round {r}: forward {n / fwd[-1][0]:.1f} items/s, caching {n / cache[-1][0]:.1f} items/s "
              f"(cpu time ratio {fwd[-1][1] / cache[-1][1]:.3f})")
    ratio = statistics.median(f[0] / c[0] for f, c in zip(fwd, cache))
    cpu_ratio = statistics.median(f[1] / c[1] for f, c in zip(fwd, cache))
    files = [f for f in (tmp / "cache0").iterdir() if f.name != "manifest.json"]
    tensors = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    meta = sum(f.stat().st_size for f in files if f.suffix == ".jsonl")
    print(f"model {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}) on {device}, "
          f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores; {n} queries, batch {cfg.batch_size}, "
          f"dtype {cfg.dtype}, hooks {cfg.hooks}, roles {cfg.roles}")
    print(f"per item on disk: {tensors // n} bytes of activations, {meta // n} bytes of metadata; "
          f"median cpu-time ratio {cpu_ratio:.3f}")
    print(f"ratio={ratio:.3f} bytes_per_item={(tensors + meta) // n}")


if __name__ == "__main__":
    main()

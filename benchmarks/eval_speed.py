"""Throughput of greedy generation vs the one-pass exact-match path on the same queries, side by side.

    .venv/bin/python benchmarks/eval_speed.py [--model PATH] [--queries 200] [--batch-size 16]

Without --model it builds a random toy-sized Llama (2 layers, d_model 128, 8 heads, d_mlp 512) with the
toy tokenizer in a temporary directory. The queries are the first ``--queries`` per-box queries of
the test-subsample split of a generated 12-operation dataset (contexts of 0..12 operations, seven
boxes each). Both methods use the same examples, template, batch size and device, after one warm-up
batch each. The last line reads ``ratio=<fast/generation throughput> agreement=<fraction of equal
exact-match verdicts>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from boxprobe.behaviour.evaluate import evaluate  # noqa: E402
from boxprobe.models.loading import load_model  # noqa: E402
from boxprobe.data.task import TaskConfig, generate_dataset, read_examples  # noqa: E402
from boxprobe.models.toy import ModelShape, save_random_checkpoint  # noqa: E402


def random_toy_model(directory: Path) -> Path:
    return save_random_checkpoint(directory, ModelShape(n_layers=2, d_model=128, n_heads=8, d_mlp=512))


def timed(model, examples, method: str, args, **kwargs) -> tuple[float, object]:
    evaluate(model, examples[: args.batch_size], method=method, batch_size=args.batch_size,
             template=args.template, progress=False, **kwargs)  # warm-up
    start = time.perf_counter()
    result = evaluate(model, examples, method=method, batch_size=args.batch_size, template=args.template,
                      progress=False, **kwargs)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory or hub id (default: a random toy model)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template", default=None, help="default: the checkpoint's (toy for the random model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--uncached", action="store_true", help="also time generation without the key-value cache")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = args.model or random_toy_model(tmp / "toy-random")
        model = load_model(path, device=args.device)
        paths = generate_dataset(TaskConfig(num_samples=200, num_operations=12, seed=2255), tmp / "data")
        examples = read_examples(paths["test-subsample"])[: args.queries]
        t_gen, gen = timed(model, examples, "generate", args)
        t_fast, fast = timed(model, examples, "fast", args)
        if args.uncached:
            t_naive, naive = timed(model, examples, "generate", args, kv_cache=False)
    n = len(examples)
    same = (fast.frame["exact_fast"] == gen.frame["exact_generate"]).mean()
    tokens = gen.frame["prediction"].map(lambda p: len(model.tokenizer(p, add_special_tokens=False)["input_ids"]))
    print(f"model {fast.summary['model']} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}) on "
          f"{fast.summary['device']}, {torch.get_num_threads()} torch threads, dtype {fast.summary['dtype']}")
    print(f"{n} per-box queries (12-operation test-subsample), template {fast.summary['template']!r}, "
          f"batch size {args.batch_size}, context reuse {fast.summary['context_reuse']}, "
          f"kv cache {gen.summary['kv_cache']}, max_new_tokens {gen.summary['max_new_tokens']}, "
          f"mean generated tokens {tokens.mean():.1f}")
    print(f"generate: {t_gen:7.2f} s  {n / t_gen:8.1f} queries/s  accuracy(set) {gen.summary['accuracy']:.3f}")
    print(f"fast:     {t_fast:7.2f} s  {n / t_fast:8.1f} queries/s  accuracy(exact) {fast.summary['accuracy']:.3f}")
    if args.uncached:
        same_naive = (naive.frame["prediction"] == gen.frame["prediction"]).mean()
        print(f"generate without kv cache (a full forward per token): {t_naive:7.2f} s  {n / t_naive:8.1f} queries/s, "
              f"fast/uncached ratio {t_naive / t_fast:.2f}, same predictions {same_naive:.4f}")
    print(f"ratio={(n / t_fast) / (n / t_gen):.2f} agreement={same:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

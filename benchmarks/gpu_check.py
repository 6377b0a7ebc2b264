"""A GPU check ready to run: SmolLM2-135M on CUDA (or CPU when none) in bfloat16 and float32.

    .venv/bin/python benchmarks/gpu_check.py [--model DIR] [--queries 28]

For each dtype: logit parity with the CPU float32 run on the same prompts (max |diff| of log-probs at
the read positions, and argmax agreement), throughput of eval (fast method), caching (``resid_post`` at
``query_last``, every layer) and patching (``patch_resid_pre`` at ``query_last`` over 4 query-box pairs),
and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS). ``--model`` defaults to
the converted SmolLM2 checkpoint of the test cache (``~/.cache/boxprobe-tests/smollm2``).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from boxprobe.activations.cache import CacheConfig, build_cache  # noqa: E402
from boxprobe.behaviour.evaluate import EvalConfig, evaluate  # noqa: E402
from boxprobe.causal.patching import patch_resid_pre  # noqa: E402
from boxprobe.data.pairs import build_pairs, collate_pairs  # noqa: E402
from boxprobe.data.queries import prepare, resolve_spec  # noqa: E402
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples  # noqa: E402
from boxprobe.models.loading import load_model  # noqa: E402


def _default_model() -> str:
    found = sorted((Path.home() / ".cache" / "boxprobe-tests" / "smollm2").glob("*float32*"))
    if not found:
        raise SystemExit("no converted SmolLM2 checkpoint in ~/.cache/boxprobe-tests/smollm2; pass --model DIR")
    return str(found[0])


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_logprobs(model, queries) -> torch.Tensor:
    """Log-probs at the last prompt position of each query, float32 on the CPU."""
    out = []
    with torch.inference_mode():
        for q in queries:
            ids = torch.tensor([q.prompt], device=model.cfg.device)
            out.append(model(ids)[0, -1].float().log_softmax(-1).cpu())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--queries", type=int, default=28)
    args = parser.parse_args()
    model_dir = args.model or _default_model()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else " (no GPU found)"))
    task = TaskConfig(num_samples=30, num_operations=3)
    examples = [e for s in generate_sequences(task) for e in sequence_examples(s, task)][:200]

    reference = load_model(model_dir, device="cpu", dtype="float32")
    ref_queries = prepare(reference, examples, resolve_spec(reference))
    ref = _read_logprobs(reference, ref_queries[:8])
    del reference
    for dtype in ("float32", "bfloat16"):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = load_model(model_dir, device=device, dtype=dtype)
        queries = prepare(model, examples, resolve_spec(model))
        got = _read_logprobs(model, queries[:8])
        parity = (got - ref).abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        sub = queries[:args.queries]
        t = time.perf_counter()
        evaluate(model, sub, EvalConfig(batch_size=16, progress=False))
        t_eval = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            build_cache(model, sub, tmp, CacheConfig(batch_size=16), progress=False)
            t_cache = time.perf_counter() - t
        pairs, _ = build_pairs(model, queries, "query-box", seed=0)
        batch = collate_pairs(pairs[:4], model.tokenizer.pad_token_id, device=model.cfg.device)
        t = time.perf_counter()
        patch_resid_pre(model, batch, positions="query_last", progress=False)
        t_patch = time.perf_counter() - t
        print(f"{dtype:>9}: max|dlogprob| vs cpu float32 {parity:.2e}, argmax agreement {agree:.2f}; "
              f"eval {len(sub) / t_eval:.1f} q/s, cache {len(sub) / t_cache:.1f} q/s, "
              f"patch {model.cfg.n_layers / t_patch:.2f} layers/s; peak {_peak_mb(device):.0f} MB")
        del model


if __name__ == "__main__":
    main()

"""Throughput of boxprobe's default evaluation (method="greedy") vs plain transformers ``generate``, one run.

    .venv/bin/python benchmarks/eval_speed.py [--model PATH] [--template default] [--queries 112] [--batch-size 16]

Default model: SmolLM2-135M-Instruct converted to /tmp/smol-hf if that directory exists, else a random
toy-sized Llama built in a temporary directory (use ``--template toy`` for models without room for
demonstrations, e.g. ``--model assets/models/toy-base --template toy``). The queries are the first
``--queries`` per-box queries of the test-subsample split of a generated 12-operation dataset.

Both sides get the same model weights, the same token ids (boxprobe's encoding of each prompt), the same
batch size and ``max_new_tokens``, after one warm-up batch each. ``generate`` runs the checkpoint
as a plain ``AutoModelForCausalLM``: one prompt per query, left-padded batches, greedy, KV cache on,
stopped at the closing period (any token holding "." or a newline, or EOS). Its answers are scored with
the same set rule. The last line reads ``ratio=<boxprobe / generate throughput>
agreement=<fraction of equal set-rule verdicts> token_ratio=<per-prompt / computed positions>``.
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
from transformers import AutoModelForCausalLM  # noqa: E402

from boxprobe.behaviour.decoding import stop_ids  # noqa: E402
from boxprobe.behaviour.evaluate import EvalConfig, evaluate  # noqa: E402
from boxprobe.behaviour.scoring import contents_match  # noqa: E402
from boxprobe.data.queries import prepare, resolve_spec  # noqa: E402
from boxprobe.data.task import TaskConfig, generate_dataset, read_examples  # noqa: E402
from boxprobe.models.loading import load_model  # noqa: E402
from boxprobe.models.toy import ModelShape, save_random_checkpoint  # noqa: E402

SMOLLM2 = Path("/tmp/smol-hf")


def hf_generate(hf, prompts: list[list[int]], batch_size: int, max_new: int, stops: set[int], pad_id: int):
    out = []
    for s in range(0, len(prompts), batch_size):
        rows = prompts[s:s + batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              num_beams=1, eos_token_id=sorted(stops), pad_token_id=pad_id, use_cache=True)
        for row in gen[:, width:].tolist():
            out.append(row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=f"checkpoint directory (default: {SMOLLM2} if present, else a random toy)")
    parser.add_argument("--template", default="default", help="prompt template (default: the 2-shot per-box 'default')")
    parser.add_argument("--queries", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = args.model or (SMOLLM2 if SMOLLM2.exists() else
                              save_random_checkpoint(tmp / "toy-random", ModelShape(n_layers=2, d_model=128, n_heads=8, d_mlp=512)))
        model = load_model(path, device="cpu")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        paths = generate_dataset(TaskConfig(num_samples=200, num_operations=12, seed=2255), tmp / "data")
        examples = read_examples(paths["test-subsample"])[: args.queries]

        spec, cfg = resolve_spec(model, args.template), EvalConfig(batch_size=args.batch_size, progress=False)
        evaluate(model, prepare(model, examples[: args.batch_size], spec), cfg)  # warm-up
        start = time.perf_counter()
        queries = prepare(model, examples, spec)  # tokenising counts on our side, as generate's does on its
        ours = evaluate(model, queries, cfg)
        t_ours = time.perf_counter() - start

        tok = model.tokenizer
        items = list(queries.items)
        stops, pad = stop_ids(tok), next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        max_new = ours.summary["max_new_tokens"]
        prompts = [it.prompt for it in items]
        hf_generate(hf, prompts[: args.batch_size], args.batch_size, max_new, stops, pad)  # warm-up
        start = time.perf_counter()
        gens = hf_generate(hf, prompts, args.batch_size, max_new, stops, pad)
        t_gen = time.perf_counter() - start
    texts = [tok.decode(g, skip_special_tokens=True).strip() for g in gens]
    verdicts = [contents_match(t, ex.gold) for t, ex in zip(texts, examples)]
    frame = ours.frame
    agreement = (frame["correct"] == verdicts).mean()
    same_text = (frame["prediction"] == texts).mean()
    n, s = len(examples), ours.summary
    print(f"model {s['model']} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}), cpu, "
          f"{torch.get_num_threads()} torch threads, dtype {s['dtype']}")
    print(f"{n} per-box queries (12-operation test-subsample), template {s['template']!r}, batch size {args.batch_size}, "
          f"max_new_tokens {max_new}, mean prompt tokens {sum(map(len, prompts)) / n:.0f}, "
          f"mean generated tokens {sum(map(len, gens)) / n:.1f}")
    print(f"generate (transformers): {t_gen:7.2f} s  {n / t_gen:7.2f} queries/s  accuracy(set) {sum(verdicts) / n:.3f}")
    print(f"boxprobe greedy:         {t_ours:7.2f} s  {n / t_ours:7.2f} queries/s  accuracy(set) {s['accuracy']:.3f}")
    tk = s["tokens"]
    print(f"positions computed: boxprobe {tk['computed']}, per-prompt greedy {tk['per_prompt_run']}; "
          f"identical answer text {same_text:.4f}")
    print(f"ratio={t_gen / t_ours:.2f} agreement={agreement:.4f} token_ratio={tk['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy by numops (0..7) of one model under several prompting protocols, greedy decoding, set rule.

    .venv/bin/python benchmarks/protocol_accuracy.py [--model /tmp/smol-hf] [--per-numops 20] [--states-per-numops 5]

Data: the test-subsample split of ``generate_dataset(TaskConfig(), dir)``. Per-box protocols (``default``,
``tang``) evaluate the first ``--per-numops`` examples of each numops value; the all-boxes protocol
(``kst24``, free and regex-constrained) evaluates ``--states-per-numops`` states chosen per numops value
by :func:`boxprobe.data.task.subsample_by_numops` (all seven boxes each, so most boxes have low numops).
Prints one table row per protocol and writes each result under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from boxprobe.behaviour.evaluate import EvalConfig, evaluate  # noqa: E402
from boxprobe.data.queries import prepare, resolve_spec  # noqa: E402
from boxprobe.data.task import TaskConfig, generate_dataset, read_examples, subsample_by_numops  # noqa: E402
from boxprobe.models.loading import load_model  # noqa: E402

SETTINGS = {"default": ("default", "per-box", False), "tang": ("tang", "per-box", False),
            "kst24": ("kst24", "all-boxes", False), "kst24+regex": ("kst24", "all-boxes", True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/smol-hf")
    parser.add_argument("--per-numops", type=int, default=20)
    parser.add_argument("--states-per-numops", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write each setting's results here")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(1)
    model = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        test = read_examples(generate_dataset(TaskConfig(), tmp)["test-subsample"])
    per_box = [ex for n in range(8) for ex in [e for e in test if e.numops == n][: args.per_numops]]
    states = subsample_by_numops(test, args.states_per_numops)
    print(f"{'setting':<12} {'n':>5} " + " ".join(f"{k:>5}" for k in range(8)) + "   all  elapsed_s  token_ratio")
    for name in args.settings:
        template, fmt, constrained = SETTINGS[name]
        queries = prepare(model, per_box if fmt == "per-box" else states, resolve_spec(model, template, fmt))
        result = evaluate(model, queries, EvalConfig(constrained=constrained, batch_size=args.batch_size,
                                                     progress=False))
        s = result.summary
        accs = " ".join("    -" if s["accuracy_by_numops"][str(k)] is None else f"{s['accuracy_by_numops'][str(k)]:5.2f}"
                        for k in range(8))
        print(f"{name:<12} {s['n_examples']:>5} {accs} {s['accuracy']:5.2f} {s['elapsed_s']:10.1f} "
              f"{s['tokens']['ratio']:12.2f}", flush=True)
        print(f"{'  n':<12} {'':>5} " + " ".join(f"{s['n_by_numops'][str(k)]:>5}" for k in range(8)), flush=True)
        if args.out:
            result.save(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

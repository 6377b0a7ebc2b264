"""The ``boxprobe`` command line: thin wrappers over the Python API.

    boxprobe generate --out DIR [--seed 2255] [--num-samples 2200] [--num-operations 12] [--variant ...]
    boxprobe eval --model NAME_OR_PATH --data FILE --out DIR [--format per-box|all-boxes] [--limit N] ...
    boxprobe probe CONFIG.yaml [--out DIR]
    boxprobe demo [--out DIR] [--models M ...] [--stages ...]
    boxprobe dashboard RUN_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

VARIANTS = ("alt-forms", "disjoint-vocab", "numops-split", "move-contents", "seq2seq")


def _generate(args: argparse.Namespace) -> int:
    from boxprobe.data.task import TaskConfig, generate_dataset

    variants = set(args.variant or ())
    cfg = TaskConfig(
        num_samples=args.num_samples, num_operations=args.num_operations, seed=args.seed, num_boxes=args.num_boxes,
        alt_forms="alt-forms" in variants, move_contents="move-contents" in variants,
        numops_split="numops-split" in variants,
        disjoint_vocab_splits=tuple(args.disjoint_splits) if "disjoint-vocab" in variants else (),
        output_format="seq2seq" if "seq2seq" in variants else "in-context",
    )
    paths = generate_dataset(cfg, args.out)
    for name, path in paths.items():
        n = sum(1 for _ in path.open())
        print(f"{name:16s} {n:7d} examples  {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from boxprobe.behaviour.evaluate import evaluate_file

    result = evaluate_file(
        args.model, args.data, args.out, prompt_format=args.format, template=args.template, limit=args.limit,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, method=args.method,
        constrained=args.constrained)
    print(result.table())
    print(f"\nwrote {Path(args.out) / 'summary.json'}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    import dataclasses

    from boxprobe.config import load_yaml_config
    from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig

    cfg = load_yaml_config(ProbeExperimentConfig, args.config)
    if args.out:
        cfg = dataclasses.replace(cfg, out_dir=str(args.out))
    run = ProbeExperiment(cfg).run()
    nt = run.probe_accuracy[run.probe_accuracy.metric == "non_trivial"]
    print(nt.pivot_table(index=["probe", "model", "kind"], columns="layer", values="value").round(3).to_string())
    print(f"\nwrote CSVs to {run.out_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from boxprobe.pipeline.demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=str(args.out))
    if args.models:
        cfg = dataclasses.replace(cfg, models=tuple(args.models))
    if args.stages:
        cfg = dataclasses.replace(cfg, stages=tuple(args.stages))
    result = run_demo(cfg)
    behaviour = Path(args.out) / "behaviour.csv"
    if behaviour.exists():
        import pandas as pd

        table = pd.read_csv(behaviour).pivot_table(index="model", columns="numops", values="accuracy")
        print("accuracy by numops\n" + table.round(2).to_string())
    print(f"\nwrote {result}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from boxprobe.report.dashboard import dashboard_from_run

    print(f"wrote {dashboard_from_run(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxprobe", description="Entity tracking interpretability on the boxes task.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write train/dev/test(-subsample) JSONL files of the boxes task")
    gen.add_argument("--out", required=True, type=Path, help="output directory")
    gen.add_argument("--seed", type=int, default=2255)
    gen.add_argument("--num-samples", type=int, default=2200, help="number of distinct initial states")
    gen.add_argument("--num-operations", type=int, default=12)
    gen.add_argument("--num-boxes", type=int, default=7)
    gen.add_argument("--variant", action="append", choices=VARIANTS, help="may be given several times")
    gen.add_argument("--disjoint-splits", nargs="+", default=["dev", "test"],
                     help="splits that use the rare vocabulary with --variant disjoint-vocab")
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="behavioural accuracy of a model by numops")
    ev.add_argument("--model", required=True, help="Hugging Face id, registry name or checkpoint directory")
    ev.add_argument("--data", required=True, type=Path, help="boxes JSONL file")
    ev.add_argument("--out", required=True, type=Path, help="output directory")
    ev.add_argument("--format", choices=("per-box", "all-boxes"), default=None,
                    help="prompt format (default: the checkpoint's recorded format, else per-box)")
    ev.add_argument("--template", default=None, help="prompt template name or JSON file (default: the checkpoint's, else default)")
    ev.add_argument("--method", choices=("greedy", "fast", "generate", "both"), default="greedy",
                    help="greedy: greedy decoding's answers, speculatively; fast: exact match in one pass; generate: plain greedy")
    ev.add_argument("--constrained", action="store_true", help="regex-constrained greedy decoding (Kim et al. 2024)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    ev.add_argument("--device", default=None)
    ev.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("probe", help="run a probe experiment from a YAML config")
    pr.add_argument("config", type=Path, help="YAML file of ProbeExperimentConfig fields (see experiments/)")
    pr.add_argument("--out", type=Path, default=None, help="override the config's out_dir")
    pr.set_defaults(func=_probe)

    from boxprobe.pipeline.demo import STAGES

    de = sub.add_parser("demo", help="every analysis stage on the bundled toy models, with a dashboard")
    de.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    de.add_argument("--models", nargs="+", default=None, help="models instead of the bundled toy models")
    de.add_argument("--stages", nargs="+", choices=STAGES, default=None)
    de.set_defaults(func=_demo)

    da = sub.add_parser("dashboard", help="write RUN_DIR/dashboard.html from a run directory")
    da.add_argument("run_dir", type=Path)
    da.set_defaults(func=_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"boxprobe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

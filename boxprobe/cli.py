"""The ``boxprobe`` command line: thin wrappers over the Python API.

    boxprobe generate --out DIR [--seed 2255] [--num-samples 2200] [--num-operations 12] [--variant ...]
    boxprobe eval --model NAME_OR_PATH --data FILE --out DIR [--format per-box|all-boxes] [--limit N] [--chat] ...
    boxprobe probe CONFIG.yaml [--out DIR]
    boxprobe circuit --model M --data FILE --out DIR [--template T --format F] [--pairs 100] [--donor M2]
    boxprobe demo [--out DIR] [--models M ...] [--stages ...]
    boxprobe dashboard RUN_DIR
    boxprobe convert PATH.gguf --out DIR
    boxprobe plan --model NAME [--stages eval,cache,probe,patch] [--gpu h100-80gb] [--data FILE] ...
    boxprobe sweep run CONFIG.yaml [--executor local|slurm]
    boxprobe sweep collect CONFIG.yaml

A failure is one line on stderr, ``boxprobe: error: <message>``, and a non-zero exit status: 2 for bad
input or state (a :class:`~boxprobe.errors.BoxprobeError`, as for argument errors), 1 for an operating
system error (a missing file, a full disk) or an unexpected exception, 130 for Ctrl-C. ``--debug`` also
prints the traceback.

Start-up imports only the standard library and :mod:`boxprobe.errors`, so ``--help`` and argument errors
answer at once; each handler imports what it needs (torch, transformers, pandas...) when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from boxprobe.errors import BoxprobeError

VARIANTS = ("alt-forms", "disjoint-vocab", "numops-split", "move-contents", "seq2seq")
# boxprobe.pipeline.demo.STAGES, repeated here because importing the demo imports torch (a test keeps them equal).
DEMO_STAGES = ("behaviour", "probes", "attention", "patching", "dashboard")
EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130
_MAX_MESSAGE = 500


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
        with path.open() as f:
            n = sum(1 for _ in f)
        print(f"{name:16s} {n:7d} examples  {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from boxprobe.behaviour.evaluate import EvalConfig, evaluate_file

    model, load = args.model, _load_config(args)
    if set(load.kwargs()) - {"device", "dtype"}:  # spread over devices: load here (evaluate_file takes device/dtype)
        from boxprobe.models.loading import load_model

        model = load_model(args.model, **load.kwargs())
    result = evaluate_file(
        model, args.data, args.out, prompt_format=args.format, template=args.template, limit=args.limit,
        device=args.device, dtype=args.dtype, chat=args.chat, overwrite=args.overwrite,
        config=EvalConfig(batch_size=args.batch_size, method=args.method, constrained=args.constrained,
                          draft_tokens=args.draft_tokens))
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
    cfg = dataclasses.replace(cfg, load=cfg.placement().override(_load_config(args)), device=None)
    run = ProbeExperiment(cfg, overwrite=args.overwrite, repair=args.repair).run()
    acc = run.probe_accuracy
    # one headline metric per probe (balanced accuracy where the probe reports it), task beside its baselines
    headline = acc.groupby("probe")["metric"].agg(lambda m: "balanced_accuracy" if "balanced_accuracy" in set(m)
                                                  else "accuracy")
    table = acc[acc.metric == acc.probe.map(headline)]
    print(table.pivot_table(index=["probe", "metric", "model", "kind"], columns="layer", values="value")
          .round(3).to_string())
    print(f"\nwrote CSVs to {run.out_dir}")
    return 0


def _circuit(args: argparse.Namespace) -> int:
    import torch

    from boxprobe.causal.study import CircuitStudyConfig, circuit_study
    from boxprobe.data.queries import prepare, resolve_spec
    from boxprobe.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    load = _load_config(args)
    model = load_model(args.model, **load.kwargs())
    spec = resolve_spec(model, template=args.template, format=args.format)
    queries = prepare(model, args.data, spec, limit=args.limit)
    donor = load_model(args.donor, **load.kwargs()) if args.donor else None
    cfg = CircuitStudyConfig(n_pairs=args.pairs, n_reference=args.reference_pairs, top_k=tuple(args.top_k),
                             variant=args.variant, minimality=not args.no_minimality, max_batch=args.batch_size,
                             dcm_steps=args.dcm_steps, cmap_pairs=args.cmap_pairs)
    circuit = circuit_study(model, queries, args.out, cfg, donor=donor)
    for group, heads in circuit.groups.items():
        print(f"{group:22s} @ {circuit.positions[group]:14s} {' '.join(f'{l}.{h}' for l, h in heads)}")
    print(f"faithfulness {circuit.faithfulness} on {circuit.n_pairs} pairs -> {Path(args.out) / 'circuit.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from boxprobe.pipeline.demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=str(args.out), load=_load_config(args))
    if args.models:
        cfg = dataclasses.replace(cfg, models=tuple(args.models))
    if args.stages:
        cfg = dataclasses.replace(cfg, stages=tuple(args.stages))
    result = run_demo(cfg, overwrite=args.overwrite)
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


def _convert(args: argparse.Namespace) -> int:
    from boxprobe.models.gguf import convert_gguf

    print(f"wrote {convert_gguf(args.gguf, args.out, overwrite=args.overwrite)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from boxprobe.pipeline.plan import PlanConfig, make_plan, parse_layers

    cfg = PlanConfig(model=args.model, stages=tuple(s for s in args.stages.split(",") if s), gpu=args.gpu,
                     dtype=args.dtype, data=None if args.data is None else str(args.data), n_queries=args.n_queries,
                     batch_size=args.batch_size, roles=tuple(args.roles.split(",")), layers=parse_layers(args.layers),
                     store_dtype=args.store_dtype, patch_pairs=args.patch_pairs)
    plan = make_plan(cfg)
    print(plan.text())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plan.frame.to_csv(args.out, index=False)
        print(f"\nwrote {args.out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from boxprobe.pipeline.sweep import collect, load_sweep_config, run_sweep

    cfg = load_sweep_config(args.config)
    if args.action == "run":
        report = run_sweep(cfg, executor=args.executor)
        print(report.to_string(index=False))
        failed = report[report["status"] == "failed"]
        return 1 if len(failed) else 0
    paths = collect(cfg)
    for name, path in paths.items():
        print(f"{name:24s} {path}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)  # argparse turns a ValueError here into "invalid _positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive_int.__name__ = "int"  # argparse names the type in its message: "invalid int value: 'x'"


def _placement_args(parser: argparse.ArgumentParser) -> None:
    """Where and in what dtype models load: the same flags on every command that loads one (see
    :class:`boxprobe.models.placement.LoadConfig`; :func:`_load_config` reads them back)."""
    group = parser.add_argument_group("model placement")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    group.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    group.add_argument("--device-map", default=None,
                        help='spread the model over devices: "auto", "balanced" or a JSON {module: device} (cpu/disk offload)')
    group.add_argument("--n-devices", type=_positive_int, default=None, help="split the model evenly over N GPUs")
    group.add_argument("--max-memory", default=None, help='per-device budget as JSON, e.g. \'{"0": "70GiB", "cpu": "200GiB"}\'')
    group.add_argument("--offload-folder", default=None, help="where disk-offloaded weights go")


def _load_config(args: argparse.Namespace):
    """The placement flags of :func:`_placement_args` as a LoadConfig (unset flags stay None)."""
    from boxprobe.models.placement import LoadConfig, parse_mapping

    return LoadConfig(device=args.device, dtype=args.dtype, device_map=parse_mapping(args.device_map, "--device-map"),
                      n_devices=args.n_devices, max_memory=parse_mapping(args.max_memory, "--max-memory"),
                      offload_folder=args.offload_folder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxprobe", description="Entity tracking interpretability on the boxes task.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    # The same flags after the subcommand (boxprobe eval ... --debug); SUPPRESS keeps an absent one from
    # overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="write train/dev/test(-subsample) JSONL files of the boxes task")
    gen.add_argument("--out", required=True, type=Path, help="output directory")
    gen.add_argument("--seed", type=int, default=2255)
    gen.add_argument("--num-samples", type=int, default=2200, help="number of distinct initial states")
    gen.add_argument("--num-operations", type=int, default=12)
    gen.add_argument("--num-boxes", type=int, default=7)
    gen.add_argument("--variant", action="append", choices=VARIANTS, help="may be given several times")
    gen.add_argument("--disjoint-splits", nargs="+", default=["dev", "test"],
                     help="splits that use the rare vocabulary with --variant disjoint-vocab")
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", parents=[common], help="behavioural accuracy of a model by numops")
    ev.add_argument("--model", required=True, help="Hugging Face id, registry name or checkpoint directory")
    ev.add_argument("--data", required=True, type=Path, help="boxes JSONL file")
    ev.add_argument("--out", required=True, type=Path, help="output directory")
    ev.add_argument("--format", choices=("per-box", "all-boxes"), default=None,
                    help="prompt format (default: the checkpoint's recorded format, else per-box)")
    ev.add_argument("--template", default=None, help="prompt template name or JSON file (default: the checkpoint's, else default)")
    ev.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap each prompt in the tokenizer's chat template, for instruct models (default: as the "
                         "checkpoint's boxprobe.json records, else no)")
    ev.add_argument("--method", choices=("greedy", "fast", "generate", "both"), default="greedy",
                    help="greedy: greedy decoding's answers, speculatively; fast: exact match in one pass; "
                         "generate: plain greedy")
    ev.add_argument("--constrained", action="store_true", help="regex-constrained greedy decoding (Kim et al. 2024)")
    ev.add_argument("--draft-tokens", type=int, default=4,
                    help="greedy: prompt-lookup draft length verified per step after an answer leaves the gold "
                         "(0: one token per step; changes speed only)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N queries")
    ev.add_argument("--batch-size", type=_positive_int, default=16, help="starting batch size (halved on out-of-memory)")
    ev.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    _placement_args(ev)
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("probe", parents=[common], help="run a probe experiment from a YAML config")
    pr.add_argument("config", type=Path, help="YAML file of ProbeExperimentConfig fields (see experiments/)")
    pr.add_argument("--out", type=Path, default=None, help="override the config's out_dir")
    pr.add_argument("--overwrite", action="store_true", help="replace another run's results in the out_dir")
    pr.add_argument("--repair", action="store_true",
                    help="rebuild activation caches whose manifest is damaged (damaged shards are always rebuilt)")
    _placement_args(pr)  # flags given here override the config's load
    pr.set_defaults(func=_probe)

    ci = sub.add_parser("circuit", parents=[common], help="discover and evaluate the entity-tracking circuit (Prakash et al.)")
    ci.add_argument("--model", required=True, help="Hugging Face id, registry name or checkpoint directory")
    ci.add_argument("--data", required=True, type=Path, help="boxes JSONL file (per-box queries; one pair per context)")
    ci.add_argument("--out", required=True, type=Path, help="output directory (circuit.json, circuit_*.csv, cmap.csv)")
    ci.add_argument("--template", default=None, help="prompt template name or JSON file (default: the checkpoint's)")
    ci.add_argument("--format", choices=("per-box",), default=None, help="prompt format (pairs are per-box)")
    ci.add_argument("--limit", type=_positive_int, default=None, help="use only the first N queries of the data")
    ci.add_argument("--pairs", type=_positive_int, default=100, help="random-query pairs for discovery")
    ci.add_argument("--reference-pairs", type=_positive_int, default=40,
                    help="further pairs whose random-label prompts give the ablation means")
    ci.add_argument("--top-k", type=_positive_int, nargs="+", default=[4, 4, 4, 2],
                    help="heads per stage: value fetcher, position transmitter, position detector, structure reader")
    ci.add_argument("--variant", choices=("freeze", "direct"), default="freeze", help="path patching variant")
    ci.add_argument("--no-minimality", action="store_true", help="skip the per-head minimality runs")
    ci.add_argument("--dcm-steps", type=int, default=0,
                    help="also learn DCM head masks for the object-value and positional desiderata (steps; 0: off)")
    ci.add_argument("--donor", default=None, help="a fine-tuned model of the same family: CMAP into --model")
    ci.add_argument("--cmap-pairs", type=_positive_int, default=100,
                    help="with --donor: at most this many pairs --model answers wrongly, for CMAP (use data with "
                         "enough contexts: one pair per context)")
    ci.add_argument("--batch-size", type=_positive_int, default=64, help="rows per forward pass")
    ci.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    _placement_args(ci)  # the donor loads the same way
    ci.set_defaults(func=_circuit)

    de = sub.add_parser("demo", parents=[common], help="every analysis stage on the bundled toy models, with a dashboard")
    de.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    de.add_argument("--models", nargs="+", default=None, help="models instead of the bundled toy models")
    de.add_argument("--stages", nargs="+", choices=DEMO_STAGES, default=None)
    de.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    _placement_args(de)
    de.set_defaults(func=_demo)

    da = sub.add_parser("dashboard", parents=[common], help="write RUN_DIR/dashboard.html from a run directory")
    da.add_argument("run_dir", type=Path)
    da.set_defaults(func=_dashboard)

    co = sub.add_parser("convert", help="dequantise a GGUF file into a float32 Hugging Face checkpoint")
    co.add_argument("gguf", type=Path, help="the .gguf file")
    co.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    co.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    co.set_defaults(func=_convert)

    pl = sub.add_parser("plan", parents=[common], help="estimate memory, disk, FLOPs and time of a run from the model's shape")
    pl.add_argument("--model", required=True, help="registry name or local checkpoint directory")
    pl.add_argument("--stages", default="eval,cache,probe,patch", help="comma-separated: eval,cache,probe,patch")
    pl.add_argument("--gpu", default="h100-80gb", help="h100-80gb, h200-141gb, a100-80gb, a100-40gb or l40s-48gb")
    pl.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16", "int8", "int4"))
    pl.add_argument("--data", type=Path, default=None, help="boxes JSONL file (default: a generated sample)")
    pl.add_argument("--n-queries", type=_positive_int, default=None, help="queries to plan for (default: the data's, else 800)")
    pl.add_argument("--batch-size", type=_positive_int, default=16)
    pl.add_argument("--roles", default="query_last", help="comma-separated cached roles")
    pl.add_argument("--layers", default="all", help="cached layers: all, 0-7 or 3,5,9")
    pl.add_argument("--store-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    pl.add_argument("--patch-pairs", type=_positive_int, default=50)
    pl.add_argument("--out", type=Path, default=None, help="also write the estimates as CSV here")
    pl.set_defaults(func=_plan)

    sw = sub.add_parser("sweep", parents=[common], help="run analysis stages over many models through submitit")
    sw.add_argument("action", choices=("run", "collect"), help="run: run the units not yet done; collect: merge them")
    sw.add_argument("config", type=Path, help="sweep YAML (models, data, stages, out_dir, executor options)")
    sw.add_argument("--executor", choices=("local", "slurm", "debug"), default=None,
                    help="override the config's executor")
    sw.set_defaults(func=_sweep)
    return parser


def _one_line(text: str) -> str:
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def error_message(err: BaseException) -> tuple[str, int]:
    """The one-line message and exit status for an exception that ended a command."""
    if isinstance(err, BoxprobeError):
        return _one_line(str(err)), EXIT_INPUT
    if isinstance(err, OSError) and err.strerror:
        # "No space left on device: runs/x/cache.safetensors" rather than "[Errno 28] No space ...: '...'"
        where = "".join(f"{sep}{name}" for sep, name in ((": ", err.filename), (" -> ", err.filename2)) if name)
        return _one_line(f"{err.strerror}{where}"), EXIT_UNEXPECTED
    kind = type(err).__qualname__
    module = type(err).__module__
    if module not in ("builtins", "__main__"):
        kind = f"{module}.{kind}"
    text = str(err)
    return _one_line(f"unexpected {kind}{': ' + text if text else ''} (run with --debug for the traceback)"), \
        EXIT_UNEXPECTED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("boxprobe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        if args.debug:
            traceback.print_exc()
        message, status = error_message(err)
        print(f"boxprobe: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate the bundled toy checkpoints, write their model cards and the +code vs +control figures.

    python experiments/toy_pretraining/report.py [--models assets/models] [--out experiments/toy_pretraining/results]

Data: a fresh standard test subsample (`boxprobe generate` defaults: seed 2255, 7 boxes, 12
operations; up to 100 states per numops value, all 7 boxes of each).
"""

import argparse
import json
from pathlib import Path

from boxprobe.data.task import TaskConfig, generate_dataset, read_examples
from lab.report import (
    TOY_MODELS,
    accuracy_figure,
    always_nothing_by_numops,
    evaluate_checkpoints,
    markdown_table,
    model_card,
    quality_checks,
)

DESCRIPTIONS = {
    "toy-base": ("boxprobe's toy base model, trained from scratch on natural-language boxes text only.",
                 "natural-language boxes task text (90% standard phrasing, 10% AltForms phrasing), 3 to 7 boxes, "
                 "0 to 12 operations by curriculum phase"),
    "toy-code": ("toy-base continued on Python programs that track containers, mixed with natural-language replay.",
                 "50% Python container programs (dict-of-lists and set styles, printed states), 50% natural-language "
                 "boxes text (7 boxes, 0-12 operations)"),
    "toy-control": ("toy-base continued for the same number of tokens as toy-code on natural language only: "
                    "the matched-compute control.", "natural-language boxes text only (7 boxes, 0-12 operations)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("assets/models"))
    parser.add_argument("--out", type=Path, default=Path("experiments/toy_pretraining/results"))
    parser.add_argument("--data-dir", type=Path, default=Path("runs/toy-report-data"))
    parser.add_argument("--no-cards", action="store_true", help="do not (re)write the model cards")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = generate_dataset(TaskConfig(), args.data_dir)
    examples = read_examples(paths["test-subsample"])
    checkpoints = {name: args.models / name for name in TOY_MODELS if (args.models / name).exists()}
    accuracy, summaries = evaluate_checkpoints(checkpoints, examples)
    baseline = always_nothing_by_numops(examples)
    accuracy.to_csv(args.out / "accuracy.csv", index=False)
    baseline.to_csv(args.out / "always_nothing.csv", index=False)
    checks = quality_checks(accuracy, baseline)
    (args.out / "quality.json").write_text(json.dumps({"toy-base": checks, "summaries": summaries}, indent=2) + "\n")
    fig = accuracy_figure(accuracy, baseline)
    fig.write_html(args.out / "accuracy.html", include_plotlyjs=True)
    try:
        fig.write_image(args.out / "accuracy.png", width=900, height=500)
    except Exception as err:  # kaleido needs a browser; HTML alone is the fallback
        print(f"PNG export unavailable ({type(err).__name__}: {err}); wrote HTML only")
    table = markdown_table(accuracy, baseline)
    (args.out / "accuracy.md").write_text(table + "\n")
    if not args.no_cards:
        for name, path in checkpoints.items():
            description, data_note = DESCRIPTIONS[name]
            (path / "README.md").write_text(model_card(name, path, accuracy, baseline, description, data_note))
    print(table)
    print("\ntoy-base quality bar:", json.dumps(checks))


if __name__ == "__main__":
    main()

"""Train (or resume) a toy checkpoint from a YAML recipe.

    python experiments/toy_pretraining/train.py experiments/toy_pretraining/base.yaml [--max-seconds N] [--out-dir DIR]

Running the same command again resumes from ``OUT_DIR/state.pt``.
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from boxprobe.config import load_yaml_config
from lab.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--max-seconds", type=float, default=None, help="stop (resumably) after this wall time")
    parser.add_argument("--out-dir", default=None, help="override the config's out_dir")
    parser.add_argument("--threads", type=int, default=None, help="override the config's torch threads")
    args = parser.parse_args()
    cfg = load_yaml_config(TrainConfig, args.config)
    overrides = {k: v for k, v in {"max_seconds": args.max_seconds, "out_dir": args.out_dir,
                                         "threads": args.threads}.items() if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(Path(cfg.out_dir) / "train.log")])
    print(train(cfg))


if __name__ == "__main__":
    main()

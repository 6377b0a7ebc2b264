"""Save the shared word-level toy tokenizer (built locally with `tokenizers`) to a directory.

    python experiments/toy_pretraining/tokenizer.py --out runs/toy-tokenizer
"""

import argparse

from boxprobe.models.toy import save_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tok = save_tokenizer(args.out)
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()

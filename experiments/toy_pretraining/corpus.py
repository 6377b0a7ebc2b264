"""Write a sample of a toy corpus as JSONL (one document per line: its segments and loss weights).

    python experiments/toy_pretraining/corpus.py --kind code --n-documents 20 --out runs/code-sample.jsonl
"""

import argparse
import json

from lab.corpus import CorpusConfig, sample_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("boxes", "code"), default="boxes")
    parser.add_argument("--n-documents", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    docs = sample_corpus(CorpusConfig(kind=args.kind, n_documents=args.n_documents, seed=args.seed))
    with open(args.out, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": "".join(t for t, _ in doc), "segments": doc}) + "\n")
    print(f"wrote {len(docs)} {args.kind} documents to {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# CMAP toy-code -> toy-base on pairs toy-base gets wrong (issue 10). The bundled demo data has too few
# of them (about 30); 600 states with up to 8 operations give about 200 in test-subsample.jsonl (one
# pair per context, every box of a context checked for an error). Writes OUT/cmap.csv beside the
# circuit files; rows: group x metric x stage (before / after / donor), intervals clustered by context.
set -euo pipefail
OUT=${1:-runs/cmap_toy}
PY=${PY:-.venv/bin/python}
$PY -m boxprobe generate --out "$OUT/data" --num-samples 600 --num-operations 8
$PY -m boxprobe circuit --model assets/models/toy-base --donor assets/models/toy-code \
    --data "$OUT/data/test-subsample.jsonl" --out "$OUT" --cmap-pairs 200 --no-minimality --threads 1

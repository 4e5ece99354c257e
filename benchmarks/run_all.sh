#!/usr/bin/env bash
# One run of every benchmark the README's Performance section shows (needs `pip install -e '.[bench]'`).
# Usage: bash benchmarks/run_all.sh [OUT.jsonl]   (about 40 minutes on a 2-core CPU); then
#        python -m benchmarks.tables OUT.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results.jsonl}
PY=${PYTHON:-python}
{ $PY -m benchmarks.train_step --models ml1,ml2,ml4,ml5,ml6 \
      --frameworks imgclf_jax,imgclf_jax-xla,keras-tensorflow,keras-jax --repeats 3 --repeat_seconds 4
  $PY -m benchmarks.ensemble --model ml1 --members 1,2,4,8 --mappings vmap,unroll,map --max_step_seconds 45
  $PY -m benchmarks.input_pipeline
  $PY -m benchmarks.profile_step --model ml1
} > "$OUT"
echo "wrote $OUT; tables: python -m benchmarks.tables $OUT" >&2

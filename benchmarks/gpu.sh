#!/usr/bin/env bash
# Runs the benchmarks and the reference runs on a CUDA machine, offline, and writes JSON results.
#
#   bash benchmarks/gpu.sh WHEELS OUT [PACK]
#
# WHEELS: a folder of wheels for benchmarks/requirements-gpu.txt (see that file for how to build
#         it; '-' to install nothing and use what the Python environment already has).
# OUT:    the results folder (created): machine.jsonl, train_step.jsonl, profile_<model>.jsonl, ensemble.jsonl,
#         input_pipeline.jsonl, device_augment.jsonl, a .log of each, status.txt (one exit status per step),
#         pip-freeze.txt, nvidia-smi.txt and, with PACK, one folder per run (runs/ml6/, runs/ml6_ensemble/:
#         the workdir's JSON, CSV and PNG files; checkpoints stay in $BENCH_WORK).
# PACK:   a data pack (python -m imgclf_jax.pack write ...: pack.json + part-*.bin), unpacked into
#         $BENCH_WORK/data; then device_augment reads the real images, and the runs train on them.
#         Without PACK the data is synthetic and no run trains.
#
# Needs: a Python with jax (CUDA), flax, optax and orbax-checkpoint ($PYTHON, default python3).
# Nothing is downloaded: the packages come from WHEELS, installed into a virtual environment under
# OUT that also sees $PYTHON's packages ($PYTHON's are not touched).
# It refuses to run unless JAX's default backend is a GPU; BENCH_ALLOW_CPU=1 lets it run on a
# CPU for a dry run (with e.g. BENCH_IMAGE_SIZE=32 BENCH_MODELS=ml1 for a quick one).
#
# Knobs (environment): BENCH_MODELS (ml1,ml2,ml4,ml5,ml6), BENCH_FRAMEWORKS
# (imgclf_jax,imgclf_jax-xla,imgclf_jax-bf16,keras-jax,keras-tensorflow), BENCH_STEPS (steps per repeat; default:
# chosen so a repeat lasts BENCH_REPEAT_SECONDS, default 3), BENCH_REPEATS (5), BENCH_BATCH (32),
# BENCH_IMAGE_SIZE (the configs' 128), BENCH_PROFILE_MODELS (ml1,ml6), BENCH_WORKERS (0,1,2,4,8),
# BENCH_ENSEMBLE_MODEL (ml1) and BENCH_MEMBERS (1,2,4,8) for benchmarks.ensemble, BENCH_AUGMENT_BATCHES
# (timed batches of benchmarks.device_augment, default its 30 after 4 warm-up; set: after 2, for a small pack),
# BENCH_BENCHMARKS (machine,train_step,profile,input_pipeline,device_augment,ensemble: which to run; '' none),
# BENCH_RUNS (ml6,ml6_ensemble: the configs trained with PACK; '' none), BENCH_TRAIN_FLAGS (extra
# --config.KEY=VALUE words for every run; default --config.data.on_device=true), BENCH_ENSEMBLE_FLAGS
# (extra words for ml6_ensemble only, e.g. --config.ensemble.num_members=3), BENCH_WORK (checkpoints, the
# unpacked data and the run workdirs; default $OUT/../gpu-work, outside OUT so OUT stays small).
set -uo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
WHEELS=$1
[ "$WHEELS" = - ] || [ ! -d "$WHEELS" ] || WHEELS=$(cd "$WHEELS" && pwd)
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
PACK=${3:-}
[ -z "$PACK" ] || PACK=$(cd "$PACK" && pwd) || { echo "gpu.sh: no pack folder '$3'" >&2; exit 1; }
WORK=${BENCH_WORK:-$OUT/../gpu-work}
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

MODELS=${BENCH_MODELS:-ml1,ml2,ml4,ml5,ml6}
FRAMEWORKS=${BENCH_FRAMEWORKS:-imgclf_jax,imgclf_jax-xla,imgclf_jax-bf16,keras-jax,keras-tensorflow}
BENCHMARKS=${BENCH_BENCHMARKS-machine,train_step,profile,input_pipeline,device_augment,ensemble}
RUNS=${BENCH_RUNS-ml6,ml6_ensemble}
read -r -a TRAIN_FLAGS <<< "${BENCH_TRAIN_FLAGS---config.data.on_device=true}"
read -r -a ENSEMBLE_FLAGS <<< "${BENCH_ENSEMBLE_FLAGS:-}"
PROFILE_MODELS=${BENCH_PROFILE_MODELS:-ml1,ml6}
WORKERS=${BENCH_WORKERS:-0,1,2,4,8}
ENSEMBLE_MODEL=${BENCH_ENSEMBLE_MODEL:-ml1}
STEP_FLAGS=(--repeats="${BENCH_REPEATS:-5}" --batch="${BENCH_BATCH:-32}"
            --repeat_seconds="${BENCH_REPEAT_SECONDS:-3}")
[ -n "${BENCH_STEPS:-}" ] && STEP_FLAGS+=(--steps="$BENCH_STEPS")
SIZE_FLAGS=()
[ -n "${BENCH_IMAGE_SIZE:-}" ] && SIZE_FLAGS+=(--image_size="$BENCH_IMAGE_SIZE")

fail() { echo "gpu.sh: $*" >&2; exit 1; }

"$PYTHON" -c 'import jax, flax, optax, orbax.checkpoint' \
  || fail "$PYTHON lacks jax, flax, optax or orbax-checkpoint (set PYTHON=...)"
backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())') || fail "jax does not start"
if [ "$backend" != gpu ] && [ "${BENCH_ALLOW_CPU:-0}" != 1 ]; then
  fail "JAX's default backend is '$backend', not 'gpu' (BENCH_ALLOW_CPU=1 for a dry run on CPU)"
fi

# A virtual environment that sees $PYTHON's packages (jax, flax, optax, orbax: through a .pth
# file, which works whether $PYTHON is a system, conda or virtualenv Python), plus the wheels.
"$PYTHON" -m venv "$OUT/venv" || fail "cannot create a venv in $OUT/venv"
PY="$OUT/venv/bin/python"
"$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' \
  > "$("$PY" -c 'import site; print(site.getsitepackages()[0])')/_benchmarks_base.pth"
"$PY" -c 'import jax, flax, optax' || fail "the venv in $OUT/venv does not see $PYTHON's jax"
venv_backend=$("$PY" -c 'import jax; print(jax.default_backend())') || fail "jax does not start in $OUT/venv"
[ "$venv_backend" = "$backend" ] \
  || fail "JAX's backend is '$backend' for $PYTHON but '$venv_backend' in $OUT/venv (its CUDA plugin not seen?)"
if [ "$WHEELS" != - ]; then
  [ -d "$WHEELS" ] || fail "no wheel folder '$WHEELS'"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r benchmarks/requirements-gpu.txt \
    || fail "installing benchmarks/requirements-gpu.txt from $WHEELS failed (a wheel is missing?)"
  if ls "$WHEELS" | grep -qi '^tensorflow'; then
    tf=$(ls "$WHEELS" | grep -i '^tensorflow' | grep -vi 'datasets\|metadata\|estimator\|io' | head -1 | cut -d- -f1)
    [ -n "$tf" ] && { "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$tf" \
      || echo "gpu.sh: installing $tf failed; keras-tensorflow rows will say so" >&2; }
  fi
fi
"$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_FORCE_GPU_ALLOW_GROWTH=true  # TensorFlow's peak memory then means what it used
: > "$OUT/status.txt"
run() {  # run NAME ARGS...: python -m ARGS > OUT/NAME.jsonl, stderr to OUT/NAME.log; go on after a failure
  local name=$1; shift
  echo "gpu.sh: $name ..." >&2
  "$PY" -m "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
  local code=$?
  echo "$name $code" >> "$OUT/status.txt"
  [ $code -eq 0 ] || echo "gpu.sh: $name failed ($code); see $OUT/$name.log" >&2
}

wants() { [[ ",$BENCHMARKS," == *",$1,"* ]]; }

DATA_FLAGS=(--source=synthetic)
if [ -n "$PACK" ]; then
  rm -rf "$WORK/data"
  echo "gpu.sh: unpacking $PACK into $WORK/data ..." >&2
  "$PY" -m imgclf_jax.pack read "$PACK" --to "$WORK/data" > "$OUT/pack.log" 2>&1 \
    || { cat "$OUT/pack.log" >&2; fail "the data pack $PACK did not unpack (see $OUT/pack.log)"; }
  echo "pack 0" >> "$OUT/status.txt"
  DATA_FLAGS=(--source=real --data_dir="$WORK/data")
fi

wants machine && run machine benchmarks.machine
wants train_step && run train_step benchmarks.train_step --models="$MODELS" --frameworks="$FRAMEWORKS" \
  "${STEP_FLAGS[@]}" "${SIZE_FLAGS[@]}"
if wants profile; then
  for model in ${PROFILE_MODELS//,/ }; do
    run "profile_$model" benchmarks.profile_step --model="$model" --batch="${BENCH_BATCH:-32}" "${SIZE_FLAGS[@]}"
  done
fi
wants input_pipeline && run input_pipeline benchmarks.input_pipeline --source=synthetic --workers="$WORKERS" "${SIZE_FLAGS[@]}"
AUGMENT_FLAGS=()
[ -n "${BENCH_AUGMENT_BATCHES:-}" ] && AUGMENT_FLAGS+=(--batches="$BENCH_AUGMENT_BATCHES" --warmup_batches=2)
wants device_augment && run device_augment benchmarks.device_augment "${DATA_FLAGS[@]}" "${SIZE_FLAGS[@]}" \
  "${AUGMENT_FLAGS[@]}"
wants ensemble && run ensemble benchmarks.ensemble --model="${ENSEMBLE_MODEL}" --members="${BENCH_MEMBERS:-1,2,4,8}" \
  --mappings=vmap,unroll,map --batch="${BENCH_BATCH:-32}" "${SIZE_FLAGS[@]}"

train() {  # train CONFIG WORDS...: configs/CONFIG.py on the unpacked data; its reports to OUT/runs/CONFIG
  local name=$1; shift
  local workdir="$WORK/runs/$name"
  echo "gpu.sh: training $name ..." >&2
  mkdir -p "$OUT/runs/$name"
  "$PY" -m imgclf_jax.train --config "configs/$name.py" --config.data.dir="$WORK/data" \
    --config.data.cache_dir="$WORK/cache" "$@" --workdir "$workdir" > "$OUT/runs/$name.log" 2>&1
  local code=$?
  echo "run_$name $code" >> "$OUT/status.txt"
  [ $code -eq 0 ] || echo "gpu.sh: training $name failed ($code); see $OUT/runs/$name.log" >&2
  find "$workdir" -maxdepth 1 -type f \( -name '*.json' -o -name '*.csv' -o -name '*.png' \) \
    -exec cp {} "$OUT/runs/$name/" \;
}
if [ -n "$PACK" ]; then
  for name in ${RUNS//,/ }; do
    if [ "$name" = ml6_ensemble ]; then train "$name" "${TRAIN_FLAGS[@]}" "${ENSEMBLE_FLAGS[@]}"
    else train "$name" "${TRAIN_FLAGS[@]}"; fi
  done
fi

echo "gpu.sh: results in $OUT:" >&2
cat "$OUT/status.txt" >&2
! grep -qv ' 0$' "$OUT/status.txt"

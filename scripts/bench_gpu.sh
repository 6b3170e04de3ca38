#!/usr/bin/env bash
# T5 1.1 base and large: training-step tokens/s, MFU and peak memory in bfloat16 on one GPU,
# each configuration in its own process (one that runs out of memory does not stop the rest).
#
#   bash scripts/bench_gpu.sh [RESULTS_DIR] [extra bench_train.py flags for every run]
#
# Synthetic batches (scripts/bench_train.py --synthetic): needs JAX, flax, optax and orbax, not
# TensorFlow or seqio. An offline image without gin-config takes its wheel from .whl/ (make it
# where pip works: pip download --no-deps gin-config==0.5.0 -d .whl). Results: RESULTS_DIR
# (default $OUT, else bench_results/) gets one JSON per configuration, bench_gpu.log and a
# summary table in summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-bench_results}}
shift || true
mkdir -p "$results"
py=${PYTHON:-python3}

if ! "$py" -c 'import gin' 2>/dev/null; then
  wheel=$(ls .whl/gin_config-*.whl 2>/dev/null | head -1)
  if [[ -z "$wheel" ]]; then
    echo "gin-config is not installed and no .whl/gin_config-*.whl was found: pip install" \
         "gin-config==0.5.0, or put its wheel in .whl/ (see the header of $0)." >&2
    exit 2
  fi
  # A pure-Python wheel is a zip that Python imports from directly.
  export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
# JAX takes 75% of GPU memory by default; large batches need more of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1

log="$results/bench_gpu.log"
: > "$log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null; "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax",
    flax.__version__, "optax", optax.__version__, jax.devices())'; } 2>&1 | tee -a "$log"

bench() {  # NAME FLAGS...: one configuration, 512/512 tokens, bfloat16 activations
  local name=$1; shift
  echo "== $name: $*" | tee -a "$log"
  timeout 420 "$py" scripts/bench_train.py --synthetic --no_torch --dtypes=bfloat16 \
      --inputs_length=512 --targets_length=512 --steps=10 --rounds=1 --warmup=3 \
      --json="$results/$name.json" "$@" 2>&1 | tee -a "$log" | grep -v '^I0000\|^WARNING: All'
  echo "   exit ${PIPESTATUS[0]}" | tee -a "$log"
}

# XLA's compiled temp memory for these on CPU (an upper bound: XLA:CPU keeps some bfloat16
# work in float32): base as configured (12+12 unscanned layers) 79 GiB, so it may not fit an
# 80 GB card; base scanned + 'minimal' 20 GiB; large (scanned 24+24) 206 GiB without remat,
# 47 with 'minimal', 13 with 'full'.
bench base_b32 --model=base --batch_size=32 "$@"
bench base_b32_scan_minimal --model=base --batch_size=32 \
    --gin.network.Config.scan_layers=True --gin.network.Config.remat_policy="'minimal'" "$@"
bench large_b32_minimal --model=large --batch_size=32 \
    --gin.network.Config.remat_policy="'minimal'" "$@"
bench large_b32_full --model=large --batch_size=32 \
    --gin.network.Config.remat_policy="'full'" "$@"

"$py" - "$results" <<'PY' | tee "$results/summary.md"
import glob, json, os, sys
print('| configuration | device | batch | tokens/s | s/step | MFU | peak memory GiB |')
print('|---|---|---:|---:|---:|---:|---:|')
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
  r = json.load(open(path))
  j = r['runs']['bfloat16']['jax']
  name = os.path.basename(path)[:-5]
  mfu = f"{j['mfu']:.1%}" if j['mfu'] else '-'
  mem = f"{j['peak_memory_gib']:.1f}" if j.get('peak_memory_gib') else '-'
  print(f"| {name} | {r['device']} | {r['batch_size']} | {j['tokens_per_s']:,.0f} | "
        f"{j['seconds_per_step']:.3f} | {mfu} | {mem} |")
PY

#!/usr/bin/env bash
# One-shot GPU check for a rented machine (H200; torch and triton preinstalled, no network):
#   1. install carried pure-python wheels from .whl/ (if present) into /tmp/site
#   2. build the package and its extension (editable install, else build_ext --inplace)
#   3. pytest -m "cuda or triton"  (the kernels compiled for the GPU, not the interpreter; the
#      CUDA top-k tests of tests/engine/test_search.py run here: both score kernels, mma and simt, against
#      the float64 reference, host shards through the pinned double buffers, k up to 10^4)
#   4. benchmarks/bench_kernels.py and, if present, benchmarks/bench_topk.py (with --device cuda:
#      device-resident features, both kernels and torch timed against the measured device bandwidth)
#   4b. benchmarks/bench_topk_bf16.py --device cuda: the bfloat16 rows (log into summary.txt)
#   5. benchmarks/bench_featurize.py --device cuda (shipped model; needs diffusers and traker from
#      .whl/; traker uses fast_jl's CudaProjector when fast_jl is importable, else BasicProjector)
#   6. benchmarks/bench_transformer_kinds.py --device cuda: one tiny featurization per transformer
#      kind (DiT, PixArt, SD3 on its flow schedule; needs diffusers and transformers), samples/s;
#      its log is appended to summary.txt (the device tool returns at most 8 files)
#   7. benchmarks/bench_model_kinds.py --device cuda --dtype bf16: one tiny pipeline per UNet
#      kind (SD, SDXL, SD + LoRA; needs diffusers, transformers, peft from .whl/); its log too
# Logs go to $OUT (if set) else ./gpu_check_out, at most 8 files (what the device tool returns):
# build.log pytest.log bench_kernels.log bench_kernels.json bench_topk.log bench_topk.json
# bench_featurize.log summary.txt (the environment is at the top of summary.txt). Every step runs under its own timeout (together 9.5 minutes, inside the device tool's 10); a failed step is
# recorded and the next one still runs. Exit status: 0 only if every step that ran passed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."

LOG="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$LOG"
PY="${PYTHON:-python3}"
START=$(date +%s)
STATUS=0
: >"$LOG/summary.txt"

note() { echo "[gpu_check +$(($(date +%s) - START))s] $*" | tee -a "$LOG/summary.txt"; }

# step NAME TIMEOUT_S CMD...: run CMD with a timeout, output to $LOG/NAME.log and the console.
step() {
  local name=$1 limit=$2
  shift 2
  note "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOG/$name.log"
  if [ $rc -eq 0 ]; then
    note "$name: ok"
  else
    [ $rc -eq 124 ] && note "$name: TIMED OUT after ${limit}s" || note "$name: FAILED (rc=$rc)"
    STATUS=1
  fi
  return $rc
}

# --- environment -------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG/summary.txt" 2>&1 || note "wheels: install FAILED"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" # Hopper machine code, not only PTX
export MAX_JOBS="${MAX_JOBS:-16}" PIP_BREAK_SYSTEM_PACKAGES=1 PY
unset TRITON_INTERPRET

{
  date -u
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "numpy", "safetensors", "pytest", "pybind11", "diffusers"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} >>"$LOG/summary.txt" 2>&1
cat "$LOG/summary.txt"

# --- build -------------------------------------------------------------------------------------
build() {
  if [ ! -f setup.py ] && [ ! -f pyproject.toml ]; then
    echo "no setup.py / pyproject.toml: nothing to build"
    return 0
  fi
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . && return 0
  echo "editable install failed; trying setup.py build_ext --inplace"
  [ -f setup.py ] && "$PY" setup.py build_ext --inplace
}
export -f build
step build 120 bash -c build

# --- tests -------------------------------------------------------------------------------------
# Modules that need packages absent here (diffusers) fail to collect; the rest still run.
step pytest 120 "$PY" -m pytest -m "cuda or triton" -q -rs -p no:cacheprovider \
  --continue-on-collection-errors tests/

# --- benchmarks --------------------------------------------------------------------------------
step bench_kernels 75 "$PY" benchmarks/bench_kernels.py --rep-ms 100 --json "$LOG/bench_kernels.json"

if [ -f benchmarks/bench_topk.py ]; then
  topk_args=()
  help=$("$PY" benchmarks/bench_topk.py --help 2>&1 || true)
  if grep -q -- "--out" <<<"$help"; then
    topk_args+=(--out "$LOG/bench_topk.json")
  fi
  if grep -q -- "--device" <<<"$help"; then
    topk_args+=(--device cuda)
  elif grep -q -- "--cuda" <<<"$help"; then
    topk_args+=(--cuda)
  elif grep -q -- "--gpu" <<<"$help"; then
    topk_args+=(--gpu)
  fi
  step bench_topk 45 "$PY" benchmarks/bench_topk.py ${topk_args[@]+"${topk_args[@]}"}
fi

# The bfloat16 rows beside the float16 ones: both CUDA kernels on bfloat16 rows, the simt ids
# and values checked equal to the CPU's exact bfloat16 search; its log goes into summary.txt.
if [ -f benchmarks/bench_topk_bf16.py ]; then
  step bench_topk_bf16 30 "$PY" benchmarks/bench_topk_bf16.py --device cuda --repeat 2 \
    --out /tmp/bench_topk_bf16.json
  cat "$LOG/bench_topk_bf16.log" >>"$LOG/summary.txt" 2>/dev/null
  rm -f "$LOG/bench_topk_bf16.log"
fi

step bench_featurize 75 "$PY" benchmarks/bench_featurize.py --device cuda --n 64 --n-slow 32 \
  --skip scaling

step transformer_kinds 75 "$PY" benchmarks/bench_transformer_kinds.py --device cuda --reps 2
cat "$LOG/transformer_kinds.log" >>"$LOG/summary.txt" 2>/dev/null && rm -f "$LOG/transformer_kinds.log"
# One tiny run per UNet kind on the GPU in bf16 (SD, SDXL, SD + LoRA): featurize throughput,
# every kind's features checked.
step model_kinds 30 "$PY" benchmarks/bench_model_kinds.py --device cuda --dtype bf16 --n 16 --reps 2
cat "$LOG/model_kinds.log" >>"$LOG/summary.txt" 2>/dev/null && rm -f "$LOG/model_kinds.log"

note "done in $(($(date +%s) - START))s, status $STATUS"
exit $STATUS

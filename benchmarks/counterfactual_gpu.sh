#!/usr/bin/env bash
# The counterfactual ground truth at a larger setting, on a GPU: the same code as
# `ctrak bench counterfactual --retrain`, models trained on --device cuda (measured on the CPU).
# Setting: benchmarks/counterfactual_large.json (4 shapes x 6 colours, 2,475 images, two rare
# values, a 1.1 M-parameter FactorUNet, 8,000 steps; 128 LDS subsets, 3 seeds per removal arm).
# Several processes share the GPU (each model is small); the queue resumes where it stopped, so
# run it again until it reports nothing left. Results land in $TRUTH (default out/cf_large);
# copy them into ctrak_fast/assets/counterfactual/<name>/ to ship them.
#
#   bash benchmarks/counterfactual_gpu.sh [WORKERS] [MAX_JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
TRUTH="${TRUTH:-out/cf_large}"
WORKERS="${1:-8}"
ARGS=(bench counterfactual --retrain --device cuda --workers "$WORKERS" --truth "$TRUTH"
      --work "$TRUTH.work" --out "$TRUTH.results")
[ -f "$TRUTH/setting.json" ] || ARGS+=(--setting benchmarks/counterfactual_large.json)
[ $# -ge 2 ] && ARGS+=(--max-jobs "$2")
exec "${PYTHON:-python3}" -m ctrak_fast "${ARGS[@]}"

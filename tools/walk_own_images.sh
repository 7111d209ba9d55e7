#!/usr/bin/env bash
# The README's "Your own images" walk-through, each step timed (its output goes to $OUT/*.txt).
#   bash tools/walk_own_images.sh [OUT]      (default out/walk; ~25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/walk}"
mkdir -p "$OUT"
CTRAK=".venv/bin/ctrak"
step() {  # step NAME CMD...: run, keep stdout+stderr, print the wall time
  local name="$1"; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.txt" 2>&1
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}
: >"$OUT/times.txt"
step folder .venv/bin/python -m ctrak_fast.data.digit_folder --out "$OUT/digits"
step labels "$CTRAK" labels --folder "$OUT/digits" --labels "$OUT/digits/labels.json"
step train "$CTRAK" train --folder "$OUT/digits" --labels "$OUT/digits/labels.json" \
  --out "$OUT/model" --name digits --time-budget 600 --eval-n 8
step featurize "$CTRAK" featurize --model "$OUT/model/unet_digits.safetensors" \
  --method concept-trak-cond --folder "$OUT/digits" --labels "$OUT/digits/labels.json" \
  --out "$OUT/store"
step query "$CTRAK" query --model "$OUT/model/unet_digits.safetensors" \
  --method concept-trak-cond --concept digit=3,colour=red --out "$OUT/q.safetensors"
step attribute "$CTRAK" attribute --store "$OUT/store" --query "$OUT/q.safetensors" --k 10 \
  --lambda-r 1000 --out "$OUT/hits.json"
step report "$CTRAK" report \
  --result "$OUT/hits.json" --out "$OUT/gallery.png"
step bench "$CTRAK" bench quality --folder "$OUT/digits" --labels "$OUT/digits/labels.json" \
  --model "$OUT/model/unet_digits.safetensors" --out "$OUT/bench" --per-combo 12 \
  --queries-per-combo 2 --heldout-queries-per-combo 8 --keep-unconfirmed --quiet

#!/usr/bin/env bash
# The README's results table, measured with gaussdiff's own tools on the bundled models.
# Scaled down for a 2-core CPU (Inception-v3 costs ~0.4 s per image there): N samples per
# point against the first REF Fashion-MNIST training images, the papers use 10k-50k.
# Usage: bash scripts/results.sh [OUT_DIR]   (each step is skipped when its output exists)
set -euo pipefail
cd "$(dirname "$0")/.."
G=.venv/bin/gaussdiff
OUT=${1:-results}
N=${N:-250}
REF=${REF:-500}
NLL_N=${NLL_N:-100}
mkdir -p "$OUT"
common=(--num "$N" --ref fashion-mnist --ref-num "$REF" --metric fid --no-progress)

# The floor of FID at this N: N real test images against the same reference.
if [ ! -f "$OUT/fid-test-images.json" ]; then
  .venv/bin/python -c "
from gaussdiff.data import load_dataset; import numpy as np
d = load_dataset('fashion-mnist', 'test'); np.savez('$OUT/test-images.npz', d.images[:$N])"
  $G eval "$OUT/test-images.npz" --ref fashion-mnist --ref-num "$REF" --metrics fid \
     --no-progress --out "$OUT/fid-test-images.json"
fi

# models/fashion-cond-edm (EDM objective, class-conditional, sampled with random labels).
for point in "heun 35" "dpmpp_2m 20" "dpmpp_2m 10"; do
  set -- $point
  [ -d models/fashion-cond-edm ] && $G sweep models/fashion-cond-edm --samplers "$1" --nfe "$2" "${common[@]}" --out "$OUT/fashion-cond-edm"
done

# models/fashion-small (discrete, L_hybrid): DDPM 1000 steps, DDIM 50, Heun 35 NFE, DPM++(2M) 20.
for point in "ddim 50" "heun 35" "dpmpp_2m 20" "ddpm 1000"; do
  set -- $point
  $G sweep models/fashion-small --samplers "$1" --nfe "$2" "${common[@]}" --out "$OUT/fashion-small"
done

# NLL on the test set of models/fashion-small: the VLB (all 1000 steps) and the
# probability-flow ODE (Heun, 2x25 NFE per image plus one gradient each).
[ -f "$OUT/nll-vlb.json" ] || $G nll models/fashion-small --split test --num "$NLL_N" --no-progress --out "$OUT/nll-vlb.json" > /dev/null
[ -f "$OUT/nll-ode.json" ] || $G nll models/fashion-small --ode --steps 25 --split test --num "$NLL_N" --no-progress --out "$OUT/nll-ode.json" > /dev/null

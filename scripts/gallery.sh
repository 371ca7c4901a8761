#!/usr/bin/env bash
# The figures of docs/gallery.md: every `gaussdiff analyze` command on the bundled models.
#   bash scripts/gallery.sh [OUT_DIR]      (default docs/gallery; ~30 min on 2 CPU cores)
# Each command writes NAME.png plus NAME.json and NAME.csv (the numbers, with the command).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/docs/gallery}
g="$here/.venv/bin/gaussdiff"
m="$here/models"
mkdir -p "$out"
run() { echo "+ gaussdiff $*" >&2; "$g" "$@" --no-progress; }

run analyze noise-levels --model "$m/fashion-small" --num 4 --out "$out/noise-levels-small.png"
run analyze noise-levels --model "$m/fashion-cond-edm" --num 4 --out "$out/noise-levels-edm.png"
run analyze rate-distortion --model "$m/fashion-small" --num 100 --batch-size 50 --out "$out/rate-distortion.png"
run analyze progressive --model "$m/fashion-small" --num 8 --columns 10 --out "$out/progressive.png"
run analyze shared-latents --model "$m/fashion-small" --continuations 6 --out "$out/shared-latents.png"
run analyze coarse-to-fine --model "$m/fashion-small" --pair 0,1 --steps 250 --out "$out/coarse-to-fine.png"
run analyze guidance-sweep --model "$m/fashion-cond-edm" --classifier "$m/fashion-classifier" \
    --scales 0,1,2,4 --num 6 --out "$out/guidance-sweep-cfg.png"
run analyze guidance-sweep --model "$m/fashion-small" --guide classifier --classifier "$m/fashion-classifier" \
    --sampler ddpm --steps 100 --scales 0,1,3,10 --num 6 --out "$out/guidance-sweep-classifier.png"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$g" sample "$m/fashion-small" --num 64 --sampler ddpm --steps 250 --out "$tmp/samples.npz" --no-progress
run analyze nearest-neighbours "$tmp/samples.npz" --train fashion-mnist --k 5 --show 8 \
    --heldout-num 1000 --out "$out/nearest-neighbours.png"
# x̂0 quality along the reverse process: FD in the features of a Fashion-MNIST classifier
# trained here (Inception FID of 10 x 200 images would take hours on a CPU)
"$g" train-feature-net --data fashion-mnist --out "$tmp/fashion-net" --no-progress
run analyze progressive --model "$m/fashion-small" --num 200 --steps 100 --columns 10 \
    --ref fashion-mnist --feature-net "$tmp/fashion-net" --out "$out/progressive-fd.png"

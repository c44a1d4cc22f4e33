#!/usr/bin/env bash
# Class-conditional diffusion on simulated plates, on CPU (~75 minutes on 2 cores). The published
# model (512² whole fields, ~63 M parameters, ~250k iterations) needs a GPU; here a 0.8 M-parameter
# model learns whole fields at 128² with the perturbation as class label for 25 minutes. Diffusion
# over-fits small data fast: with 29 training fields the validation loss stalled at 0.375, with
# the 96 fields below it reached 0.133. Then predict-plate on the held-out plate with 20 ancestral
# steps and 4 samples per field (mean + uncertainty maps), and 20 vs 250 steps on 1/8 of it.
set -euo pipefail
OUT=${OUT:-/tmp/cpvs-sim-diffusion}
W=${WORKERS:-2}
MINUTES=${MINUTES:-25}
P=$OUT/plates
[ -d "$P/SIM0-P01" ] || cpvs simulate "$P" --plates 2 --wells 24 --sites 4 --seed 0 --workers "$W"
cpvs preprocess "$P/SIM0-P01" -o "$OUT/train128.zarr" --size 128 --resize-method bicubic --workers "$W"
cpvs --device cpu train --model ddpm --data "$OUT/train128.zarr" -o "$OUT/ddpm" --label Metadata_Perturbation \
    --width 16 --channel-mult 1,2,4 --num-res-blocks 1 --attention-downsample 4 --head-channels 16 --dropout 0 \
    --crop 128 --batch-size 4 --lr 5e-4 --epochs 1000 --steps-per-epoch 50 --max-minutes "$MINUTES"
cpvs --device cpu predict-plate "$P/SIM0-P02" --model ddpm --checkpoint "$OUT/ddpm" -o "$OUT/pred-20" \
    --steps 20 --samples 4 --seed 0
cpvs evaluate --images --pred "$OUT/pred-20" --truth "$P/SIM0-P02" -o "$OUT/eval-20"
for steps in 20 250; do
    cpvs --device cpu predict-plate "$P/SIM0-P02" --model ddpm --checkpoint "$OUT/ddpm" -o "$OUT/pred-q-$steps" \
        --steps "$steps" --seed 0 --shard 1/8
    cpvs evaluate --images --pred "$OUT/pred-q-$steps" --truth "$P/SIM0-P02" -o "$OUT/eval-q-$steps"
done

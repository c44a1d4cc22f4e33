#!/usr/bin/env bash
# Virtual staining on simulated plates, on CPU: train on plate 1, predict plate 2 (another
# batch), and compare the U-Net with the per-pixel linear baseline. ~15 minutes on 2 cores.
set -euo pipefail
OUT=${OUT:-/tmp/cpvs-sim-staining}
cpvs simulate "$OUT/plates" --plates 2 --wells 16 --sites 2 --seed 0 --workers 2
cpvs preprocess "$OUT/plates/SIM0-P01" -o "$OUT/train.zarr"
cpvs --device cpu train --model linear --data "$OUT/train.zarr" -o "$OUT/linear"
cpvs --device cpu train --model unet --data "$OUT/train.zarr" -o "$OUT/unet" \
    --depth 5 --width 16 --crop 256 --batch-size 8 --epochs 8 --steps-per-epoch 50
cpvs --device cpu train --model cwgan --init "$OUT/unet" --data "$OUT/train.zarr" -o "$OUT/cwgan" \
    --crop 256 --epochs 2 --steps-per-epoch 10
for model in linear unet cwgan; do
    cpvs --device cpu predict-plate "$OUT/plates/SIM0-P02" --checkpoint "$OUT/$model" -o "$OUT/pred-$model"
    cpvs evaluate --images --pred "$OUT/pred-$model" --truth "$OUT/plates/SIM0-P02" -o "$OUT/eval-$model"
done

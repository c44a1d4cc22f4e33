#!/usr/bin/env bash
# Virtual staining on the real pediatric field, on CPU: train on the left three quarters of
# the field (1 brightfield plane -> 5 stains), predict the right quarter, compare with the
# real stains, next to the per-pixel linear baseline. One field cannot estimate an
# illumination function, so correction is off (--illum-size 0 / --truth-illum-size 0).
# Run from the repository root with the virtual environment active. ~10 minutes on 2 cores.
set -euo pipefail
FIELD=../shared/data/fields/pediatric_BR00143976_C03_f03
OUT=${OUT:-/tmp/cpvs-pediatric-staining}
MINUTES=${MINUTES:-8}

python examples/pediatric/split_field.py "$FIELD" "$OUT"
cpvs preprocess "$OUT/left" -o "$OUT/left.zarr" --illum-size 0
cpvs --device cpu train --model linear --data "$OUT/left.zarr" -o "$OUT/linear"
cpvs --device cpu train --model unet --data "$OUT/left.zarr" -o "$OUT/unet" \
    --depth 5 --width 16 --crop 256 --batch-size 8 --epochs 40 --steps-per-epoch 25 --max-minutes "$MINUTES"
for model in linear unet; do
    cpvs --device cpu predict-plate "$OUT/right" --checkpoint "$OUT/$model" -o "$OUT/pred-$model"
    cpvs evaluate --images --pred "$OUT/pred-$model" --truth "$OUT/right" --truth-illum-size 0 -o "$OUT/eval-$model"
done

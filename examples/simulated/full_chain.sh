#!/usr/bin/env bash
# The whole cpvs chain on simulated plates, on CPU (~40 minutes on 2 cores):
# simulate -> preprocess -> train (linear baseline, U-Net, cWGAN-GP) -> predict the held-out plate
# (another batch) -> image metrics -> profile real and predicted plates (predictions measured inside
# the real cells) -> NSC/NSCB, target matching, toxicity, CPcor, mAP and the HTML report.
set -euo pipefail
OUT=${OUT:-/tmp/cpvs-sim-chain}
W=${WORKERS:-2}
P1=$OUT/plates/SIM0-P01; P2=$OUT/plates/SIM0-P02
SKIP=costes,granularity,radial_distribution,radial_zernikes   # the slow modules (benchmarks/profile_field.py)

cpvs simulate "$OUT/plates" --plates 2 --wells 24 --sites 2 --seed 0 --workers "$W"
cpvs preprocess "$P1" -o "$OUT/train.zarr" --workers "$W"
cpvs --device cpu train --model linear --data "$OUT/train.zarr" -o "$OUT/linear"
cpvs --device cpu train --model unet --data "$OUT/train.zarr" -o "$OUT/unet" \
    --depth 5 --width 16 --crop 256 --batch-size 8 --epochs 8 --steps-per-epoch 50
cpvs --device cpu train --model cwgan --init "$OUT/unet" --data "$OUT/train.zarr" -o "$OUT/cwgan" \
    --crop 256 --epochs 2 --steps-per-epoch 10
for model in linear unet; do
    cpvs --device cpu predict-plate "$P2" --checkpoint "$OUT/$model" -o "$OUT/pred-$model"
    cpvs evaluate --images --pred "$OUT/pred-$model" --truth "$P2" -o "$OUT/eval-images-$model"
done

# Profiles: both real plates, then the U-Net's plate inside the real plate-2 cells.
cpvs profile "$P1" "$P2" -o "$OUT/profiles-truth" --skip "$SKIP" --workers "$W" --overlays 2 \
    --normalize mad_robustize --control-query "Metadata_ControlType == 'negcon'" --by-plate --feature-select
cpvs profile "$P2" -o "$OUT/profiles-truth-p2" --skip "$SKIP" --workers "$W" --masks-from "$OUT/profiles-truth" \
    --normalize mad_robustize --control-query "Metadata_ControlType == 'negcon'" \
    --features-from "$OUT/profiles-truth/well_normalized_feature_select.parquet"
cpvs profile "$OUT/pred-unet" -o "$OUT/profiles-unet" --skip "$SKIP" --workers "$W" --masks-from "$OUT/profiles-truth" \
    --normalize mad_robustize --control-query "Metadata_ControlType == 'negcon'" \
    --features-from "$OUT/profiles-truth/well_normalized_feature_select.parquet"

TOX=(--toxicity --positive-query "Metadata_ControlType == 'poscon'")
cpvs evaluate "$OUT/profiles-truth/well_normalized_feature_select.parquet" --nsc --nscb --target "${TOX[@]}" --active --map \
    -o "$OUT/eval-profiles-truth" --report "$OUT/report-truth"
cpvs evaluate "$OUT/profiles-unet/well_normalized_feature_select.parquet" --nsc --target "${TOX[@]}" --cpcor \
    --truth "$OUT/profiles-truth-p2/well_normalized_feature_select.parquet" --match-cols Metadata_Plate,Metadata_Well \
    --pred "$OUT/pred-unet" --truth-plate "$P2" --images -o "$OUT/eval-profiles-unet" --report "$OUT/report-unet"

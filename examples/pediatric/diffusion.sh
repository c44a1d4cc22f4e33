#!/usr/bin/env bash
# Residual diffusion against the U-Net on the real pediatric field, on CPU, same split as
# staining.sh (train on the left three quarters, predict the right quarter, compare with the real
# stains), the same 15-minute training budget for both:
#   * U-Net alone: 15 minutes;
#   * U-Net + residual ddpm: the U-Net's first 7 minutes, then 8 minutes of a ddpm that diffuses
#     only what that U-Net misses (train --residual-of); predict-plate adds the U-Net back.
# The 15-minute U-Net is the 7-minute one resumed for 8 more minutes (constant learning rate, exact
# resume), so both models start from the same U-Net. Sampling: 20 ancestral steps, 4 samples per
# field. The ddpm's prediction is written twice: its posterior-mean estimate (--estimate mean: the
# network's clean-image estimate at the first step, averaged over the 4 starts) and the 4 samples'
# mean (--estimate samples); the <stain>_std maps come from the samples in both. Both shrink the
# residual by the per-channel weight training fitted on validation crops the U-Net never saw; the
# first estimate is also written whole (--no-shrink), for comparison. evaluate --images
# reports PCC and, for the ddpm, the Spearman correlation of each std map with the absolute error;
# the base U-Net (UNET_MINUTES) is evaluated too. One field cannot estimate an illumination function, so
# correction is off. Run from the repository root with the virtual environment active; about 40
# minutes on 2 cores.
set -euo pipefail
FIELD=../shared/data/fields/pediatric_BR00143976_C03_f03
OUT=${OUT:-/tmp/cpvs-pediatric-diffusion}
UNET_MINUTES=${UNET_MINUTES:-7}
DDPM_MINUTES=${DDPM_MINUTES:-8}
STEPS=${STEPS:-20}
SAMPLES=${SAMPLES:-4}
UNET=(--depth 5 --width 16 --crop 256 --batch-size 8 --epochs 1000 --steps-per-epoch 25)

python examples/pediatric/split_field.py "$FIELD" "$OUT"
cpvs preprocess "$OUT/left" -o "$OUT/left.zarr" --illum-size 0
cpvs --device cpu train --model unet --data "$OUT/left.zarr" -o "$OUT/unet-base" "${UNET[@]}" --max-minutes "$UNET_MINUTES"
cp -r "$OUT/unet-base" "$OUT/unet-alone"
cpvs --device cpu train --model unet --data "$OUT/left.zarr" -o "$OUT/unet-alone" "${UNET[@]}" --resume --max-minutes "$DDPM_MINUTES"
cpvs --device cpu train --model ddpm --data "$OUT/left.zarr" -o "$OUT/ddpm" --residual-of "$OUT/unet-base" \
    --prediction "${PREDICTION:-x0}" --label none --width 24 --channel-mult 1,2,2,4 --num-res-blocks 1 --attention-downsample 8 \
    --head-channels 32 --dropout 0 --crop 128 --batch-size 4 --lr 5e-4 --epochs 1000 --steps-per-epoch 25 \
    --max-minutes "$DDPM_MINUTES"
cpvs --device cpu predict-plate "$OUT/right" --checkpoint "$OUT/unet-alone" -o "$OUT/pred-unet"
cpvs --device cpu predict-plate "$OUT/right" --checkpoint "$OUT/unet-base" -o "$OUT/pred-unet-base"
cpvs --device cpu predict-plate "$OUT/right" --checkpoint "$OUT/ddpm" -o "$OUT/pred-ddpm-mean" \
    --steps "$STEPS" --samples "$SAMPLES" --estimate mean --seed 0
cpvs --device cpu predict-plate "$OUT/right" --checkpoint "$OUT/ddpm" -o "$OUT/pred-ddpm-whole" \
    --steps "$STEPS" --samples "$SAMPLES" --estimate mean --no-shrink --seed 0
cpvs --device cpu predict-plate "$OUT/right" --checkpoint "$OUT/ddpm" -o "$OUT/pred-ddpm-samples" \
    --steps "$STEPS" --samples "$SAMPLES" --estimate samples --seed 0
for model in unet unet-base ddpm-mean ddpm-whole ddpm-samples; do
    cpvs evaluate --images --pred "$OUT/pred-$model" --truth "$OUT/right" --truth-illum-size 0 -o "$OUT/eval-$model"
done
python - "$OUT" <<'EOF'
import json, sys
from cpvs.checkpoints import load_checkpoint
out = sys.argv[1]
alpha = load_checkpoint(f"{out}/ddpm")["residual_shrink"]["alpha"]
print("residual weight fitted on held-out crops: " + (" ".join(f"{c} {a:.2f}" for c, a in alpha.items()) if alpha else "none"))
for model in ("unet", "unet-base", "ddpm-mean", "ddpm-whole", "ddpm-samples"):
    rows = json.load(open(f"{out}/eval-{model}/results.json"))["images"]["summary"]
    pcc = " ".join(f"{r['channel']} {r['pcc_mean']:.3f}" for r in rows)
    rho = " ".join(f"{r['channel']} {r['std_spearman_mean']:.3f}" for r in rows if "std_spearman_mean" in r)
    print(f"{model}: PCC {pcc}" + (f" | std-|error| Spearman {rho}" if rho else ""))
EOF

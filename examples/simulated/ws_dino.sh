#!/usr/bin/env bash
# WS-DINO on simulated plates, on CPU (~17 minutes on 2 cores): a small ViT per stain trained with the
# compound as weak label; NSC/NSCB of its embeddings next to the same architecture at random
# initialisation (the epoch-0 row of metrics.parquet).
set -euo pipefail
OUT=${OUT:-/tmp/cpvs-sim-wsdino}
PLATES=${PLATES:-/tmp/cpvs-sim-chain/plates}
MINUTES=${MINUTES:-12}
[ -d "$PLATES/SIM0-P01" ] || cpvs simulate "$PLATES" --plates 2 --wells 24 --sites 2 --seed 0 --workers 2
cpvs preprocess "$PLATES/SIM0-P01" "$PLATES/SIM0-P02" -o "$OUT/dino512.zarr" --size 512 --workers 2
cpvs --device cpu train --model ws-dino --data "$OUT/dino512.zarr" -o "$OUT/wsdino" --weak-label Metadata_Compound \
    --arch vit_tiny_patch16_224 --global-size 64 --local-size 32 --n-local 4 --out-dim 1024 --hidden-dim 512 \
    --bottleneck-dim 128 --batch-size 16 --lr 1e-3 --min-lr 1e-5 --warmup-epochs 1 --epochs 100 --steps-per-epoch 20 \
    --max-minutes "$MINUTES" --eval-every 3
cpvs --device cpu embed "$OUT/dino512.zarr" --checkpoint "$OUT/wsdino" -o "$OUT/emb/emb.parquet"
cpvs evaluate "$OUT/emb/emb_well.parquet" --nsc --nscb --target -o "$OUT/eval-emb"

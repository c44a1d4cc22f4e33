#!/usr/bin/env bash
# DINO on the real pediatric field (one field, so plain DINO, not WS-DINO), then embeddings and the
# CLS attention maps of every head. ~6 minutes on 2 CPU cores.
set -euo pipefail
FIELD=../shared/data/fields/pediatric_BR00143976_C03_f03
OUT=${OUT:-/tmp/cpvs-pediatric-dino}
cpvs preprocess "$FIELD" --channel-map examples/pediatric/channel_map.csv -o "$OUT/field512.zarr" --size 512 --illum-size 0
cpvs --device cpu train --model dino --data "$OUT/field512.zarr" -o "$OUT/dino" --channels DNA,AGP,Mito,BF \
    --arch vit_tiny_patch16_224 --global-size 112 --local-size 48 --out-dim 4096 --hidden-dim 512 --bottleneck-dim 128 \
    --batch-size 16 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 1 --epochs 200 --steps-per-epoch 5 --max-minutes "${MINUTES:-4}"
cpvs --device cpu embed "$FIELD" --channel-map examples/pediatric/channel_map.csv --checkpoint "$OUT/dino" \
    -o "$OUT/emb.parquet" --attention-maps "$OUT/attention" --n 1

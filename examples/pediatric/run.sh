#!/usr/bin/env bash
# Worked example on the real pediatric field (plate BR00143976, well C03, site 3: one
# brightfield plane + 5 Cell Painting channels, Phenix names with this plate's own numbering).
# Run from the repository root with the virtual environment active (`make demo` creates it).
set -euo pipefail
FIELD=../shared/data/fields/pediatric_BR00143976_C03_f03
OUT=${OUT:-/tmp/cpvs-pediatric}

# 1. Through a channel-map file for the plate's numbering (ch1 = brightfield, ch5 = DNA, ...).
cpvs preprocess "$FIELD" --channel-map examples/pediatric/channel_map.csv --plate-name BR00143976 \
    -o "$OUT/by-channel-map.zarr"

# 2. The same field through a CellProfiler LoadData CSV (any file layout works this way).
cpvs preprocess examples/pediatric/load_data.csv -o "$OUT/by-load-data.zarr"

# 3. Half-resolution store, as used to train on 540² fields.
cpvs preprocess "$FIELD" --channel-map examples/pediatric/channel_map.csv --size 540 -o "$OUT/half.zarr"

#!/usr/bin/env bash
# NSC and NSCB (nearest-neighbour MOA matching, not-same-compound / and not-same-batch) on BBBC021:
# MCF-7 cells, 103 treatments (compound + concentration) of 38 compounds and 12 MOAs, 55 plates in
# 10 weekly batches, from CellProfiler per-well tables (../shared/data/README.md names the sources).
#
#   1. the raw per-well means: metadata joined, MAD-robustized against the DMSO wells of all plates
#      together, features selected; then NSC/NSCB;
#   2. the same normalized per plate (--by-plate): each plate against its own 6 DMSO wells;
#   3. the published table, already MAD-robustized and feature-selected.
#
# Run from the repository root with the virtual environment active (`make demo` creates it); about a
# minute on a laptop. The numbers it prints are in examples/README.md. Without the console script:
# CPVS_PYTHON=.venv/bin/python PYTHON=.venv/bin/python bash examples/bbbc021/nsc.sh
set -euo pipefail
DATA=${DATA:-../shared/data/bbbc021}
OUT=${OUT:-/tmp/cpvs-bbbc021}
PYTHON=${PYTHON:-python}
if [ -n "${CPVS_PYTHON:-}" ]; then
    cpvs() { "$CPVS_PYTHON" -m "cpvs" "$@"; }  # the module, where no console script is installed
fi
BATCH='Metadata_Batch=Metadata_Plate:^(Week\d+)'  # a well's batch is its plate's week (Week10_40111 -> Week10)
DMSO="Metadata_Compound == 'DMSO'"
mkdir -p "$OUT"

# Plate, well -> compound, concentration, MOA, from the image and MOA tables.
"$PYTHON" examples/bbbc021/make_metadata.py "$DATA" "$OUT/metadata.csv"

echo "== 1. raw per-well means, normalized against the DMSO wells of all plates"
cpvs profile "$DATA/ljosa_jbiomolscreen_2013_per_well_mean.csv.gz" --join "$OUT/metadata.csv" \
    --normalize mad_robustize --control-query "$DMSO" --feature-select -o "$OUT/raw_normalized_feature_select.parquet"
cpvs evaluate "$OUT/raw_normalized_feature_select.parquet" --nsc --nscb --derive "$BATCH" -o "$OUT/eval-raw" --overwrite \
    | grep -E '^NSCB? [0-9]'

echo "== 2. raw per-well means, normalized per plate (--by-plate)"
cpvs profile "$DATA/ljosa_jbiomolscreen_2013_per_well_mean.csv.gz" --join "$OUT/metadata.csv" \
    --normalize mad_robustize --control-query "$DMSO" --by-plate --feature-select -o "$OUT/raw_by_plate_normalized_feature_select.parquet"
cpvs evaluate "$OUT/raw_by_plate_normalized_feature_select.parquet" --nsc --nscb --derive "$BATCH" -o "$OUT/eval-raw-by-plate" --overwrite \
    | grep -E '^NSCB? [0-9]'

echo "== 3. the published normalized, feature-selected table"
cpvs evaluate "$DATA/BBBC021_per_well_feature_selected_mad_robustize.csv" --nsc --nscb --derive "$BATCH" -o "$OUT/eval-selected" --overwrite \
    | grep -E '^NSCB? [0-9]'

#!/bin/bash
# Predict a whole plate as a SLURM job array: each task takes every N-th field (--shard I/N);
# together the tasks write exactly what one unsharded run would. Resubmitting the array
# after a failure skips finished fields.
#
#   sbatch --export=ALL,PLATE=/data/BR00116991,RUN=/runs/unet,OUT=/scratch/pred/BR00116991 \
#          examples/slurm/predict_plate_array.sh
#
#SBATCH --job-name=cpvs-predict
#SBATCH --array=1-8
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=cpvs-predict-%A_%a.log
set -euo pipefail
: "${PLATE:?set PLATE to the plate folder}" "${RUN:?set RUN to the training run or checkpoint}" "${OUT:?set OUT}"
N=${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))}
cpvs --quiet predict-plate "$PLATE" --checkpoint "$RUN" -o "$OUT" \
    --shard "${SLURM_ARRAY_TASK_ID}/${N}" --workers "${SLURM_CPUS_PER_TASK:-4}" --batch-size 64

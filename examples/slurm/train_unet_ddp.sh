#!/bin/bash
# Train the published U-Net on 4 GPUs of one node with DDP (torchrun); rank 0 writes the run.
# A killed job is continued by resubmitting with RESUME=--resume.
#
#   sbatch --export=ALL,STORE=/scratch/plates.zarr,RUN=/runs/unet examples/slurm/train_unet_ddp.sh
#
#SBATCH --job-name=cpvs-train
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=12:00:00
set -euo pipefail
: "${STORE:?set STORE}" "${RUN:?set RUN}"
torchrun --standalone --nproc_per_node=4 -m cpvs --quiet train --model unet --data "$STORE" -o "$RUN" \
    --precision bf16 --workers 4 ${RESUME:-}

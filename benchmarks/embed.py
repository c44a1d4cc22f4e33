"""DINO speed: fields per second of `cpvs embed` and training steps per second.

    python benchmarks/embed.py                          # ViT-S/8, 5 channels, CPU
    python benchmarks/embed.py --device cuda --batch 16 --precision bf16

Random weights (speed does not depend on them); a simulated store of 512² fields.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cpvs.device import resolve_device
from cpvs.embed.embedding import embed_store
from cpvs.models.vit import ChannelModels
from cpvs.plate import discover_plate
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.preprocess.store import Store
from cpvs.simulate import simulate
from cpvs.train.dino import DinoConfig, train_dino
from cpvs.train.multicrop import CropSpec

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="vit_small_patch8_224")
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="images per training step")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    prec = args.precision if device.type == "cuda" else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim = simulate(tmp / "sim", plates=1, wells=4, sites=max(1, args.fields // 4), size=512, seed=0, masks=False)
        preprocess_plates([discover_plate(sim.plates[0])], tmp / "s.zarr")
        store = Store(tmp / "s.zarr")
        models = ChannelModels(CHANNELS, args.arch, 65536, 2048, 256).eval().to(device)
        n = sum(p.numel() for p in models.parameters()) / 1e6
        print(f"device: {name}; {args.arch} x {len(CHANNELS)} channels ({n:.0f} M parameters with heads); precision {prec}")
        embed_store(store, models, CHANNELS, device, prec, indices=[0])  # warm-up
        t = time.perf_counter()
        emb = embed_store(store, models, CHANNELS, device, prec)
        dt = time.perf_counter() - t
        print(f"embed: {len(emb.fields)} fields in {dt:.1f} s -> {len(emb.fields) / dt:.3f} fields/s "
              f"(4 crops x {len(CHANNELS)} channels per field)")
        t = time.perf_counter()
        train_dino(DinoConfig("ws-dino", tmp / "s.zarr", tmp / "run", channels=CHANNELS, arch=args.arch,
                              crops=CropSpec(), batch_size=args.batch, epochs=1, steps_per_epoch=args.steps,
                              device=str(device), precision=prec, weak_label="Metadata_Compound"))
        dt = time.perf_counter() - t
        print(f"ws-dino training: {args.steps} steps of {args.batch} images (2 global 224² + 8 local 96² crops, "
              f"{len(CHANNELS)} channels) in {dt:.1f} s -> {args.steps / dt:.3f} steps/s (data loading included)")


if __name__ == "__main__":
    main()

"""Whole-plate prediction speed: fields per second end-to-end (TIFF I/O included) and model-only.

Uses the published U-Net (depth 6, width 32; random weights are fine for timing) on a
simulated plate of 998² fields, 256² tiles with stride 128 (49 tiles per field).
Prints the device, tile batch size and precision with every figure.

    python benchmarks/predict_plate.py --fields 4            # CPU
    python benchmarks/predict_plate.py --device cuda --fields 64 --batch-size 64 --precision bf16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cpvs.device import resolve_device
from cpvs.models import build_model, n_parameters
from cpvs.plate import discover_plate
from cpvs.predict.runner import PredictConfig, predict_plate
from cpvs.predict.tiling import tile_grid
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.preprocess.store import Store
from cpvs.simulate import simulate
from cpvs.checkpoints import save_checkpoint
from cpvs.device import autocast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=998)
    args = ap.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = args.precision if device.type == "cuda" else "fp32"
    print(f"device: {name}; tile batch {args.batch_size}; precision {precision}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sites = max(1, args.fields // 4)
        sim = simulate(tmp / "sim", plates=1, wells=4, sites=sites, size=args.size, seed=0, workers=2, masks=False)
        plate = discover_plate(sim.plates[0])
        preprocess_plates([plate], tmp / "s.zarr", workers=2)
        store = Store(tmp / "s.zarr")
        inputs, outputs = ["BF_low", "BF", "BF_high"], ["DNA", "ER", "RNA", "AGP", "Mito"]
        hp = {"in_channels": 3, "out_channels": 5, "depth": args.depth, "width": args.width}
        model = build_model("unet", hp)
        ck = save_checkpoint(tmp / "unet.pt", family="unet", hparams=hp, inputs=inputs, outputs=outputs,
                             normalization=store.normalization(inputs + outputs), state_dict=model.state_dict())
        n_fields = len(plate.fields)
        print(f"model: U-Net depth {args.depth} width {args.width} ({n_parameters(model) / 1e6:.1f} M parameters); "
              f"{n_fields} fields of {args.size}², {len(tile_grid((args.size, args.size), 256, 128))} tiles each")

        # Model only: the same number of tiles, already on the device.
        model = model.eval().to(device)
        tiles = len(tile_grid((args.size, args.size), 256, 128)) * n_fields
        x = torch.randn(args.batch_size, 3, 256, 256, device=device)
        with torch.inference_mode(), autocast(device, precision):
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(-(-tiles // args.batch_size)):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            model_s = time.perf_counter() - t
        print(f"model only: {n_fields / model_s:.3f} fields/s ({tiles / model_s:.1f} tiles/s)")

        t = time.perf_counter()
        res = predict_plate(PredictConfig(sim.plates[0], tmp / "pred", ck, batch_size=args.batch_size, device=str(device),
                                          precision=precision, workers=4 if device.type == "cuda" else 2))
        e2e = time.perf_counter() - t
        print(f"end to end (read TIFFs, illumination, tiles, model, median stitch, write TIFFs): "
              f"{res.n_written / e2e:.3f} fields/s ({e2e / res.n_written:.2f} s/field); "
              f"model share {model_s / e2e:.0%}")


if __name__ == "__main__":
    main()

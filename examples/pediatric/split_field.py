"""Split the real pediatric field into a training plate (left three quarters) and a test
plate (right quarter), each a Phenix-named folder with its channel map.

    python examples/pediatric/split_field.py ../shared/data/fields/pediatric_BR00143976_C03_f03 OUT
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cpvs.plate import read_image, write_image


def main(field: Path, out: Path) -> None:
    cmap = Path(__file__).with_name("channel_map.csv")
    for part in ("left", "right"):
        (out / part).mkdir(parents=True, exist_ok=True)
        shutil.copy(cmap, out / part / "channel_map.csv")
    for tiff in sorted(field.glob("r*c*f*p*-ch*.tiff")):
        img = read_image(tiff)
        cut = img.shape[1] * 3 // 4
        write_image(out / "left" / tiff.name, img[:, :cut])
        write_image(out / "right" / tiff.name, img[:, cut:])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

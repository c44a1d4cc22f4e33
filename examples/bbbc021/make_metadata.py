"""Per-well metadata of BBBC021 (plate, well, compound, concentration, MOA) from its image and MOA tables.

    python examples/bbbc021/make_metadata.py ../shared/data/bbbc021 /tmp/bbbc021_metadata.csv

The image table lists every site; a well's sites share compound and concentration.
Wells whose treatment has no MOA annotation (outside the labelled subset) keep an
empty MOA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def main(folder: Path, out: Path) -> None:
    img = pd.read_csv(folder / "BBBC021_v1_image.csv")
    moa = pd.read_csv(folder / "BBBC021_v1_moa.csv")
    wells = (img.rename(columns={"Image_Metadata_Plate_DAPI": "plate", "Image_Metadata_Well_DAPI": "well",
                                 "Image_Metadata_Compound": "compound", "Image_Metadata_Concentration": "concentration"})
             [["plate", "well", "compound", "concentration"]].drop_duplicates(["plate", "well"]))
    wells = wells.merge(moa, on=["compound", "concentration"], how="left")
    wells["batch"] = wells["plate"].str.extract(r"^(Week\d+)", expand=False)
    wells.to_csv(out, index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""Reading and writing microscope TIFFs with errors that name the file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile

from cpvs.errors import CpvsError
from cpvs.plate.layout import ImageRef, StorePlane
from cpvs.runinfo import atomic_path

# tifffile logs damaged headers as warnings and returns empty arrays; cpvs reports
# them as one error naming the file instead.
logging.getLogger("tifffile").setLevel(logging.ERROR)
_CORRUPT_HINT = "re-export or re-copy the file, or rerun with --on-error skip"


def read_image(path: str | ImageRef) -> np.ndarray:
    """One 2-D image (H, W) from a TIFF, or from an OME-Zarr store (a :class:`StorePlane`),
    in its stored dtype.

    LZW/Deflate/Zstd compressed files (Phenix exports) need ``imagecodecs``.
    """
    if isinstance(path, StorePlane):
        from cpvs.plate.omezarr import read_plane

        return read_plane(path)
    path = Path(path)
    if not path.exists():
        raise CpvsError("image file is missing", path, "check the plate folder or the LoadData CSV that names it")
    try:
        arr = tifffile.imread(path)
    except (ValueError, KeyError) as e:
        msg = str(e)
        if "imagecodecs" in msg:
            raise CpvsError(f"cannot decode this compressed TIFF ({msg})", path, "pip install imagecodecs") from None
        raise CpvsError(f"corrupt or truncated TIFF ({msg})", path, _CORRUPT_HINT) from None
    except (tifffile.TiffFileError, OSError, EOFError, IndexError, RuntimeError) as e:
        raise CpvsError(f"corrupt or truncated TIFF ({type(e).__name__}: {e})", path, _CORRUPT_HINT) from None
    if arr.size == 0:
        raise CpvsError("corrupt or truncated TIFF (no image data could be read)", path, _CORRUPT_HINT)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise CpvsError(f"expected a single-plane 2-D image, found shape {arr.shape}", path, "export one TIFF per channel and plane")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # microscopes write integers; NaN would poison every statistic
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise CpvsError(f"image has {bad} NaN or Inf pixel(s)", path, "re-export the image, or rerun with --on-error skip")
    return arr


def write_image(path: str | Path, image: np.ndarray, compression: str | None = None) -> None:
    """Write one 2-D image atomically (temporary name, then rename)."""
    if image.ndim != 2:
        raise ValueError(f"write_image takes a 2-D array, got shape {image.shape}")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image, compression=compression, metadata=None)

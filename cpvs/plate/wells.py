"""Well names: ``A01`` style, with conversions from row/column numbers and loose spellings."""

from __future__ import annotations

import re

from cpvs.errors import CpvsError

_WELL = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")


def row_letters(row: int) -> str:
    """1 -> 'A', 26 -> 'Z', 27 -> 'AA' (1536-well plates have 32 rows)."""
    if row < 1:
        raise ValueError(f"row must be >= 1, got {row}")
    if row <= 26:
        return chr(ord("A") + row - 1)
    return "A" + chr(ord("A") + row - 27)


def row_number(letters: str) -> int:
    letters = letters.upper()
    if len(letters) == 1:
        return ord(letters) - ord("A") + 1
    return 26 + ord(letters[1]) - ord("A") + 1


def well_name(row: int, col: int) -> str:
    """Row and column numbers (1-based) to ``A01``."""
    return f"{row_letters(row)}{col:02d}"


def normalize_well(text: str) -> str:
    """``a1``, ``A1``, ``A001`` and ``A01`` all become ``A01``."""
    m = _WELL.match(str(text))
    if not m:
        raise CpvsError(f"not a well name: {text!r} (expected a row letter and a column number, like A01)")
    return well_name(row_number(m.group(1)), int(m.group(2)))


def well_rowcol(well: str) -> tuple[int, int]:
    m = _WELL.match(well)
    if not m:
        raise CpvsError(f"not a well name: {well!r}")
    return row_number(m.group(1)), int(m.group(2))

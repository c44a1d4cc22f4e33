"""Shards of a plate for job arrays: ``--shard I/N`` takes every N-th field from the I-th.

Fields are taken in plate order, so shards are disjoint, cover the plate together and are
balanced over wells; every command that shards (predict-plate, profile) uses this one rule.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, TypeVar

from cpvs.errors import CpvsError

T = TypeVar("T")


class Shard(NamedTuple):
    """Shard ``index`` of ``count`` (numbered from 1); a plain tuple in configs and run records."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        """``"2/3"`` -> Shard(2, 3); None or "" -> the whole plate."""
        if not text:
            return cls()
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise CpvsError(f"--shard must look like I/N (e.g. 2/3), got {text!r}") from None
        if not 1 <= i <= n:
            raise CpvsError(f"--shard {text}: I must be between 1 and N")
        return cls(i, n)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def select(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index - 1 :: self.count])

    def record_name(self, base: str = "cpvs-run.json") -> str:
        """Shards running side by side each keep their own run record."""
        if self.whole:
            return base
        stem, _, ext = base.rpartition(".")
        return f"{stem}.shard-{self.index}-of-{self.count}.{ext}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

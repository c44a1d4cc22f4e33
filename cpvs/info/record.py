"""The answer of ``cpvs info``: a kind, JSON-ready facts and warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("plate", "plates", "store", "checkpoint", "table")


@dataclass
class Info:
    """What one path holds: ``kind`` (one of :data:`KINDS`), its facts and warnings."""

    kind: str
    path: str
    facts: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, **self.facts, "warnings": self.warnings}

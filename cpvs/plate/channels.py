"""Channel names and channel maps.

cpvs refers to channels by name, never by index. A channel map turns the channel
(and optionally z-plane) numbers in microscope file names into names. Maps are
configuration: presets for the JUMP numbering, or a user file / inline string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cpvs.errors import CpvsError

FLUORESCENCE = ("DNA", "ER", "RNA", "AGP", "Mito")
BRIGHTFIELD = ("BF_low", "BF", "BF_high")

_ALIASES = {
    "dna": "DNA", "hoechst": "DNA", "nucleus": "DNA",
    "er": "ER",
    "rna": "RNA",
    "agp": "AGP",
    "mito": "Mito", "mitochondria": "Mito",
    "bf": "BF", "brightfield": "BF",
    "bf_low": "BF_low", "bf_high": "BF_high",
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def canonical_channel(name: str) -> str:
    """Spell known channels the cpvs way (``dna`` -> ``DNA``, ``Brightfield`` -> ``BF``).

    A CellProfiler ``Orig`` prefix is dropped (``OrigDNA`` -> ``DNA``). Other names are
    kept as they are, so a plate with a channel cpvs does not know still works.
    """
    name = name.strip()
    if name.startswith("Orig") and len(name) > 4:
        name = name[4:]
    canon = _ALIASES.get(name.lower(), name)
    if not _NAME.match(canon):
        raise CpvsError(f"not a usable channel name: {name!r} (letters, digits and _ only, starting with a letter)",
                        hint="name channels like DNA, ER, RNA, AGP, Mito, BF; inline maps look like '1=BF,2=ER,5=DNA'")
    return canon


def is_brightfield(name: str) -> bool:
    return name == "BF" or name.startswith("BF_")


def order_channels(names: list[str]) -> list[str]:
    """Cell Painting order (DNA, ER, RNA, AGP, Mito), then brightfield low to high, then the
    uncertainty maps of those (``DNA_std`` …) in the same order, then the rest by name."""
    canon = FLUORESCENCE + BRIGHTFIELD

    def key(n: str):
        if n in canon:
            return (canon.index(n), "")
        if n.endswith("_std") and n[:-4] in canon:
            return (len(canon) + canon.index(n[:-4]), "")
        return (2 * len(canon), n)

    return sorted(names, key=key)


# Key: (channel number, plane number or None). None matches a channel with a single plane.
Key = tuple[int, int | None]


@dataclass(frozen=True)
class ChannelMap:
    """Channel (and plane) numbers in file names -> channel names."""

    entries: tuple[tuple[Key, str], ...]
    source: str = "inline"

    def __post_init__(self) -> None:
        names = [n for _, n in self.entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CpvsError(f"channel map {self.source} gives the name(s) {', '.join(dup)} to more than one channel",
                            hint="give every channel number its own name")

    @property
    def names(self) -> list[str]:
        return [n for _, n in self.entries]

    def lookup(self, channel: int, plane: int) -> str | None:
        d = dict(self.entries)
        if (channel, plane) in d:
            return d[(channel, plane)]
        return d.get((channel, None))

    def to_dict(self) -> dict[str, str]:
        return {(f"{c}" if p is None else f"{c}:{p}"): n for (c, p), n in self.entries}


PRESETS: dict[str, dict[str, str]] = {
    # JUMP cpg0000 pilot and CPJUMP1 Phenix numbering (shared/data/README.md).
    "jump": {"1": "Mito", "2": "AGP", "3": "RNA", "4": "ER", "5": "DNA", "6": "BF_high", "7": "BF_low", "8": "BF"},
}


def _parse_key(text: str, source: str) -> Key:
    t = text.strip().lower().removeprefix("ch")
    m = re.match(r"^(\d+)(?:\s*[:p]\s*(\d+))?$", t)
    if not m:
        raise CpvsError(f"channel map {source}: {text!r} is not a channel number",
                        hint="use '5', 'ch5', or '1:2' for channel 1 plane 2, e.g. '1=BF,2=ER,5=DNA'")
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def channel_map_from_dict(d: dict[str, str], source: str) -> ChannelMap:
    try:
        entries = tuple((_parse_key(k, source), canonical_channel(v)) for k, v in d.items())
    except CpvsError as e:
        if source in e.message:
            raise
        raise CpvsError(f"channel map {source}: {e.message}", e.path, e.hint) from None
    if not entries:
        raise CpvsError(f"channel map {source} is empty", hint="write one line per channel: number,name (e.g. 5,DNA)")
    return ChannelMap(entries, source)


def load_channel_map(spec: str | Path | None, default: str = "jump") -> ChannelMap:
    """A channel map from a preset name, a file, or an inline ``1=DNA,2=ER`` string.

    Files may be JSON (``{"1": "DNA"}``), or CSV/TSV/text with one ``number,name``
    (or ``number=name``) pair per line; ``#`` starts a comment.
    """
    if spec is None:
        spec = default
    spec = str(spec)
    if spec in PRESETS:
        return channel_map_from_dict(PRESETS[spec], f"preset '{spec}'")
    path = Path(spec)
    if path.suffix.lower() in {".json", ".csv", ".tsv", ".txt"} or path.exists():
        if not path.exists():
            raise CpvsError("channel map file not found", path, "pass an existing file, a preset (" + ", ".join(PRESETS) + ") or an inline map like '1=DNA,2=ER'")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise CpvsError(f"channel map is not valid JSON ({e})", path, 'write an object like {"1": "DNA", "2": "ER"}') from None
            if not isinstance(data, dict):
                raise CpvsError('channel map JSON must be an object like {"1": "DNA"}', path, 'write an object like {"1": "DNA"}')
            return channel_map_from_dict({str(k): str(v) for k, v in data.items()}, str(path))
        pairs: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in re.split(r"[,\t=]", line) if p.strip()]
            if len(parts) != 2:
                raise CpvsError(f"line {lineno}: expected 'number,name', got {line!r}", path, "write one line per channel, e.g. 5,DNA")
            if parts[0].lower() in {"channel", "number", "key"}:
                continue  # header row
            pairs[parts[0]] = parts[1]
        return channel_map_from_dict(pairs, str(path))
    if "=" in spec:
        pairs = dict(p.split("=", 1) for p in spec.split(",") if p.strip())
        return channel_map_from_dict(pairs, f"'{spec}'")
    raise CpvsError(
        f"unknown channel map {spec!r}",
        hint="use a preset (" + ", ".join(PRESETS) + "), a file (.json/.csv/.tsv/.txt), or an inline map like '1=DNA,2=ER'",
    )

"""``cpvs embed``: a DINO / WS-DINO checkpoint over a store or a plate -> field, well and
perturbation tables (optionally after TVN) and attention-map PNGs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cpvs.device import resolve_device
from cpvs.errors import CpvsError
from cpvs.jobs import OutputLock, claim_identity
from cpvs.models import load_model
from cpvs.runinfo import file_digest

Progress = Callable[..., None]


@dataclass
class EmbedConfig:
    source: Path  # a plate folder / LoadData CSV / OME-Zarr plate, or a store of `cpvs preprocess`
    checkpoint: Path
    out: Path  # the field table; _well and _perturbation tables go beside it
    channels: list[str] | None = None  # default: every channel of the checkpoint
    channel_map: str | None = None
    platemap: Path | None = None
    aggregate: str = "median"
    tvn_control_query: str | None = None
    attention_maps: Path | None = None
    n_attention: int = 16
    precision: str = "bf16"
    illum_fields: int = 256
    device: str = "auto"
    overwrite: bool = False  # replace tables made with another checkpoint, source or options


@dataclass
class EmbedResult:
    n_fields: int
    channels: list[str]
    dim: int
    device: str
    tables: dict[str, Path]
    n_tvn: int | None = None  # TVN components, when TVN was applied
    attention_pngs: list[Path] = field(default_factory=list)


def is_store(path: Path) -> bool:
    """A store of `cpvs preprocess` (a Zarr group too, but not an OME-Zarr plate, which is a plate)."""
    from cpvs.plate.omezarr import is_plate_store

    return path.is_dir() and (path / "zarr.json").exists() and not is_plate_store(path)


def embed(cfg: EmbedConfig, progress: Progress | None = None) -> EmbedResult:
    """Embed under a lock on the output tables; tables made with other parameters are refused unless ``overwrite``."""
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.checkpoint, device, roles=("embedding",))
    name = Path(cfg.out).name.split(".")[0]
    folder = Path(cfg.out).parent
    with OutputLock(folder, "embed", name=name):
        ident = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                 if k not in ("device", "overwrite", "attention_maps", "n_attention", "out")}
        ident["checkpoint"] = file_digest(loaded.path)
        claim_identity(folder, "embed", ident, cfg.overwrite, name=name)
        return _embed(cfg, loaded, device, progress)


def _embed(cfg: EmbedConfig, loaded, device, progress) -> EmbedResult:
    from cpvs.embed.attention import attention_maps, save_attention_png
    from cpvs.embed.embedding import embed_plate, embed_store, save_tables, tvn

    models, have = loaded.net, loaded.checkpoint["hparams"]["channels"]
    chans = cfg.channels or have
    missing = [c for c in chans if c not in have]
    if missing:
        raise CpvsError(f"the checkpoint has no model for {', '.join(missing)} (it has {', '.join(have)})", loaded.path)
    if is_store(cfg.source):
        from cpvs.preprocess.store import Store

        store = Store(cfg.source)
        emb = embed_store(store, models, chans, device, cfg.precision, progress=progress)
        keys = np.flatnonzero(store.done_mask()).tolist()
        image_of = lambda i: store.read_field(i, chans)  # noqa: E731
    else:
        from cpvs.plate.discover import discover_plate
        from cpvs.preprocess.apply import FieldNormalizer

        plate = discover_plate(cfg.source, channel_map=cfg.channel_map, channels=chans, platemap=cfg.platemap)
        normalizer = FieldNormalizer.for_plate(plate, chans, loaded.checkpoint["normalization"], cfg.illum_fields)
        emb = embed_plate(plate, normalizer, models, chans, device, cfg.precision, progress=progress)
        keys = list(range(len(plate.fields)))
        image_of = lambda i: normalizer.read(plate.fields[i])[0]  # noqa: E731
    table, feats = emb.fields, [c for c in emb.fields.columns if c.startswith("Emb_")]
    n_tvn = None
    if cfg.tvn_control_query:
        from cpvs.tables import query_mask

        table, feats = tvn(table, feats, query_mask(table, cfg.tvn_control_query, "--tvn-control-query"))
        n_tvn = len(feats)
    paths = save_tables(table, feats, cfg.out, cfg.aggregate)
    pngs = []
    if cfg.attention_maps is not None:
        n = max(1, cfg.n_attention)
        for i in keys[:: max(1, len(keys) // n)][:n]:
            meta = emb.fields.iloc[keys.index(i)]
            name = f"{meta['Metadata_Plate']}_{meta['Metadata_Well']}_s{meta['Metadata_Site']}"
            pngs.append(save_attention_png(cfg.attention_maps / f"{name}.png", attention_maps(models, image_of(i), chans, device),
                                           f"{name}: CLS attention of the last block"))
    return EmbedResult(len(emb.fields), chans, emb.dim, str(device), paths, n_tvn, pngs)

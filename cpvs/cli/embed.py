"""``cpvs embed``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cpvs.cli.common import JsonOpt, finish, ChannelMapOpt, PlatemapOpt, Average, Precision, channels as parse_channels, cli_errors, out_console, progress_bar, state


@cli_errors
def embed(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(metavar="PLATE|STORE", help="A plate folder / LoadData CSV (normalized with the checkpoint's preprocessing) or a store from `cpvs preprocess`.")],
    checkpoint: Annotated[Path, typer.Option(metavar="RUN|FILE", help="DINO / WS-DINO run folder or checkpoint (the teacher networks are used).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="TABLE", help="Field-level table EMB.parquet; EMB_well.parquet and EMB_perturbation.parquet are written beside it.")],
    channels: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Channels to embed (default: all the checkpoint's channels), e.g. BF alone.")] = None,
    channel_map: ChannelMapOpt = None,
    platemap: PlatemapOpt = None,
    aggregate: Annotated[Average, typer.Option(help="How fields are aggregated to wells and wells to perturbations.")] = Average("median"),
    tvn_control_query: Annotated[Optional[str], typer.Option(metavar="QUERY", help="Typical variation normalization fitted on these rows, e.g. \"Metadata_ControlType == 'negcon'\".")] = None,
    attention_maps: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder for PNGs of the last block's CLS attention per head.")] = None,
    n: Annotated[int, typer.Option("--n", "--n-attention", help="Fields (evenly spaced) drawn as attention maps.")] = 16,
    precision: Annotated[Precision, typer.Option(help="Autocast precision on GPU (the CPU always computes in fp32).")] = Precision("bf16"),
    illum_fields: Annotated[int, typer.Option(help="Plates: fields averaged for the illumination correction.")] = 256,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace tables made with another checkpoint, source or options.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Embed fields with per-channel DINO / WS-DINO ViTs into Parquet tables.

    Per field and channel: CLS embeddings of the four 224² crops tiling the central 448² square,
    median over the crops; channels concatenated (Emb_<Channel>_<i>) and L2-normalized; then
    aggregated to wells and perturbations, optionally after TVN (PCA whitening on controls).
    Works on real and predicted plates and on brightfield channels alone.
    """
    from cpvs.embed.run import EmbedConfig, embed as run

    st = state(ctx)
    cfg = EmbedConfig(source, checkpoint, out, channels=parse_channels(channels), channel_map=channel_map, platemap=platemap,
                      aggregate=aggregate.value, tvn_control_query=tvn_control_query, attention_maps=attention_maps, n_attention=n,
                      precision=precision.value, illum_fields=illum_fields, device=st.device, overwrite=overwrite)
    with progress_bar(st.quiet) as cb:
        res = run(cfg, progress=cb)
    def human() -> None:
        out_console.print(f"embedded {res.n_fields} fields x {len(res.channels)} channel(s) ({res.dim} dims each) on {res.device}"
                          + (f", TVN to {res.n_tvn} components" if res.n_tvn is not None else "")
                          + ": " + ", ".join(str(p) for p in res.tables.values()))
        if res.attention_pngs:
            out_console.print(f"attention maps in {cfg.attention_maps}")

    finish(st, json_out, res, human)

"""``cpvs profile``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cpvs.cli.common import JsonOpt, finish, choices, Threshold, NormMethod, ChannelMapOpt, PlatemapOpt, PlateNameOpt, Average, OnError, channels as parse_channels, cli_errors, csv_list, is_table, out_console, progress_bar, state

MasksFormat = choices("MasksFormat", "tiff ome-zarr")

Engine = choices("Engine", "cpvs cp_measure")


def _engine_device(device: str) -> str:
    """The engine runs where --device says; "auto" picks the GPU when there is one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@cli_errors
def profile(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="Plate folder(s) or LoadData CSV(s) to segment and measure, or one profile table (CSV/Parquet) to normalize and feature-select.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR|TABLE", help="Output folder (plates), or output table / folder (table mode).")],
    channel_map: ChannelMapOpt = None,
    channels: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Comma-separated channels to measure (default: every stain, no brightfield).")] = None,
    platemap: PlatemapOpt = None,
    plate_name: PlateNameOpt = None,
    nuclei_channel: Annotated[str, typer.Option(metavar="CH", help="Channel segmented into nuclei.")] = "DNA",
    cell_channel: Annotated[str, typer.Option(metavar="CH", help="Cytoplasmic channel the cells are grown on (AGP or ER).")] = "AGP",
    threshold: Annotated[Threshold, typer.Option(help="Global threshold: li (minimum cross-entropy) or otsu.")] = Threshold("li"),
    threshold_correction: Annotated[float, typer.Option(help="Factor on the nuclei threshold.")] = 1.0,
    cell_threshold_correction: Annotated[float, typer.Option(help="Factor on the cytoplasm threshold (below 1 keeps dim cytoplasm).")] = 0.7,
    smoothing: Annotated[float, typer.Option(help="Gaussian sigma before thresholding, px.")] = 1.5,
    min_nucleus_diameter: Annotated[float, typer.Option(help="Smallest nucleus kept, px (equivalent diameter).")] = 12.0,
    max_nucleus_diameter: Annotated[float, typer.Option(help="Largest nucleus kept, px.")] = 90.0,
    declump_distance: Annotated[float, typer.Option(help="Minimum distance between seeds splitting touching nuclei, px.")] = 7.0,
    max_cell_distance: Annotated[float, typer.Option(help="How far a cell may extend from its nucleus, px.")] = 120.0,
    keep_border: Annotated[bool, typer.Option("--keep-border", help="Keep objects touching the field border.")] = False,
    masks_from: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Reuse masks instead of segmenting: a `cpvs profile` output folder (or a folder of WELL_sSITE_nuclei/cells.tiff), or an OME-Zarr plate with NGFF labels.")] = None,
    masks_format: Annotated[MasksFormat, typer.Option(help="tiff: OUT/masks/<plate>/WELL_sSITE_nuclei|cells.tiff; ome-zarr: NGFF labels (nuclei, cells) inside the OME-Zarr plate itself, next to its images.")] = MasksFormat("tiff"),
    engine: Annotated[Engine, typer.Option(help="Who measures: cpvs (the vectorized engine: the same columns and values as cp_measure, ~10x faster; on --device) or cp_measure (the reference).")] = Engine("cpvs"),
    skip: Annotated[Optional[str], typer.Option(metavar="MODULE,...", help="Comma-separated modules to skip: intensity, sizeshape, zernike, feret, texture, granularity, radial_distribution, radial_zernikes, correlation, costes, neighbors.")] = None,
    illum_size: Annotated[int, typer.Option(help="Illumination correction median filter size, px (0 disables).")] = 249,
    illum_fields: Annotated[int, typer.Option(help="Fields (evenly spaced) averaged for the illumination function.")] = 256,
    workers: Annotated[int, typer.Option(help="Processes measuring fields in parallel.")] = 1,
    shard: Annotated[Optional[str], typer.Option(metavar="I/N", help="Process shard I of N (e.g. 2/3); the tables are written by the shard that finishes the plate.")] = None,
    single_cells: Annotated[bool, typer.Option("--single-cells", help="Also write the single-cell table.")] = False,
    aggregate: Annotated[Average, typer.Option(help="Images -> wells -> perturbations (single cells -> image is always the median).")] = Average("median"),
    overlays: Annotated[int, typer.Option(help="Save mask overlay PNGs for the first N fields.")] = 0,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and report it.")] = OnError("raise"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Measure every field again, replacing results made with other parameters (a rerun with the same ones resumes).")] = False,
    join: Annotated[Optional[list[Path]], typer.Option(metavar="TABLE", help="Table mode: metadata table(s) joined on their shared Metadata_ columns (e.g. plate, well -> compound, MOA).")] = None,
    normalize: Annotated[Optional[NormMethod], typer.Option(help="Normalize features (pycytominer methods).")] = None,
    control_query: Annotated[Optional[str], typer.Option(metavar="QUERY", help="Rows the normalization is fitted on, e.g. \"Metadata_ControlType == 'negcon'\" (default: all rows).")] = None,
    by_plate: Annotated[bool, typer.Option("--by-plate", help="Fit the normalization separately per Metadata_Plate (see README: it helps with many controls per plate, hurts with few).")] = False,
    feature_select: Annotated[bool, typer.Option("--feature-select", help="Select features with --select-ops.")] = False,
    select_ops: Annotated[str, typer.Option(metavar="OP,...", help="Feature-selection operations, in order.")] = "drop_na_columns,variance_threshold,blocklist,correlation_threshold,drop_outliers",
    features_from: Annotated[Optional[Path], typer.Option(metavar="TABLE", help="Keep the features of this table (e.g. selected on the ground truth, applied to predictions).")] = None,
    na_cutoff: Annotated[float, typer.Option(help="drop_na_columns: largest allowed fraction of NaN.")] = 0.05,
    corr_threshold: Annotated[float, typer.Option(help="correlation_threshold: drop one of each pair correlated above this.")] = 0.9,
    freq_cut: Annotated[float, typer.Option(help="variance_threshold: second-most-common / most-common value ratio below which a feature is near-constant.")] = 0.05,
    unique_cut: Annotated[float, typer.Option(help="variance_threshold: fraction of unique values below which a feature is near-constant.")] = 0.01,
    outlier_cutoff: Annotated[float, typer.Option(help="drop_outliers: drop features reaching this many SDs in the control rows (all rows without --control-query).")] = 15.0,
    json_out: JsonOpt = False,
) -> None:
    """Profile plates (segment, measure, aggregate) or normalize and select an existing table.

    Plates: nuclei from the DNA channel (threshold, distance watershed, size filters), cells grown
    on a cytoplasmic stain, cytoplasm = cell - nucleus; CellProfiler features per compartment and
    channel named like CellProfiler (Cells_Intensity_MeanIntensity_DNA); medians per image, then
    wells and perturbations as Parquet with the platemap's Metadata_ columns. Real and predicted
    plates are profiled identically; --masks-from measures a predicted plate inside the real cells.
    Tables (CellProfiler/CytoTable/pycytominer CSV or Parquet): --normalize and --feature-select.
    """
    from cpvs.plate.shards import Shard
    from cpvs.profile.pipeline import ProfileConfig, profile_plate
    from cpvs.profile.postprocess import PostprocessConfig, postprocess_table, postprocess_wells
    from cpvs.profile.segment import SegmentParams

    st = state(ctx)
    post = PostprocessConfig(
        normalize=normalize.value if normalize else None, control_query=control_query, by_plate=by_plate,
        select=feature_select, operations=csv_list(select_ops), features_from=features_from,
        na_cutoff=na_cutoff, corr_threshold=corr_threshold, freq_cut=freq_cut, unique_cut=unique_cut, outlier_cutoff=outlier_cutoff,
    )
    post.check()
    if len(inputs) == 1 and inputs[0].is_file() and is_table(inputs[0]):
        target, rep = postprocess_table(inputs[0], post, out, join)

        def human() -> None:
            out_console.print(f"{rep.n_rows} rows: {rep.n_features_in} -> {rep.n_features_out} features -> {target}")
            print_postprocess(rep)

        finish(st, json_out, {"table": target, "postprocess": rep}, human)
        return
    seg = SegmentParams(nuclei_channel=nuclei_channel, cell_channel=cell_channel, smoothing=smoothing, threshold=threshold.value,
                        threshold_correction=threshold_correction, cell_threshold_correction=cell_threshold_correction,
                        min_nucleus_diameter=min_nucleus_diameter, max_nucleus_diameter=max_nucleus_diameter,
                        declump_min_distance=declump_distance, max_cell_distance=max_cell_distance, keep_border=keep_border)
    results = []
    for plate in inputs:
        cfg = ProfileConfig(plate=plate, out=out, channel_map=channel_map, channels=parse_channels(channels), platemap=platemap,
                            plate_name=plate_name, segment=seg, masks_from=masks_from, masks_format=masks_format.value, skip=tuple(csv_list(skip)),
                            engine=engine.value, device=_engine_device(st.device),
                            illum_size=illum_size, illum_fields=illum_fields, workers=workers, shard=Shard.parse(shard),
                            single_cells=single_cells, aggregate=aggregate.value, overlays=overlays, on_error=on_error.value,
                            overwrite=overwrite)
        with progress_bar(st.quiet) as cb:
            res = profile_plate(cfg, progress=cb)
        results.append(res)
        if not (st.quiet or json_out):  # one line per plate as it finishes
            done = f"{res.n_cells} cells; tables: {', '.join(p.name for p in res.tables.values())}" if res.complete else "plate not finished yet (other shards)"
            out_console.print(f"{res.plate}: {res.n_written} fields measured, {res.n_resumed} already done, "
                              f"{len(res.skipped)} skipped in {res.seconds:.1f} s; {done}")
    summary: dict = {"plates": results}
    if post.active and all(r.complete for r in results):
        paths, rep = postprocess_wells([r.tables["well"] for r in results], post, out, aggregate.value)
        summary["postprocess"] = {"tables": paths, "report": rep}

        def human() -> None:
            out_console.print(f"wells: {rep.n_features_in} -> {rep.n_features_out} features -> {paths['well']}, {paths['perturbation']}")
            print_postprocess(rep)

        finish(st, json_out, summary, human)
    elif json_out:
        finish(st, json_out, summary, lambda: None)


def print_postprocess(rep) -> None:
    n = rep.normalization
    if n:
        out_console.print(f"  normalized ({n['method']}) on {n['reference_rows']} reference rows"
                          + (", per plate" if n["by_plate"] else "")
                          + (f"; zero-MAD features set to NaN: {len(n['zero_mad_features_set_to_nan'])}" if n["zero_mad_features_set_to_nan"] else "")
                          + (f"; constant features set to NaN: {len(n['constant_features_set_to_nan'])}" if n["constant_features_set_to_nan"] else ""))
    if rep.selection.get("dropped"):
        out_console.print("  dropped by " + ", ".join(f"{k} {v}" for k, v in rep.selection["dropped"].items()))

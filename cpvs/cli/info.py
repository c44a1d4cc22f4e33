"""``cpvs info``: what cpvs sees in a path, for a person (aligned lines) or a program (``--json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rich.markup import escape

from cpvs.cli.common import ChannelMapOpt, JsonOpt, PlatemapOpt, PlateNameOpt, as_json, cli_errors, out_console

# Settings shown for a checkpoint in the human view; --json has them all.
TRAINING_KEYS = ("epochs", "steps_per_epoch", "batch_size", "crop", "lr", "weight_decay", "seed", "precision", "select", "label")


@cli_errors
def info(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A plate (folder, LoadData CSV, OME-Zarr), a store, a run folder or checkpoint, or a profile table.")],
    channel_map: ChannelMapOpt = None,
    platemap: PlatemapOpt = None,
    plate_name: PlateNameOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what cpvs sees in PATH, before running anything on it.

    A plate: layout, wells, sites per well, each channel name and the file channel (and plane) it
    comes from, file channels the channel map leaves out, names cpvs does not know, one field's image
    size, dtype and intensity range, the platemap's columns. A store of `cpvs preprocess`: fields
    done, channels, normalization, field size, plates, size on disk. A run folder or checkpoint of
    `cpvs train`: family, role, channels, hyperparameters, parameters, training data, epochs and
    metrics, cpvs version. A profile table: rows, metadata columns, features by compartment and
    module, embedding features, NaNs. --channel-map and --platemap are read as the other verbs read them.
    """
    from cpvs.info import describe

    result = describe(path, channel_map=channel_map, platemap=platemap, plate_name=plate_name)
    if json_out:
        print(as_json(result.to_dict()))
        return
    render = {"plate": _plate, "store": _store, "checkpoint": _checkpoint, "table": _table}
    if result.kind == "plates":
        lines = [line for p in result.facts["plates"] for line in _plate(p) + [""]]
    else:
        lines = render[result.kind](result.facts, result.path)
    for line in lines:
        out_console.print(line, markup=False, highlight=False)
    for w in result.warnings:  # part of the answer, so on stdout with it
        out_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


def _rows(pairs: list[tuple[str, Any]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"  {k:<{width}}  {v}" for k, v in pairs]


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _wells(wells: list[str]) -> str:
    return ", ".join(wells) if len(wells) <= 6 else f"{wells[0]}, {wells[1]}, ... {wells[-1]}"


def _distinct(columns: dict[str, int]) -> list[str]:
    return [f"{c} ({n} distinct)" for c, n in columns.items()]


def _plate(f: dict, path: str = "") -> list[str]:
    sites = ", ".join(f"{s} in {_count(n, 'well')}" for s, n in f["sites_per_well"].items())
    img = f["image"]
    size = f"{img['height']} x {img['width']} px, {img['dtype']} (read {img['field']})" + ("" if img["same_shape"] else "; channels differ in size")
    rows: list[tuple[str, Any]] = [
        ("layout", f["layout"]), ("root", f["root"]), ("fields", f["fields"]),
        ("wells", f"{f['wells']} ({_wells(f['well_list'])})"), ("sites per well", sites),
        ("channel map", f["channel_map"] or "none (the source names the channels)"), ("image", size),
    ]
    out = [f"plate {f['name']}"] + _rows(rows) + ["  channels"]
    width = max(len(c["name"]) for c in f["channels"])
    for c in f["channels"]:
        plane = f" plane {c['plane']}" if c["plane"] is not None else ""
        where = {"file names": f"file channel {c['channel']}{plane}",
                 "OME-Zarr channel axis": f"OME-Zarr channel {c['channel']}{plane}"}.get(c["source"], c["source"])
        lo, hi = img["range"][c["name"]]
        sat = img["saturated_fraction"][c["name"]]
        flag = f" ({sat:.2%} saturated)" if sat else ""
        if not c["known"]:
            flag += "   <- not a channel name cpvs knows" + (f"; did you mean {c['did_you_mean']}?" if c.get("did_you_mean") else "")
        out.append(f"    {c['name']:<{width}}  <- {where}   range {lo:g}..{hi:g}{flag}")
    for u in f["unmapped_file_channels"]:
        plane = f" plane {u['plane']}" if u["plane"] is not None else ""
        where = "OME-Zarr channel" if f["layout"] == "ome-zarr" else "file channel"
        out.append(f"    {'?':<{width}}  <- {where} {u['channel']}{plane}: not in the channel map, left out")
    pm = f["platemap"]
    out.append(f"  platemap  {pm['file'] or 'none (no platemap.csv in the folder; --platemap FILE adds one)'}")
    out += [f"    {c}" for c in _distinct(pm["columns"])]
    return out


def _store(f: dict, path: str) -> list[str]:
    n = f["normalization"]
    norm = ", ".join(f"{k} {v}" for k, v in n.items() if k not in ("dtype", "chunk"))
    done = f["fields"]
    rows = [
        ("fields", f"{done['done']:,} of {done['total']:,} done" + ("" if f["complete"] else " (not finished)")),
        ("channels", ", ".join(f["channels"])),
        ("field size", f"{f['field_size'][0]} x {f['field_size'][1]} px, {f['dtype']}"),
        ("normalization", norm),
        ("plates", ", ".join(f"{p} ({n} fields)" for p, n in f["plates"].items())),
        ("skipped fields", f["skipped_fields"]),
        ("size on disk", _bytes(f["size_on_disk"])),
        ("cpvs version", f["cpvs_version"]),
    ]
    out = [f"store {path}"] + _rows(rows)
    if f["metadata_columns"]:
        out.append("  metadata")
        out += [f"    {c}" for c in _distinct(f["metadata_columns"])]
    return out


def _checkpoint(f: dict, path: str) -> list[str]:
    ep = f["epochs"]
    epochs = f"last saved after epoch {ep['epoch']} (step {ep['step']})"
    if ep.get("recorded") is not None:
        epochs += f"; {ep['recorded']} epoch(s) in metrics.parquet"
    if ep.get("best_epoch") is not None:
        epochs += f"; best {ep['select']} {ep['best']:.4g} at epoch {ep['best_epoch']}"
    if ep.get("stopped_mid_epoch"):
        epochs += f"; stopped in epoch {ep['stopped_mid_epoch']['epoch']} (resume with --resume)"
    data = f["data"]
    trained_on = (f"{data.get('store')}: {data.get('n_fields')} fields of {', '.join(data.get('plates', []))}"
                  + (f" ({data['train_fields']} train / {data['val_fields']} validation, split by {data['split']})"
                     if "train_fields" in data else "")) if data else "not recorded"
    training = ", ".join(f"{k} {f['training'][k]}" for k in TRAINING_KEYS if k in f["training"])
    rows = [
        ("file", f["file"]),
        ("family", f"{f['family']} ({f['role']})"),
        ("inputs", ", ".join(f["inputs"]) or "-"),
        ("outputs", ", ".join(f["outputs"]) or "-"),
        ("parameters", f"{f['parameters']:,} {f['parameters_counted']}"),
        ("architecture", ", ".join(f"{k} {v}" for k, v in (f["hparams"] or {}).items() if not isinstance(v, dict)) or "-"),
        ("training", training or "-"),
        ("trained on", trained_on),
        ("epochs", epochs),
        ("metrics", ", ".join(f"{k} {v:.4g}" for k, v in ep["metrics"].items()) or "-"),
        ("cpvs version", f["cpvs_version"]),
    ]
    if "classes" in f:
        c = f["classes"]
        rows.insert(5, ("classes", f"{c['n']} from {c['label']}: {', '.join(map(str, c['names'][:8]))}" + (", ..." if c["n"] > 8 else "")))
    if f["run_folder"]:
        rows.insert(1, ("run folder", f"{f['run_folder']} (checkpoints: {', '.join(f['checkpoint_files'])})"))
    return [f"checkpoint {path}"] + _rows(rows)


def _table(f: dict, path: str) -> list[str]:
    feats = f["features"]
    nan = f["nan"]
    rows = [
        ("rows", f"{f['rows']:,} ({f['level']})"),
        ("features", f"{feats['total']:,}"),
        ("NaN", f"{nan['fraction']:.2%} of values; {nan['features_with_nan']} features and {nan['rows_with_nan']} rows have some; "
                f"{nan['all_nan_features']} features and {nan['all_nan_rows']} rows are all NaN"),
    ]
    out = [f"profile table {path}"] + _rows(rows) + ["  metadata"] + [f"    {c}" for c in _distinct(f["metadata"])]
    if feats["by_compartment"]:
        out.append("  features by compartment and module")
        for comp, n in feats["by_compartment"].items():
            mods = ", ".join(f"{m} {k}" for m, k in feats["by_module"].get(comp, {}).items())
            out.append(f"    {comp} {n}: {mods}")
    if feats["embedding"]["total"]:
        chans = ", ".join(f"{c} {n}" for c, n in feats["embedding"]["by_channel"].items())
        out.append(f"  embedding features  {feats['embedding']['total']} ({chans})")
    if feats["other"]["total"]:
        out.append(f"  other features  {feats['other']['total']} (e.g. {', '.join(feats['other']['examples'][:3])})")
    return out

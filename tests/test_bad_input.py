"""Bad input of every kind a command reads: one message naming the offending path (or value) and a
fix, exit code 2, no traceback, and nothing written that looks complete.

One table drives the cases: (input kind, what is wrong) -> how to make it, the command line, the
text the message must name, and where a complete-looking output must not appear."""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from cpvs.cli import app

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BBBC021 = SHARED / "bbbc021" / "BBBC021_per_well_feature_selected_mad_robustize.csv"


@dataclass
class Case:
    kind: str
    problem: str
    make: Callable[[Path, dict], list[str]]  # (tmp, fixtures) -> argv; may write bad files under tmp
    names: str  # text the message must contain ({tmp} is replaced)
    not_complete: Callable[[Path], bool] = lambda tmp: True


def _plate(tmp: Path, d: dict) -> Path:
    dst = tmp / "plate"
    if not dst.exists():
        shutil.copytree(d["plate"], dst)
    return dst


def _tiff(tmp, d, n=0) -> Path:
    return sorted(_plate(tmp, d).glob("r*c*f*p01-ch*.tiff"))[n]


def _no_store(tmp: Path) -> bool:
    import zarr

    s = tmp / "o.zarr"
    return not (s / "zarr.json").exists() or not dict(zarr.open_group(str(s), mode="r").attrs).get("complete")


def _no_tiffs(tmp: Path) -> bool:
    return not list((tmp / "o").glob("*.tiff"))


def _no_results(tmp: Path) -> bool:
    return not (tmp / "o" / "results.json").exists()


def pre(tmp, d, *extra) -> list[str]:
    return ["preprocess", str(_plate(tmp, d)), "-o", str(tmp / "o.zarr"), *extra]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def loaddata(tmp, d, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    df = pd.read_csv(d["plate"] / "load_data.csv")
    for c in [c for c in df.columns if c.startswith("PathName_")]:
        df[c] = str(d["plate"])
    return write(tmp / "ld.csv", edit(df).to_csv(index=False))


def checkpoint(tmp, d, content) -> Path:
    p = tmp / "ck.pt"
    if callable(content):
        content(p)
    else:
        write(p, content)
    return p


def predict(tmp, d, ck) -> list[str]:
    return ["predict-plate", str(d["plate"]), "--checkpoint", str(ck), "-o", str(tmp / "o")]


def table(tmp, d, text_or_df, name="t.csv") -> Path:
    if isinstance(text_or_df, pd.DataFrame):
        return write(tmp / name, text_or_df.to_csv(index=False))
    return write(tmp / name, text_or_df)


def evaluate(tmp, path, *extra) -> list[str]:
    return ["evaluate", str(path), "--nsc", "-o", str(tmp / "o"), *extra]


def _pickle_with_code(p: Path) -> None:
    with open(p, "wb") as fh:
        pickle.dump({"x": os.system}, fh)


def _truncated_checkpoint(d):
    def make(p: Path) -> None:
        data = (d["unet"] / "checkpoints" / "last.pt").read_bytes()
        p.write_bytes(data[: len(data) // 3])
    return make


def _foreign_torch_file(p: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, p)


def _float_tiff_with_nan(tmp, d) -> list[str]:
    f = _tiff(tmp, d, 0)
    img = tifffile.imread(f).astype(np.float32)
    img[5, 5] = np.nan
    tifffile.imwrite(f, img)
    return pre(tmp, d)


def _stack_tiff(tmp, d) -> list[str]:
    f = _tiff(tmp, d, 0)
    tifffile.imwrite(f, np.zeros((3, 160, 160), np.uint16))
    return pre(tmp, d)


def _odd_shape(tmp, d) -> list[str]:
    f = _tiff(tmp, d, 3)
    tifffile.imwrite(f, np.zeros((100, 120), np.uint16))
    return pre(tmp, d)


def _garbage_parquet(tmp, d) -> list[str]:
    return evaluate(tmp, write(tmp / "t.parquet", b"PAR1 not really a parquet file"))


CASES = [
    # plate folders
    Case("plate", "missing folder", lambda t, d: ["preprocess", str(t / "nowhere"), "-o", str(t / "o.zarr")], "nowhere", _no_store),
    Case("plate", "empty folder", lambda t, d: ["preprocess", str((t / "empty").mkdir() or t / "empty"), "-o", str(t / "o.zarr")],
         "empty", _no_store),
    Case("plate", "only other files", lambda t, d: ["preprocess", str(write(t / "docs" / "notes.txt", "hi").parent), "-o",
                                                    str(t / "o.zarr")], "docs", _no_store),
    Case("plate", "corrupt TIFF", lambda t, d: (write(_tiff(t, d, 2), b"not a tiff at all"), pre(t, d))[1], "ch", _no_store),
    Case("plate", "truncated TIFF", lambda t, d: (write(_tiff(t, d, 2), _tiff(t, d, 2).read_bytes()[:300]), pre(t, d))[1],
         "ch", _no_store),
    Case("plate", "field of another shape", _odd_shape, "100x120", _no_store),
    Case("plate", "missing channel file", lambda t, d: (_tiff(t, d, 1).unlink(), pre(t, d))[1], "r01c01f01", _no_store),
    Case("plate", "3-D TIFF", _stack_tiff, "shape", _no_store),
    Case("plate", "NaN in a float TIFF", _float_tiff_with_nan, "NaN", _no_store),
    Case("plate", "a file that is neither a plate nor a CSV", lambda t, d: ["preprocess", str(write(t / "x.bin", b"\x00\x01")),
                                                                             "-o", str(t / "o.zarr")], "x.bin", _no_store),
    Case("plate", "unknown --channels", lambda t, d: pre(t, d, "--channels", "DNA,Foo"), "Foo", _no_store),
    # OME-Zarr plates
    Case("ome-zarr", "a training store instead of a plate", lambda t, d: ["preprocess", str(d["store"]), "-o", str(t / "o.zarr")],
         "not an OME-Zarr HCS plate", _no_store),
    Case("ome-zarr", "a field's image group instead of the plate", lambda t, d: ["preprocess", str(_omezarr(t, d) / "A" / "1" / "0"),
                                                                                  "-o", str(t / "o.zarr")], "A/1/0", _no_store),
    Case("ome-zarr", "a well listed but missing", lambda t, d: ["preprocess", str(_omezarr(t, d, drop="A/2")), "-o",
                                                                 str(t / "o.zarr")], "A/2", _no_store),
    # LoadData CSVs
    Case("loaddata", "empty file", lambda t, d: ["preprocess", str(write(t / "load_data.csv", "")), "-o", str(t / "o.zarr")],
         "load_data.csv", _no_store),
    Case("loaddata", "header only", lambda t, d: ["preprocess", str(loaddata(t, d, lambda df: df.iloc[:0])), "-o",
                                                  str(t / "o.zarr")], "ld.csv", _no_store),
    Case("loaddata", "no FileName_ columns", lambda t, d: ["preprocess", str(loaddata(
        t, d, lambda df: df[[c for c in df.columns if not c.startswith("FileName_")]])), "-o", str(t / "o.zarr")], "ld.csv", _no_store),
    Case("loaddata", "a listed file is missing", lambda t, d: ["preprocess", str(loaddata(
        t, d, lambda df: df.assign(FileName_OrigDNA="gone.tiff"))), "-o", str(t / "o.zarr")], "gone.tiff", _no_store),
    Case("loaddata", "binary garbage", lambda t, d: ["preprocess", str(write(t / "load_data.csv", b"\x89PNG\x00\x00\xff")), "-o",
                                                     str(t / "o.zarr")], "load_data.csv", _no_store),
    # channel maps
    Case("channel map", "missing file", lambda t, d: pre(t, d, "--channel-map", str(t / "map.csv")), "map.csv", _no_store),
    Case("channel map", "bad inline syntax", lambda t, d: pre(t, d, "--channel-map", "1=,=DNA"), "1=,=DNA", _no_store),
    Case("channel map", "names an absent channel number", lambda t, d: pre(t, d, "--channel-map", "1=DNA,9=ER"), "9", _no_store),
    Case("channel map", "two channels one name", lambda t, d: pre(t, d, "--channel-map", "1=DNA,2=DNA"), "DNA", _no_store),
    Case("channel map", "empty file", lambda t, d: pre(t, d, "--channel-map", str(write(t / "map.csv", ""))), "map.csv", _no_store),
    # platemaps
    Case("platemap", "missing file", lambda t, d: pre(t, d, "--platemap", str(t / "pm.csv")), "pm.csv", _no_store),
    Case("platemap", "no well column", lambda t, d: pre(t, d, "--platemap", str(write(t / "pm.csv", "compound,moa\nA,B\n"))),
         "pm.csv", _no_store),
    Case("platemap", "empty file", lambda t, d: pre(t, d, "--platemap", str(write(t / "pm.csv", ""))), "pm.csv", _no_store),
    Case("platemap", "wells missing", lambda t, d: pre(t, d, "--platemap", str(write(t / "pm.csv", "well,compound\nA01,X\n"))),
         "pm.csv", _no_store),
    Case("platemap", "a well twice", lambda t, d: pre(t, d, "--platemap", str(table(
        t, d, pd.concat([pd.read_csv(d["plate"] / "platemap.csv")] * 2), "pm.csv"))), "pm.csv", _no_store),
    # stores
    Case("store", "missing", lambda t, d: ["train", "--model", "unet", "--data", str(t / "none.zarr"), "-o", str(t / "run")],
         "none.zarr"),
    Case("store", "a folder that is not a store", lambda t, d: ["train", "--model", "unet", "--data",
                                                                 str(write(t / "s" / "x.txt", "x").parent), "-o", str(t / "run")], "s"),
    Case("store", "an unknown input channel", lambda t, d: ["train", "--model", "unet", "--data", str(d["store"]), "-o",
                                                             str(t / "run"), "--inputs", "Foo", "--crop", "64"], "Foo"),
    Case("store", "a zarr group that is not a cpvs store", lambda t, d: ["train", "--model", "unet", "--data",
                                                                          str(_zarr_group(t)), "-o", str(t / "run")], "g.zarr"),
    # checkpoints
    Case("checkpoint", "missing", lambda t, d: predict(t, d, t / "none.pt"), "none.pt", _no_tiffs),
    Case("checkpoint", "empty file", lambda t, d: predict(t, d, checkpoint(t, d, b"")), "ck.pt", _no_tiffs),
    Case("checkpoint", "a text file", lambda t, d: predict(t, d, checkpoint(t, d, "weights: 1, 2, 3\n")), "ck.pt", _no_tiffs),
    Case("checkpoint", "truncated", lambda t, d: predict(t, d, checkpoint(t, d, _truncated_checkpoint(d))), "ck.pt", _no_tiffs),
    Case("checkpoint", "a pickle with code", lambda t, d: predict(t, d, checkpoint(t, d, _pickle_with_code)), "could run code",
         _no_tiffs),
    Case("checkpoint", "a torch file of something else", lambda t, d: predict(t, d, checkpoint(t, d, _foreign_torch_file)), "ck.pt",
         _no_tiffs),
    Case("checkpoint", "a run folder without checkpoints", lambda t, d: predict(t, d, (t / "run").mkdir() or t / "run"), "run",
         _no_tiffs),
    Case("checkpoint", "a family predict-plate cannot run", lambda t, d: predict(t, d, d["clf_like"]), "cannot be used here",
         _no_tiffs),
    # profile tables
    Case("table", "missing", lambda t, d: evaluate(t, t / "none.csv"), "none.csv", _no_results),
    Case("table", "empty file", lambda t, d: evaluate(t, table(t, d, "")), "t.csv", _no_results),
    Case("table", "header only", lambda t, d: evaluate(t, table(t, d, "Metadata_Compound,Metadata_MOA,f1\n")), "t.csv", _no_results),
    Case("table", "no feature columns", lambda t, d: evaluate(t, table(t, d, pd.read_csv(BBBC021).filter(like="Metadata_"))),
         "t.csv", _no_results),
    Case("table", "every feature NaN or Inf", lambda t, d: evaluate(t, table(t, d, _nan_table())), "t.csv", _no_results),
    Case("table", "no MOA column", lambda t, d: evaluate(t, table(t, d, pd.read_csv(BBBC021).drop(columns="Metadata_moa"))),
         "Metadata_MOA", _no_results),
    Case("table", "an unknown --moa-col", lambda t, d: evaluate(t, BBBC021, "--moa-col", "Metadata_Mechanism"),
         "Metadata_Mechanism", _no_results),
    Case("table", "a corrupt Parquet file", lambda t, d: _garbage_parquet(t, d), "t.parquet", _no_results),
    Case("table", "a bad --negative-query", lambda t, d: evaluate(t, BBBC021, "--negative-query", "Metadata_Foo == 1"),
         "Metadata_Foo", _no_results),
]


def _omezarr(tmp: Path, d: dict, drop: str | None = None) -> Path:
    from cpvs.plate.convert import convert

    convert(d["plate"], tmp / "p.zarr")
    if drop:
        shutil.rmtree(tmp / "p.zarr" / drop)
    return tmp / "p.zarr"


def _zarr_group(tmp: Path) -> Path:
    import zarr

    zarr.open_group(str(tmp / "g.zarr"), mode="w").attrs["hello"] = 1
    return tmp / "g.zarr"


def _nan_table() -> pd.DataFrame:
    df = pd.read_csv(BBBC021)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    df[feats] = np.nan
    df.loc[df.index[:3], feats[0]] = np.inf
    return df


@pytest.fixture(scope="module")
def fixtures(sim_root, sim_store, tmp_path_factory):
    from cpvs.checkpoints import load_checkpoint, save_checkpoint
    from cpvs.train.staining import StainingConfig, train_staining

    root = tmp_path_factory.mktemp("bad")
    train_staining(StainingConfig("unet", sim_store, root / "unet", crop=64, depth=3, width=4, epochs=1, steps_per_epoch=1,
                                  batch_size=2, device="cpu", workers=1))
    ck = load_checkpoint(root / "unet")
    ck.pop("path")
    ck["family"] = "classifier"  # a checkpoint of a family predict-plate cannot use
    save_checkpoint(root / "clf.pt", **ck)
    return {"plate": sim_root / "SIM3-P01", "store": sim_store, "unet": root / "unet", "clf_like": root / "clf.pt"}


def test_the_table_covers_every_input_kind_with_at_least_40_cases():
    assert len(CASES) >= 40
    assert {c.kind for c in CASES} == {"plate", "ome-zarr", "loaddata", "channel map", "platemap", "store", "checkpoint", "table"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.problem}" for c in CASES])
def test_bad_input_is_one_clear_error(case, fixtures, tmp_path):
    argv = case.make(tmp_path, fixtures)
    r = runner.invoke(app, ["--device", "cpu", *argv], env={"COLUMNS": "250"})
    text = r.output + (str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else "")
    assert r.exit_code == 2, f"exit {r.exit_code}: {text}"
    assert "Traceback" not in text and "error:" in text, text
    assert case.names.format(tmp=tmp_path) in text, text
    assert "fix:" in text, f"no fix given: {text}"
    assert case.not_complete(tmp_path), "an output that looks complete was written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_tiff_is_named(fixtures, tmp_path):
    f = _tiff(tmp_path, fixtures, 0)
    f.chmod(0)
    r = runner.invoke(app, pre(tmp_path, fixtures))
    assert r.exit_code == 2 and f.name in r.output and "fix:" in r.output

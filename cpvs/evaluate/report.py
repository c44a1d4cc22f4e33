"""One self-contained HTML report: inline PNG figures and tables, opens from disk, no network."""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from cpvs import __version__
from cpvs.evaluate.figures import bar_per_class, embedding_plot, heatmap

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1150px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{font-size:1.05rem;margin-top:1.4rem}.meta{color:#666;font-size:.85rem}
table{border-collapse:collapse;font-size:.82rem;margin:.6rem 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.kpi{display:inline-block;border:1px solid #ddd;border-radius:6px;padding:.5rem .9rem;margin:.3rem .5rem .3rem 0;background:#fafafa}
.kpi b{display:block;font-size:1.35rem}.note{color:#8a5a00;font-size:.85rem}img{max-width:100%}
"""


def _fig_to_img(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(df: pd.DataFrame, max_rows: int = 40, floatfmt: str = "{:.3f}") -> str:
    if df is None or len(df) == 0:
        return "<p class='meta'>(empty)</p>"
    more = f"<p class='meta'>{len(df) - max_rows} more rows in the output files</p>" if len(df) > max_rows else ""
    return df.head(max_rows).to_html(index=False, float_format=lambda v: floatfmt.format(v), border=0, escape=True) + more


def _kpi(label: str, value: str) -> str:
    return f"<span class='kpi'>{html.escape(label)}<b>{html.escape(value)}</b></span>"


class Report:
    """Sections appended in order; ``write`` renders one HTML file."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def section(self, title: str) -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def subsection(self, title: str) -> None:
        self.parts.append(f"<h3>{html.escape(title)}</h3>")

    def text(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def kpis(self, items: dict[str, str]) -> None:
        self.parts.append("<div>" + "".join(_kpi(k, v) for k, v in items.items()) + "</div>")

    def table(self, df: pd.DataFrame, **kw) -> None:
        self.parts.append(_table(df, **kw))

    def figure(self, fig) -> None:
        self.parts.append(_fig_to_img(fig))

    def write(self, path: Path) -> Path:
        from cpvs.runinfo import atomic_path

        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
               f"<p class='meta'>cpvs {__version__} · {stamp}</p>{''.join(self.parts)}</body></html>")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(doc, encoding="utf-8")
        return path


def table_label(path) -> str:
    """A table named so two reports tell apart: ``profiles-unet/well.parquet``, not ``well.parquet``."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def build_report(path: Path, res, cfg, extras: dict[str, Any] | None = None) -> Path:
    """The evaluation report of ``evaluate_profiles`` results (None for images only) plus the
    image metrics, FID and image grids in ``extras``."""
    extras = extras or {}
    if res is None:
        title = "cpvs evaluation: images"
    elif cfg.truth:
        title = f"cpvs evaluation: prediction {table_label(cfg.profiles)} against ground truth {table_label(cfg.truth)}"
    else:
        title = f"cpvs evaluation: {table_label(cfg.profiles)}"
    rep = Report(title)
    if res is not None:
        rep.text(f"{res.n_rows} profiles of {cfg.profiles}, {res.n_features} features" +
                 (f"; ground truth {cfg.truth}" if cfg.truth else ""), "meta")
        for n in res.notes:
            rep.text(n, "note")
    r = res.results if res is not None else {}
    if "nsc" in r or "nscb" in r:
        rep.section("MOA matching (NSC / NSCB)")
        rep.kpis({m.name: f"{m.score:.1%} of {m.n_queries}" for k in ("nsc", "nscb") if k in r for m in [r[k]]})
        for key in ("nsc", "nscb"):
            if key in r:
                m = r[key]
                if m.excluded_classes:
                    rep.text(f"{m.name}: MOAs present in a single batch, left out: {', '.join(m.excluded_classes)}", "note")
                if m.single_compound_classes:
                    rep.text(f"{m.name}: MOAs with a single compound, not queried: {', '.join(m.single_compound_classes)}", "note")
                rep.figure(bar_per_class(m.per_class, f"{m.name} accuracy per MOA"))
                rep.subsection(f"{m.name} confusion pairs (true MOA → neighbour's MOA)")
                rep.table(m.confusion, max_rows=20)
        rep.subsection("nearest neighbours (NSC)" if "nsc" in r else "nearest neighbours (NSCB)")
        rep.table(r.get("nsc", r.get("nscb")).neighbors, max_rows=30)
    if "target" in r:
        t = r["target"]
        rep.section("Target matching")
        rep.kpis({"top-1": f"{t.top1}/{t.n_queries}", f"top-{t.k}": f"{t.topk}/{t.n_queries}", "MTdist": f"{t.mtdist:.3f}",
                  "other pairs": f"{t.mean_distance_other:.3f}", "chance top-1": f"{t.chance_top1:.3%}"})
        rep.table(t.neighbors, max_rows=30)
    if "cpcor" in r:
        c = r["cpcor"]
        rep.section(f"Feature correlation with the ground truth ({c.summary['method']})")
        rep.kpis({"mean r": f"{c.summary['mean']:.3f}", "features": str(c.summary["n_valid"]), "r > 0.8": str(c.summary["n_above_0.8"]),
                  "top 10 %": f"{c.summary['top10_mean']:.3f}", "top 50 %": f"{c.summary['top50_mean']:.3f}",
                  "matched rows": str(c.n_matched)})
        if c.heatmap.size:
            rep.figure(heatmap(c.heatmap, "mean correlation by channel and feature group"))
        rep.table(pd.DataFrame({"compartment": c.by_compartment.index, "mean r": c.by_compartment.values}))
        rep.table(c.per_feature.sort_values("r", ascending=False), max_rows=25)
    if "toxicity" in r:
        t = r["toxicity"]
        rep.section("Toxicity (k-NN on controls)")
        k = {"called toxic": f"{int(t['pred'].calls['toxic'].sum())}/{len(t['pred'].calls)}"}
        if "agreement" in t:
            a = t["agreement"]
            k.update({"sensitivity": f"{a['sensitivity']:.1%}", "specificity": f"{a['specificity']:.1%}"})
        rep.kpis(k)
        rep.table(t["pred"].calls.sort_values("toxic_votes", ascending=False), max_rows=30)
    if "active" in r:
        rep.section("Active subset")
        a = r["active"]
        rep.kpis({"active": f"{int(a['active'].sum())}/{len(a)}"})
        rep.table(a.sort_values("distance_to_negcon", ascending=False), max_rows=30)
    if "map" in r:
        rep.section(f"Mean average precision ({getattr(cfg, 'map_engine', 'cpvs')} engine, copairs' definitions)")
        for name, m in r["map"].items():
            rep.subsection(f"{name}: mean mAP {m['mean_average_precision'].mean():.3f}, "
                           f"{m['below_corrected_p'].mean():.0%} significant after FDR")
            rep.table(m.drop(columns=[c for c in ("indices",) if c in m.columns])
                      .sort_values("mean_average_precision", ascending=False), max_rows=20)
    if "image_metrics" in extras:
        rep.section("Image metrics of the predicted images")
        rep.table(extras["image_metrics"])
    if "fid" in extras:
        rep.section("Fréchet distance per channel")
        rep.table(pd.DataFrame([{"channel": k, "FID": v} for k, v in extras["fid"].items()]))
    if "grids" in extras:
        rep.section("Images: brightfield, ground truth, prediction, uncertainty")
        for fig in extras["grids"]:
            rep.figure(fig)
    if res is not None and res.wells is not None and len(res.wells) >= 8:  # t-SNE needs a few points
        rep.section("Profiles in two dimensions")
        frames = [res.wells.assign(_source="prediction" if res.truth_wells is not None else "profiles")]
        if res.truth_wells is not None:
            frames.append(res.truth_wells.assign(_source="ground truth"))
        feats = [f for f in res.features if all(f in fr.columns for fr in frames)]
        both = pd.concat(frames, ignore_index=True)
        colours = {}
        if len(frames) > 1:
            colours["source"] = both["_source"]
        for label, col in (("batch", res.columns.get("batch")), ("MOA", res.columns.get("moa"))):
            if col and col in both.columns and both[col].nunique() > 1:  # one batch colours nothing
                colours[label] = both[col]
        if not colours:
            colours["compound"] = both[res.columns["compound"]]
        if len(feats) < 2:  # a single feature already is the picture; t-SNE of it says nothing more
            rep.text(f"{len(feats)} feature(s) left after feature selection: no two-dimensional view.")
        else:
            rep.figure(embedding_plot(both[feats].to_numpy(dtype=float), colours, seed=cfg.seed))
    return rep.write(path)

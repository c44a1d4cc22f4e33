"""benchmarks/gpu_suite.py: the smoke run (every part on CPU at tiny sizes) and the runner's caps."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _suite():
    if "gpu_suite" in sys.modules:
        return sys.modules["gpu_suite"]
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_runs_every_part_and_reports_every_figure_or_why_not(tmp_path):
    suite = _suite()
    t = time.time()
    suite.main(["--smoke", "--out", str(tmp_path)])
    assert time.time() - t < 180  # the smoke's own budget; ~30 s on an idle 2-core machine
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["smoke"] and report["environment"]["device"] == "cpu"
    assert report["selected"] == list(suite.PARTS)
    settings = suite.Settings.for_run(True, "cpu", "", None)
    rows = 0
    for name in suite.PARTS:
        part = report["parts"][name]
        assert part["status"] in ("ok", "partial", "skipped"), (name, part["status"], part["error"])
        expected = [key for key, *_ in suite.parts.expected(name, settings)]
        rows += len(expected) + len(part["notes"])
        for key in expected:
            if key in part["figures"]:
                assert part["figures"][key]["value"] is not None
            else:  # a skipped figure says why
                why = [s["why"] for s in part["skipped"] if key in s["keys"] or name in s["keys"]]
                assert why and all(w.strip() for w in why), (name, key)
    # the paths that run on CPU ran
    figures = {k for p in report["parts"].values() for k in p["figures"]}
    assert {"train.unet.bf16", "predict.ddpm.batch", "ddp.resume", "unet.e2e.bf16", "diff.b4.s50"} <= figures
    table = (tmp_path / "gpu_suite.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| part ")]
    assert len(body) == rows and all(line.count("|") >= 8 for line in body)
    for name in suite.PARTS:
        assert any(line.startswith(f"| {name} (") for line in body), name


def test_a_part_past_its_cap_is_killed_and_keeps_its_figures(tmp_path):
    suite = _suite()
    settings = suite.Settings.for_run(True, "cpu", str(tmp_path), None)
    settings.deadline, settings.threads = time.time() + 1, 0  # threads 0: the child needs no torch
    t = time.time()
    res = suite.run_child("_sleep", settings, tmp_path / "sleep.json", kill_at=time.time() + 4)
    assert time.time() - t < 15
    assert res.status == "killed" and "selftest.before" in res.figures and "selftest.after" not in res.figures


def test_a_crashing_part_records_its_last_traceback_line(tmp_path):
    suite = _suite()
    settings = suite.Settings.for_run(True, "cpu", str(tmp_path), None)
    settings.deadline, settings.threads = time.time() + 30, 0
    res = suite.run_child("_crash", settings, tmp_path / "crash.json", kill_at=time.time() + 30)
    assert res.status == "failed" and res.error == "RuntimeError: selftest crash" and "selftest.before" in res.figures


def test_parts_without_time_left_are_skipped_with_the_reason(tmp_path):
    suite = _suite()
    suite.main(["--smoke", "--parts", "ddp,unet_speed", "--budget-minutes", "0.05", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    for name in ("ddp", "unet_speed"):
        part = report["parts"][name]
        assert part["status"] == "skipped" and "budget" in part["skipped"][0]["why"]
    assert report["seconds"] < 3 + 10
    assert "| ddp (skipped" in (tmp_path / "gpu_suite.md").read_text()

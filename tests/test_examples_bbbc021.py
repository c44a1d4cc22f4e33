"""examples/bbbc021/nsc.sh on the real BBBC021 tables: from the raw per-well table (and from the
published normalized table) to NSC/NSCB, at least as good as examples/README.md says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED

# (NSC correct / treatments, NSCB correct / treatments) per output folder of the script, as in examples/README.md.
EXPECTED = {
    "eval-raw": ((94, 103), (70, 92)),
    "eval-raw-by-plate": ((72, 103), (65, 92)),
    "eval-selected": ((94, 103), (69, 92)),
}


@pytest.mark.slow
def test_nsc_example_reaches_the_documented_numbers(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DATA": str(SHARED / "bbbc021"), "PYTHON": sys.executable,
           "CPVS_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", "examples/bbbc021/nsc.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    readme = (REPO / "examples" / "README.md").read_text()
    got = {}
    for folder, expected in EXPECTED.items():
        res = json.loads((tmp_path / folder / "results.json").read_text())
        for key, (correct, total) in zip(("nsc", "nscb"), expected):
            assert res[key]["n_queries"] == total, (folder, key)
            assert res[key]["n_correct"] >= correct, (folder, key, res[key]["n_correct"])
            got[folder, key] = res[key]["n_correct"]
            # the README shows what the script prints
            assert f"{100 * correct / total:.1f}% ({correct}/{total})" in readme
    # What the README says about --by-plate: normalizing each plate on its 6 DMSO wells costs accuracy.
    assert got["eval-raw-by-plate", "nsc"] < got["eval-raw", "nsc"]
    assert r.stdout.count("NSC ") == 3 and r.stdout.count("NSCB ") == 3

"""Locks, resume identity and pools (cpvs.jobs), and the reruns users make into one output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.errors import CpvsError
from cpvs.jobs import LOCK_PREFIX, OutputLock, claim_identity, graceful_stop, process_pool, thread_pool

runner = CliRunner()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _foreign_lock(folder, name=LOCK_PREFIX, host=None, pid=None, age=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid or os.getppid(), "command": "profile",
                                "started": "2026-11-28T00:00:00+00:00"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    _foreign_lock(tmp_path)  # held by a live process (our parent)
    with pytest.raises(CpvsError) as e:
        OutputLock(tmp_path, "profile").acquire()
    assert f"pid {os.getppid()}" in str(e.value) and socket.gethostname() in str(e.value) and "since 2026-11-28" in str(e.value)


def test_stale_locks_are_taken_over(tmp_path):
    _foreign_lock(tmp_path, pid=_dead_pid())  # same host, process gone
    with OutputLock(tmp_path, "profile") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()
    _foreign_lock(tmp_path, host="another-node", pid=1, age=600)  # no heartbeat for 10 minutes
    with OutputLock(tmp_path, "profile"):
        pass
    _foreign_lock(tmp_path, host="another-node", pid=1, age=5)  # alive elsewhere
    with pytest.raises(CpvsError, match="another-node"):
        OutputLock(tmp_path, "profile").acquire()


def test_taking_the_lock_removes_what_killed_writers_left_and_keeps_live_ones(tmp_path):
    from cpvs.runinfo import atomic_path

    host = socket.gethostname()
    (tmp_path / "sub").mkdir()
    dead = tmp_path / "sub" / f".tmp-{host}~{_dead_pid()}~field.tiff.abc.tiff"  # a killed run's half file
    live = tmp_path / f".tmp-{host}~{os.getppid()}~table.parquet.def.parquet"  # a shard still writing
    elsewhere = tmp_path / ".tmp-another-node~1~table.parquet.ghi.parquet"  # cannot tell: kept
    user = tmp_path / ".tmp-notes.txt"  # not ours
    for p in (dead, live, elsewhere, user):
        p.write_bytes(b"half")
    with OutputLock(tmp_path, "predict-plate"):
        assert not dead.exists() and live.exists() and elsewhere.exists() and user.exists()
        with atomic_path(tmp_path / "x.parquet") as tmp:
            assert tmp.name.startswith(f".tmp-{host}~{os.getpid()}~x.parquet.") and tmp.suffix == ".parquet"
            tmp.write_bytes(b"done")
    assert (tmp_path / "x.parquet").read_bytes() == b"done"


def test_preprocess_killed_while_creating_its_store_resumes(sim_root, tmp_path):
    """A kill between the store's first array and its field table left a store that a rerun must finish."""
    import pandas as pd
    import zarr

    from cpvs.plate import discover_plates
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.preprocess.store import Store

    plates = discover_plates(sim_root / "SIM3-P01")
    out = tmp_path / "s.zarr"
    g = zarr.open_group(str(out), mode="a")
    g.create_array("images", shape=(1, 1, 8, 8), dtype="float16")  # ... and then the kill
    preprocess_plates(plates, out, workers=1)
    store = Store(out)
    assert store.attrs["complete"] and len(pd.read_parquet(out / "fields.parquet")) == len(plates[0].fields) == 12


def test_shards_of_one_job_share_an_output_other_runs_do_not(tmp_path):
    from cpvs.jobs import lock_name

    for shard in ((1, 3), (2, 3)):  # two shards of a job running elsewhere (held by a live process)
        _foreign_lock(tmp_path, lock_name(shard))
    with OutputLock(tmp_path, "predict-plate", (3, 3)):  # the third shard joins them
        pass
    for other in ((1, 3), (1, 2), None):
        with pytest.raises(CpvsError, match="in use by another cpvs run"):
            OutputLock(tmp_path, "predict-plate", other).acquire()
    _foreign_lock(tmp_path / "prof", lock_name(None, "PLATE-A"))  # profiles of two plates share a folder
    with OutputLock(tmp_path / "prof", "profile", name="PLATE-B"):
        pass


def test_identity_names_the_differing_parameters_and_overwrite_replaces(tmp_path):
    claim_identity(tmp_path, "profile", {"threshold": "li", "skip": []})
    claim_identity(tmp_path, "profile", {"threshold": "li", "skip": []})  # same: resume
    with pytest.raises(CpvsError) as e:
        claim_identity(tmp_path, "profile", {"threshold": "otsu", "skip": ["costes"]})
    assert "threshold: 'li' -> 'otsu'" in str(e.value) and "skip" in str(e.value) and "--overwrite" in str(e.value)
    claim_identity(tmp_path, "profile", {"threshold": "otsu", "skip": []}, overwrite=True)
    claim_identity(tmp_path, "profile", {"threshold": "otsu", "skip": []})
    with pytest.raises(CpvsError, match="cpvs profile"):
        claim_identity(tmp_path, "predict-plate", {"threshold": "otsu", "skip": []})
    # a nested group names the key that changed, not the whole group
    claim_identity(tmp_path / "n", "profile", {"segment": {"threshold": "li", "smoothing": 1.5}, "skip": []})
    with pytest.raises(CpvsError) as e:
        claim_identity(tmp_path / "n", "profile", {"segment": {"threshold": "otsu", "smoothing": 1.5}, "skip": []})
    assert "(segment.threshold: 'li' -> 'otsu')" in str(e.value) and "smoothing" not in str(e.value)


def _sleep(x):
    time.sleep(x)
    return os.getpid()


def test_pools_cancel_queued_work_and_terminate_workers_on_interrupt():
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with thread_pool(2) as ex:
            futures = [ex.submit(time.sleep, 0.5) for _ in range(40)]
            raise KeyboardInterrupt
    assert time.perf_counter() - t0 < 3 and sum(f.cancelled() for f in futures) >= 36
    pids = []
    with pytest.raises(KeyboardInterrupt):
        with process_pool(2) as ex:
            pids = list(ex.map(_sleep, [0.01, 0.01]))
            ex.submit(_sleep, 60)
            manager = ex._executor_manager_thread
            raise KeyboardInterrupt
    # its manager thread is gone too: left running, it races the interpreter's exit hook over its wake-up
    # pipe ("Bad file descriptor" tracebacks after Ctrl-C)
    assert not manager.is_alive()
    time.sleep(0.2)
    for pid in set(pids):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_graceful_stop_sets_a_flag_first_then_interrupts():
    with graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)


def test_profile_rerun_with_other_parameters_is_refused_and_overwrite_recomputes(sim_root, tmp_path):
    plate, out = sim_root / "SIM3-P01", tmp_path / "prof"
    base = ["profile", str(plate), "-o", str(out), "--skip", "texture,granularity,radial_distribution,radial_zernikes,costes"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    for change in (["--threshold", "otsu"], ["--min-nucleus-diameter", "30"]):
        r = runner.invoke(app, base + change)
        assert r.exit_code == 2 and "made with other parameters" in r.output, r.output
        assert change[0].lstrip("-").replace("-", "_") in r.output
    r = runner.invoke(app, base + ["--threshold", "otsu", "--overwrite"])
    assert r.exit_code == 0 and "12 fields measured, 0 already done" in r.output, r.output
    r = runner.invoke(app, base + ["--threshold", "otsu"])
    assert r.exit_code == 0 and "0 fields measured, 12 already done" in r.output, r.output


def test_every_resumable_command_refuses_a_rerun_with_another_parameter(sim_root, sim_store, tmp_path):
    """predict-plate, evaluate, train --resume and simulate name the parameter that changed; --overwrite replaces."""
    plate = sim_root / "SIM3-P01"
    tiny = ["--crop", "64", "--depth", "3", "--width", "4", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2"]
    r = runner.invoke(app, ["--device", "cpu", "train", "--model", "unet", "--data", str(sim_store), "-o", str(tmp_path / "u"), *tiny])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["--device", "cpu", "train", "--model", "unet", "--data", str(sim_store), "-o", str(tmp_path / "u"),
                            *tiny[:-6], "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "2", "--lr", "0.01", "--resume"])
    assert r.exit_code == 2 and "--lr" in r.output, r.output

    pred = ["--device", "cpu", "predict-plate", str(plate), "--checkpoint", str(tmp_path / "u"), "-o", str(tmp_path / "p"), "--shard", "1/6"]
    assert runner.invoke(app, pred).exit_code == 0
    r = runner.invoke(app, pred + ["--stitch", "mean"])
    assert r.exit_code == 2 and "stitch: 'median' -> 'mean'" in r.output, r.output
    r = runner.invoke(app, pred + ["--stitch", "mean", "--overwrite"])
    assert r.exit_code == 0 and "2 written" in " ".join(r.output.split()), r.output

    ev = ["evaluate", "../shared/data/bbbc021/BBBC021_per_well_feature_selected_mad_robustize.csv", "--nsc", "--moa-col",
          "Metadata_moa", "-o", str(tmp_path / "e")]
    assert runner.invoke(app, ev).exit_code == 0
    r = runner.invoke(app, ev + ["--aggregate", "mean"])
    assert r.exit_code == 2 and "aggregate" in r.output and "--overwrite" in r.output, r.output
    assert runner.invoke(app, ev + ["--aggregate", "mean", "--overwrite"]).exit_code == 0

    sim = ["simulate", "-o", str(tmp_path / "s"), "--plates", "1", "--wells", "4", "--sites", "1", "--size", "64"]
    assert runner.invoke(app, sim).exit_code == 0
    r = runner.invoke(app, sim[:-1] + ["96"])
    assert r.exit_code == 2 and "size: 64 -> 96" in r.output, r.output

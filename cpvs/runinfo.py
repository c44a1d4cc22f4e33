"""Run records (``cpvs-run.json``) and atomic file writes.

Every command that writes a folder records what produced it, so a later rerun can
tell whether it is resuming the same job or being pointed at someone else's.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from cpvs import __version__

RUN_FILE = "cpvs-run.json"
TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    A killed job leaves only a ``.tmp-*`` file behind, never a half-written file
    under the final name. The temporary name carries the writer's host and pid
    (see :func:`temp_owner`), so that the next run can tell a dead job's leftovers
    from a live job's file and remove them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}~{os.getpid()}~"
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{owner}{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any other file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the run that wrote the temporary file ``name``, or None when it is not one of ours."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name[len(TMP_PREFIX):].split("~", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def plain(value: Any) -> Any:
    """A dataclass / dict / list with Paths and tuples as JSON-friendly strings and lists
    (run records and checkpoints hold only plain values)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def fingerprint(paths: list[Path], sample: int = 64) -> str:
    """A cheap fingerprint of input files: the names and sizes of a sample of them.

    Hashing every byte of a plate would cost as much as reading it; this is meant
    to catch a resumed run pointed at different inputs, not tampering. Times are
    left out so that a copied plate keeps its fingerprint.
    """
    h = hashlib.sha256()
    paths = sorted(paths, key=str)
    h.update(str(len(paths)).encode())
    step = max(1, len(paths) // sample)
    for p in paths[::step]:
        # A plane inside an OME-Zarr store is known by its array's metadata file.
        meta = p.metadata_file() if hasattr(p, "metadata_file") else p
        size = meta.stat().st_size if meta.exists() else -1  # a missing file is reported by the reader, with its fix
        h.update(f"{p.name}:{size}".encode())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (a checkpoint's identity: two runs of one file agree, any retraining differs)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def run_record(command: str, params: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "cpvs_version": __version__,
        "command": command,
        "argv": sys.argv,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": params,
        "inputs": inputs or {},
    }


def write_run_record(folder: str | Path, command: str, params: dict[str, Any], inputs: dict[str, Any] | None = None,
                     name: str = RUN_FILE, **extra: Any) -> Path:
    rec = run_record(command, params, inputs)
    rec.update(extra)
    path = Path(folder) / name
    write_json_atomic(path, rec)
    return path

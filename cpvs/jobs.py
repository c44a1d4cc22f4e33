"""Jobs that survive a cluster: interruption, worker pools that never outlive their job,
exclusive outputs and resume identity.

* **Signals.** The CLI turns SIGTERM (what SLURM sends at a time limit) into
  :class:`Interrupted`, a ``KeyboardInterrupt``, so SIGINT and SIGTERM unwind the same
  way: pools cancel their queued work, finished work stays, nothing half-written keeps
  its final name (every output is written under a temporary name and renamed). Long
  loops that must stop at a clean point (training steps) use :func:`graceful_stop`.
* **Pools.** :func:`thread_pool` cancels queued tasks when its block is left by an
  exception; :func:`process_pool` also terminates its workers, which ignore SIGINT (the
  parent decides) and die with the parent even under ``kill -9`` (Linux PDEATHSIG).
* **Locks.** :class:`OutputLock` makes a run the only writer of its output: a second
  run exits at once naming the holder; a lock whose process is gone (same host) or whose
  heartbeat stopped (another host) is taken over. Shards of one job (``--shard I/N``)
  hold different locks and work side by side.
* **Identity.** :func:`claim_identity` records, before any work, the parameters that
  determine a folder's outputs; a rerun with other parameters is refused, naming them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from cpvs.errors import CpvsError
from cpvs.runinfo import temp_owner, write_json_atomic

LOCK_PREFIX = ".cpvs-lock"
IDENTITY_FILE = ".cpvs-identity.json"
HEARTBEAT_S = 20.0
STALE_S = 120.0  # a lock not refreshed for this long belongs to a dead job on another host


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwind, keep finished work, exit 128 + signal number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (call once, from the CLI)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.signal(signal.SIGINT, _raise_interrupted)


@dataclass
class StopFlag:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def graceful_stop(enabled: bool = True) -> Iterator[StopFlag]:
    """Inside the block, the first SIGINT/SIGTERM only sets the flag (the loop stops at its next
    clean point, e.g. after a training step, and may save its state); a second one interrupts
    at once. Disabled (``enabled=False``, e.g. under torchrun) the signals interrupt as usual."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request(signum, frame):
        if flag.signum is not None:
            raise Interrupted(signum)
        flag.signum = signum

    old = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def thread_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose queued tasks are cancelled when the block ends in an exception
    (the running ones finish: a read or a write of one field)."""
    ex = ThreadPoolExecutor(max(1, workers))
    try:
        yield ex
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _set_parent_death_signal() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent, even under kill -9
    except (OSError, AttributeError):  # not Linux: the parent's handlers still terminate workers
        pass


def _worker_init() -> None:
    # A signal to the whole group (Ctrl-C, SLURM's SIGTERM) must not kill workers under the parent: a pool
    # whose workers vanish leaves its parent waiting forever. The parent decides and kills them itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _set_parent_death_signal()


def _worker_init_then(initializer) -> None:
    _worker_init()
    if initializer is not None:
        initializer()


@contextlib.contextmanager
def process_pool(workers: int, initializer=None) -> Iterator[ProcessPoolExecutor]:
    """A process pool that never outlives its block: on any exception (an interruption included)
    queued tasks are cancelled and the workers terminated. ``initializer`` runs in each worker too."""
    ex = ProcessPoolExecutor(max(1, workers), initializer=_worker_init_then, initargs=(initializer,))
    try:
        yield ex
    except BaseException:
        procs = list((getattr(ex, "_processes", None) or {}).values())
        manager = getattr(ex, "_executor_manager_thread", None)  # shutdown() forgets it
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()  # workers ignore SIGTERM (see _worker_init)
        for p in procs:
            p.join(timeout=5)
        # The pool's manager thread closes its wake-up pipe once it sees the workers gone; CPython 3.11's
        # exit hook (concurrent.futures.process._python_exit) writes to that pipe unlocked, and racing the
        # close it prints "Bad file descriptor" with a traceback. Joining the thread here ends the race.
        if manager is not None:
            manager.join(timeout=5)
        raise
    ex.shutdown(wait=True)


# --------------------------------------------------------------------------- locks
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody has reaped yet (a zombie) still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_name(shard: tuple[int, int] | None = None, name: str | None = None) -> str:
    """``.cpvs-lock[-NAME][.shard-I-of-N]``: NAME scopes a lock to one output among several in a folder
    (a plate of a profile folder, one embedding table); the shard part lets a job's shards share it."""
    base = LOCK_PREFIX + (f"-{name}" if name else "")
    if shard is None or tuple(shard) == (1, 1):
        return base
    return f"{base}.shard-{shard[0]}-of-{shard[1]}"


_LOCK = re.compile(r"^\.cpvs-lock(?:-(?P<name>.+?))?(?:\.shard-(?P<i>\d+)-of-(?P<n>\d+))?$")


def _conflicts(mine: str, other: str) -> bool:
    """Locks of other outputs never conflict (an unnamed lock covers the whole folder); shards of
    one job (same N, other I) share an output; anything else may not."""
    a, b = _LOCK.match(mine), _LOCK.match(other)
    if a is None or b is None:
        return False  # not a lock (e.g. a stale lock moved aside)
    if a["name"] and b["name"] and a["name"] != b["name"]:
        return False
    if a["n"] and b["n"] and a["n"] == b["n"]:
        return a["i"] == b["i"]
    return True


def remove_dead_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed runs on this host left under ``folder`` (their
    writer's pid is gone); a live run's files, and those of other hosts, stay. Returns what went."""
    host, gone = socket.gethostname(), []
    for root, dirs, files in os.walk(folder):
        for name in files:
            owner = temp_owner(name)
            if owner and owner[0] == host and owner[1] != os.getpid() and not _pid_alive(owner[1]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    gone.append(Path(root) / name)
    return gone


class OutputLock:
    """Exclusive ownership of ``folder`` for one run (or one shard of a job)."""

    def __init__(self, folder: str | Path, command: str, shard: tuple[int, int] | None = None, name: str | None = None):
        """``name``: a lock of its own for one output file among others in ``folder`` (e.g. an embedding table)."""
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / lock_name(shard, name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _holder(self, path: Path) -> dict | None:
        """The live holder of a lock file, or None when the file is stale or gone."""
        try:
            info = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname():
            return info if _pid_alive(int(info.get("pid", -1))) and info.get("pid") != os.getpid() else None
        return info if age < STALE_S else None

    def _refuse(self, info: dict, path: Path) -> None:
        raise CpvsError(
            f"in use by another cpvs run: {info.get('command', '?')} on host {info.get('host')} pid {info.get('pid')} "
            f"since {info.get('started')}", self.folder,
            f"wait for it to finish, or choose another -o; if that job is gone for good, remove {path}")

    def acquire(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for other in sorted(self.folder.glob(f"{LOCK_PREFIX}*")):
            if other != self.path and _conflicts(self.path.name, other.name) and (info := self._holder(other)):
                self._refuse(info, other)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._holder(self.path)
                if info is not None:
                    self._refuse(info, self.path)
                # Stale: move it aside under a unique name (only one taker wins the rename), retry.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, self.path.with_name(f"{self.path.name}.stale-{os.getpid()}"))
                    self.path.with_name(f"{self.path.name}.stale-{os.getpid()}").unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.info, fh)
            remove_dead_temps(self.folder)
            self._thread = threading.Thread(target=self._beat, name="cpvs-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise CpvsError("could not take the output lock", self.path, "retry; remove the lock file if no job uses it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        # Again at the end: the workers of a run killed just before this one may have been dying at the start.
        with contextlib.suppress(OSError):
            remove_dead_temps(self.folder)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- identity
def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"segment": {"threshold": "li"}} -> {"segment.threshold": "li"}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def claim_identity(folder: str | Path, command: str, identity: dict[str, Any], overwrite: bool = False,
                   name: str | None = None, can_overwrite: bool = True) -> str:
    """Record what determines ``folder``'s outputs (before any work), or check a rerun against
    the record: other parameters are refused naming them, unless ``overwrite`` (the caller
    then removes its old outputs). Returns the identity's digest."""
    folder = Path(folder)
    path = folder / (f".cpvs-identity-{name}.json" if name else IDENTITY_FILE)
    record = {"command": command, "identity": json.loads(json.dumps(identity, default=str))}
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("command") not in (command, None):
            raise CpvsError(f"folder holds the output of `cpvs {old.get('command')}`, not of `cpvs {command}`", folder,
                            "choose another -o folder")
        if old is not None and old.get("identity") != record["identity"]:
            # nested groups (e.g. profile's segment options) are compared key by key, so the message names
            # the parameter that changed, not the whole group
            before, after = _flatten(old.get("identity", {})), _flatten(record["identity"])
            diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            shown = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in diff[:6])
            raise CpvsError(f"the outputs here were made with other parameters ({shown})", folder,
                            "rerun with the same parameters to resume, or choose another output folder"
                            + (", or pass --overwrite to replace them" if can_overwrite else ""))
        return identity_digest(record["identity"])
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return identity_digest(record["identity"])


def clear_outputs(folder: str | Path, names: list[str] | None = None) -> None:
    """Remove a folder's contents (or only ``names`` in it) for ``--overwrite``, keeping the locks."""
    import shutil

    folder = Path(folder)
    if not folder.exists():
        return
    for p in sorted(folder.iterdir()):
        if p.name.startswith(LOCK_PREFIX) or (names is not None and p.name not in names):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def is_empty_output(folder: str | Path) -> bool:
    """True when ``folder`` holds nothing but cpvs locks."""
    return not any(not p.name.startswith(LOCK_PREFIX) for p in Path(folder).iterdir())


_LIBC = None


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``): reader and writer threads allocate
    field-sized buffers in their own arenas, which otherwise grow by fragments over thousands of
    fields. A no-op where glibc is absent."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)

"""Run directories: one run per directory, one writer at a time, and no half-written files.

A command that writes a run directory (``eval``, ``probe``, ``demo``) claims it first, before it
loads any model::

    with claim_run_dir(out, "probe", config_dict, overwrite=False):
        ...  # write results with atomic_write_text / atomic_write_csv

The claim

- refuses a path that is a file, and a directory that holds another run's results (a different
  command or config, recorded in ``boxprobe-run.json``; or result files of an unrecorded run), unless
  ``overwrite``, which deletes that run's result files first;
- lets the same command and config resume in its own directory;
- holds ``.boxprobe.lock`` (naming the holder's PID, host and command) for as long as it runs, so a
  second process is refused; a lock whose process is gone is taken over with a warning.

Claims are re-entrant within a process: a stage that claims a directory its caller already holds
(the demo running a probe experiment into its own run directory) writes under the caller's claim.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from boxprobe.errors import ArgumentError, BoxprobeError

logger = logging.getLogger(__name__)

MARKER = "boxprobe-run.json"
LOCK = ".boxprobe.lock"
# Everything a run writes into its directory; --overwrite deletes these (and nothing else).
RESULT_NAMES = (
    "results.csv", "summary.json", "results.partial.csv", "behaviour.csv", "behaviour", "probe_accuracy.csv",
    "probe_heatmap.csv", "selectivity.csv", "model_difference.csv", "causal_check.csv", "probe_config.json",
    "cache", "attention_heads.csv", "patching_resid.csv", "patching_heads.csv", "cmap.csv", "run.json",
    "dashboard.html", "data",
)
_HELD: dict[Path, int] = {}  # directories this process holds -> claim depth


class RunDirError(BoxprobeError, ValueError):
    """A run directory that holds another run, or that another process is writing."""


def run_signature(command: str, config: dict[str, Any]) -> str:
    """A hash of what determines a run's results: the command and its config (as JSON)."""
    text = json.dumps({"command": command, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _acquire_lock(out: Path, command: str) -> Path:
    lock = out / LOCK
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
                pid, host = int(other["pid"]), str(other.get("host"))
            except (OSError, ValueError, KeyError, TypeError):
                other, pid, host = {}, -1, socket.gethostname()  # unreadable: a writer died mid-write
            if pid != os.getpid() and (host != socket.gethostname() or _pid_alive(pid)):
                raise RunDirError(
                    f"{out} is in use by process {pid} on {host} ({other.get('command', '?')}, since "
                    f"{other.get('started', '?')}); wait for it to finish or pick another directory. If that "
                    f"process is gone, delete {lock}.") from None
            logger.warning("taking over %s: its process %s is gone", lock, pid)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return lock
    raise RunDirError(f"could not take the lock {lock}; delete it if no boxprobe process is writing {out}.")


def _other_run(out: Path, command: str, signature: str) -> str | None:
    """A description of another run whose results ``out`` holds, or None."""
    marker = out / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return f"an unidentifiable run ({marker} is damaged)"
        if isinstance(info, dict) and info.get("signature") == signature:
            return None
        if not any((out / name).exists() for name in RESULT_NAMES):
            return None  # a run that failed before writing anything: nothing of it to protect
        if not isinstance(info, dict):
            return f"an unidentifiable run ({marker} is damaged)"
        return f"a {info.get('command', '?')} run with another config (started {info.get('started', '?')})"
    found = [name for name in RESULT_NAMES if (out / name).exists()]
    return f"results of another run ({', '.join(found[:4])})" if found else None


def _marker_signature(out: Path) -> str | None:
    try:
        return json.loads((out / MARKER).read_text()).get("signature")
    except (OSError, ValueError, AttributeError):
        return None


def _delete_results(out: Path) -> None:
    for name in (*RESULT_NAMES, MARKER):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def claim_run_dir(out: str | Path, command: str, config: dict[str, Any], overwrite: bool = False) -> Iterator[Path]:
    """Claim ``out`` for one run of ``command`` with ``config`` (see the module docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out} is a file; give a directory for the run's results.")
    key = out.resolve()
    if key in _HELD:  # this process already holds it: a stage writing into its caller's run
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    signature = run_signature(command, config)
    out.mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(out, command)
    _HELD[key] = 1
    try:
        if (other := _other_run(out, command, signature)) is not None:
            if not overwrite:
                raise RunDirError(f"{out} holds {other}; pick another directory, or pass --overwrite "
                                  "(overwrite=True) to replace that run as a whole.")
            logger.warning("replacing %s in %s (--overwrite)", other, out)
            _delete_results(out)
        if _marker_signature(out) != signature:
            atomic_write_text(out / MARKER, json.dumps(
                {"command": command, "signature": signature, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "config": config}, indent=1, default=str) + "\n")
        yield out
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)


def atomic_write_bytes(files: dict[str | Path, bytes]) -> None:
    """Write several files so that a failure (a full disk) leaves each old file or the new one, never half
    of one: every temporary file is written first, then each is renamed over its target."""
    tmps = []
    try:
        for path, data in files.items():
            tmp = Path(f"{path}.tmp-{os.getpid()}")
            tmps.append((tmp, Path(path)))
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in tmps:
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then a rename)."""
    atomic_write_bytes({path: text.encode("utf-8")})


def atomic_write_csv(frame, path: str | Path) -> None:
    """Write a pandas frame as CSV (no index) to ``path`` atomically."""
    atomic_write_text(path, frame.to_csv(index=False))

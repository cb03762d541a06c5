"""One process per run folder: a second `fit` on a run that a live process trains is refused at
start, so two writers never interleave its checkpoints, replay files and MLflow points.

The lock is an advisory `flock` on `<run folder>/run.lock`, which the kernel drops when its holder
ends however it ends (kill -9 included), so a lock is never left stale. The file says who holds it
(pid, host, start time, command) for the refusal's message; a holder that ended without releasing
it (killed) leaves that text behind, which the next holder reports once and replaces. The file is
never deleted: a delete races with a process that opened it to wait.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLockedError(FileExistsError):
    """The run folder is held by another live process."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} (since {info['started']}: {info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _refusal(run_dir: Path, text: str) -> RunLockedError:
    return RunLockedError(
        f"run folder {run_dir} is in use by {_holder(text)}: two processes on one run would interleave its "
        "checkpoints, replay files and MLflow points. Wait for it to end or stop it (a stopped run resumes with "
        "--ckpt_path last), or start another run with --run.name; nothing was changed")


def check_free(run_dir: Path) -> None:
    """Refuse, changing nothing, when a live process holds `run_dir` (no lock file: free)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(run_dir, path.read_text(errors="replace")) from None
    finally:
        os.close(fd)  # closing drops a lock taken here


class RunLock:
    """The lock of one run folder, held from `acquire` until `release` or the process's end."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunLockedError; returns who held it last without releasing it
        (a killed process), or None."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(self.run_dir, self.path.read_text(errors="replace")) from None
        left = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["python", *sys.argv])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return _holder(left) if left else None

    def release(self) -> None:
        """Empty the file (a clean end leaves nothing to report) and drop the lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

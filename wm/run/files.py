"""Crash-safe file writes: a file is either absent, its old version, or complete, never partial.

Every file a run depends on (checkpoints, replay chunks, manifests) is written to a temporary
sibling, flushed to disk, renamed over its final name and made durable by syncing the folder, so
a kill at any moment leaves nothing half-written under a real name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_MARK = ".tmp-"  # temporary siblings are ".<name>.tmp-<pid>"; leftovers of a kill are safe to delete


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or an unlink in `path` durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], final: Callable[[], Path] | None = None
) -> Path:
    """Write a file through `write(f)` into a temporary sibling, fsync it and rename it to `path`
    (or to `final(...)`, see below); returns the final path.

    `final`, if given, is called after writing with no arguments and names the file then, for
    names that depend on the content (a checksum).
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        target = final() if final is not None else path
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A copy of `source` at `target`, written atomically (a copy, not a second name: writing one
    of the two in place cannot change the other)."""
    with open(source, "rb") as f:
        atomic_write(target, lambda out: shutil.copyfileobj(f, out, 16 * 2**20))


def remove_temporaries(directory: Path) -> None:
    """Delete the temporary files that killed writers left behind in `directory`."""
    for path in directory.glob(f".*{TEMPORARY_MARK}*"):
        path.unlink(missing_ok=True)

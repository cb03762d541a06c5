"""The named phases of an update (encode, observe, objective, imagine, backward, optimizer), timed
while a benchmark records them (`python -m wm.bench`) and free otherwise, inside a compiled graph too."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

_recorder: dict[str, float] | None = None


def phase(name: str):
    """Adds the wall time of the block to `name` while recording; costs nothing otherwise, and
    nothing inside a compiled graph (which runs as one piece)."""
    # is_compiling first: traced, it is a constant and `_recorder` is never read, so no compiled
    # graph guards on it (a graph that did recompiled when a benchmark started recording).
    if torch.compiler.is_compiling() or _recorder is None:
        return nullcontext()
    return _timed(_recorder, name)


@contextmanager
def _timed(recorder: dict[str, float], name: str):
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        recorder[name] += time.perf_counter() - start


def start_recording() -> dict[str, float]:
    """Begin collecting {phase: seconds}; the returned dict fills until `stop_recording`."""
    global _recorder
    _recorder = defaultdict(float)
    return _recorder


def stop_recording() -> None:
    global _recorder
    _recorder = None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()

"""Named phases of a training update, timed only while a benchmark records them."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

_recorder: dict[str, float] | None = None


@contextmanager
def phase(name: str):
    """Adds the wall time of the block to `name` while recording; costs nothing otherwise."""
    if _recorder is None:
        yield
        return
    recorder = _recorder
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

"""Measuring an update: named phases timed while a benchmark records them, the ops and host syncs
torch.profiler sees in one training batch, and where torch.compile keeps its cache."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
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


@dataclass(frozen=True)
class ProcessUsage:
    """This process's wall clock, CPU seconds (all threads) and minor page faults; the difference
    of two readings is what happened between them."""

    wall: float
    user: float
    system: float
    page_faults: int

    @classmethod
    def now(cls) -> "ProcessUsage":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt)

    def __sub__(self, other: "ProcessUsage") -> "ProcessUsage":
        return ProcessUsage(self.wall - other.wall, self.user - other.user, self.system - other.system,
                            self.page_faults - other.page_faults)


def describe_usage(usages: list[ProcessUsage]) -> str:
    """Medians over updates: the page faults (fresh memory from the kernel) and CPU time of one."""
    def median(name: str) -> float:
        return statistics.median(getattr(u, name) for u in usages)

    cpu = median("user") + median("system")
    return (f"per update (median): {median('page_faults'):,.0f} page faults, CPU {median('user'):.2f} s user + "
            f"{median('system'):.2f} s system ({cpu / median('wall'):.2f} cores busy)")


COMPILE_CACHE = Path.home() / ".cache" / "wm" / "torch_compile"


def set_compile_cache() -> None:
    """Keep torch.compile's caches (inductor's kernels, AOTAutograd's graphs) in a folder that
    outlives a reboot, COMPILE_CACHE, instead of inductor's default under /tmp; a folder the user
    chose with TORCHINDUCTOR_CACHE_DIR is kept. A warm cache saves most of the compile time."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):  # inductor writes its default in
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)


# Ops that read a tensor's value back to the host, or whose output shape depends on values:
# each makes the host wait for the device (a GPU idles), and CUDA graphs cannot capture them.
HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), bool(t), .tolist(), float(t)
    "aten::is_nonzero",
    "aten::nonzero",  # boolean-mask indexing, torch.where(cond)
    "aten::masked_select",
    "aten::equal",
    "aten::allclose",
    "aten::unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
})


@dataclass
class OpCounts:
    """What torch.profiler saw in one piece of work."""

    syncs: dict[str, int]  # host-sync op -> calls
    aten_ops: int  # top-level aten ops (what Python dispatched)
    leaf_ops: int  # aten ops that call no other aten op (kernel-like)


def count_ops(events) -> OpCounts:
    """Host syncs and aten ops among a profiler's `events()`."""
    syncs: dict[str, int] = defaultdict(int)
    aten_ops = leaf_ops = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        if event.name in HOST_SYNC_OPS:
            syncs[event.name] += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        aten_ops += parent is None
        leaf_ops += not any(child.name.startswith("aten::") for child in event.cpu_children)
    return OpCounts(dict(syncs), aten_ops, leaf_ops)


class ProfileBatch(L.Callback):
    """Profiles training batch `batch_idx` (CPU ops) and keeps its `OpCounts` in `counts`."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx
        self.counts: OpCounts | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.profiler.__exit__(None, None, None)
            self.counts = count_ops(self.profiler.events())

"""What the benchmarks measure besides the update's phases (wm.model.phases): a process's CPU
time and page faults, and the ops and host syncs torch.profiler sees in one training batch."""

from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import lightning as L
import torch

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

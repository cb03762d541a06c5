"""How a run uses this machine's CPU: the memory an update frees stays in the process, and torch
uses a thread count that other work on the machine cannot stall.

Memory: glibc's malloc gives a large block (above a threshold that adapts up to 32 MiB) back to
the kernel when it is freed, and trims the heap's free top. A CPU update allocates and frees its
activations every step, so the next update faults the same memory in again as fresh pages the
kernel must zero: about 600,000 page faults (2.3 GB zeroed) per size12M update here, 0.3 s of an
isolated update and more inside a fit, whose larger process pays more per fault (README, "Speed").
`retain_freed_memory` turns both off, so freed blocks are reused, as a GPU's caching allocator
does; the process keeps its peak heap instead of returning it (the figure `wm.bench` prints as
peak RSS). `python -m wm`, `wm.bench` and `wm.probe` call it at their start;
`WM_RETAIN_FREED_MEMORY=0` leaves glibc's behaviour (to compare, or where memory matters more).

Threads (`--run.threads`, README "Speed"): on a machine shared with other work, every parallel
step of an update waits for its slowest thread, and a thread that shares its core waits for the
other process's time slice: with all cores in use the update can run 10-30 times slower. wm uses
half the cores by default (at least one), the user's OMP_NUM_THREADS where it is set, or
`--run.threads`; child processes (env workers) get one thread each.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1  # -1 as its value: never trim the heap
M_MMAP_MAX = -4  # 0 as its value: no block is served by its own mmap


def retain_freed_memory() -> bool:
    """Whether freed memory now stays in the process: False where malloc is not glibc's (nothing
    changes there) or WM_RETAIN_FREED_MEMORY=0."""
    if os.environ.get("WM_RETAIN_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differs or does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def freed_memory_label(retained: bool) -> str:
    """What a benchmark says about freed memory, the result of `retain_freed_memory`."""
    return "kept in the process" if retained else "returned to the kernel (malloc's default)"


WM_SET_THREADS = "WM_OMP_NUM_THREADS_SET"  # marks an OMP_NUM_THREADS that wm set for child processes, not the user


def users_threads() -> int | None:
    """OMP_NUM_THREADS as the user set it (not as wm set it for an earlier run in this process)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and not os.environ.get(WM_SET_THREADS) else None


def choose_threads(configured: int) -> tuple[int, str]:
    """torch's CPU threads for this process, and why (see `RunConfig.threads`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if configured > 0:
        return configured, f"--run.threads, of {cores} cores"
    if users_threads() is not None:
        return max(1, users_threads()), f"OMP_NUM_THREADS, of {cores} cores"
    return max(1, cores // 2), f"half of {cores} cores, so that other work does not stall the update; --run.threads sets it"


def apply_threads(configured: int) -> None:
    """Set and say torch's thread count; child processes (env workers) get one thread each,
    unless the user's OMP_NUM_THREADS says otherwise."""
    threads, why = choose_threads(configured)
    torch.set_num_threads(threads)
    if users_threads() is None:
        os.environ.update({"OMP_NUM_THREADS": "1", WM_SET_THREADS: "1"})
    if rank_zero_only.rank == 0:
        print(f"torch threads: {threads} ({why})", flush=True)

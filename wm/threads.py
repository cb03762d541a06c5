"""How many CPU threads torch uses for an update (`--run.threads`, README "Speed").

On a machine shared with other work, every parallel step of an update waits for its slowest
thread, and a thread that shares its core waits for the other process's time slice: with all
cores in use the update can run 10-30 times slower. wm uses half the cores by default (at least
one), the user's OMP_NUM_THREADS where it is set, or `--run.threads`; child processes (env
workers) get one thread each.
"""

from __future__ import annotations

import os

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

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

"""Keep the memory a CPU update frees inside the process, as a GPU's caching allocator does.

glibc's malloc gives a large block (above a threshold that adapts up to 32 MiB) back to the
kernel when it is freed, and trims the heap's free top. A CPU update allocates and frees its
activations every step, so the next update faults the same memory in again as fresh pages the
kernel must zero: about 600,000 page faults (2.3 GB zeroed) per size12M update here, 0.3 s of an
isolated update and more inside a fit, whose larger process pays more per fault (README, "Speed").
`retain_freed_memory` turns both off, so freed blocks are reused; the process keeps its peak
heap instead of returning it (the figure `wm.bench` prints as peak RSS).

`python -m wm`, `wm.bench` and `wm.probe` call it at their start. `WM_RETAIN_FREED_MEMORY=0`
leaves glibc's behaviour (to compare, or where memory matters more than time).
"""

from __future__ import annotations

import ctypes
import os
import sys

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

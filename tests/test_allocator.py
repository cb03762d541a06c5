"""wm.run.machine: memory a CPU update frees is reused, not faulted in again from the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A fresh process mallocs, fills and frees 256 MiB twice (an update's activations, then the next
# update's) and reports the page faults of the second round and whether it got the same block.
SECOND_ROUND_FAULTS = """
import ctypes, json, resource
from wm.run.machine import retain_freed_memory
retained = retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def fill_and_free():
    block = libc.malloc(256 * 2**20)
    ctypes.memset(block, 1, 256 * 2**20)
    libc.free(block)
    return block
first = fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = fill_and_free()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": faults, "same_block": first == second}))
"""

PAGES = 256 * 2**20 // 4096  # 65,536 pages of 4 KiB in 256 MiB


def second_round(retain: str) -> dict:
    env = {**os.environ, "WM_RETAIN_FREED_MEMORY": retain}
    out = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what wm.run.machine tunes")
def test_freed_memory_is_reused_without_page_faults_and_the_switch_turns_it_off():
    kept = second_round("1")
    assert kept["retained"] is True
    assert kept["same_block"] and kept["faults"] < PAGES // 100, kept  # the freed 256 MiB was reused
    default = second_round("0")
    assert default["retained"] is False
    assert default["faults"] > PAGES // 2, default  # malloc's default: fresh zeroed pages each time

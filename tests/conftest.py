"""The test session has the machine to itself: the real fits it starts use every core (a run's
default is half of them, README "Speed"), unless OMP_NUM_THREADS is set already."""

import os

os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

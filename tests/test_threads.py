"""How many CPU threads a run uses: half the cores by default, the user's OMP_NUM_THREADS or
--run.threads where given, said at the start, and one for each child process (env workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_training import TINY
from wm.run.machine import WM_SET_THREADS, apply_threads, choose_threads

REPO = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))


def test_half_the_cores_unless_the_user_says_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(WM_SET_THREADS, raising=False)
    before = torch.get_num_threads()
    try:
        assert choose_threads(0)[0] == max(1, CORES // 2)
        assert choose_threads(3) == (3, f"--run.threads, of {CORES} cores")
        apply_threads(0)
        assert torch.get_num_threads() == max(1, CORES // 2)
        assert capsys.readouterr().out.startswith(f"torch threads: {max(1, CORES // 2)} (half of {CORES} cores")
        assert os.environ["OMP_NUM_THREADS"] == "1", "child processes (env workers) get one thread each"
        assert choose_threads(0)[0] == max(1, CORES // 2), "wm's own OMP_NUM_THREADS is not taken for the user's"
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        monkeypatch.delenv(WM_SET_THREADS)
        assert choose_threads(0) == (5, f"OMP_NUM_THREADS, of {CORES} cores")
        apply_threads(0)
        assert os.environ["OMP_NUM_THREADS"] == "5", "the user's setting is left alone"
    finally:
        torch.set_num_threads(before)


def test_a_fit_says_its_threads_at_the_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", WM_SET_THREADS)}
    done = subprocess.run([sys.executable, "-m", "wm", "fit", *TINY, "--run.root", str(tmp_path), "--env.total_steps", "18",
                           "--run.threads", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"torch threads: 1 (--run.threads, of {CORES} cores)" in done.stdout.splitlines()

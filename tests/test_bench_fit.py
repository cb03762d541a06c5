"""`python -m wm.bench fit`: the real fit of a config, stopped after a few seconds of training,
reports env frames/s, updates/s and shares of wall time that add up, in a temporary run root."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import wm.model.phases
from wm.bench.fit import main as bench_fit

REPO = Path(__file__).resolve().parents[1]
NAMES = ("env stepping", "acting", "updates", "replay", "evaluation", "logging", "checkpointing", "other")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_fit_benchmark_reports_shares_that_add_up(tmp_path, monkeypatch, capsys, restore_threads):
    monkeypatch.chdir(tmp_path)  # a run root left in the working directory would show here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bench_fit([
        "--config", str(REPO / "configs/quickstart.yaml"), "--seconds", "3", "--threads", "1",
        # overrides pass through to the fit: a small batch, a short prefill, a periodic checkpoint
        # and an evaluation within the few seconds measured
        "--data.batch_size", "4", "--data.sequence_length", "8", "--env.prefill", "64",
        "--run.checkpoint_every", "16", "--env.eval_every", "80", "--env.eval_episodes", "1",
    ])
    out = capsys.readouterr().out
    assert re.search(r"^fit benchmark: toy-catch  size1M  1 envs  B=4 T=8 .* replay on cpu", out, re.M), out
    assert re.search(r"^env start: [\d.]+ s for 1 env \(in this process\)$", out, re.M), out
    measured = re.search(r"^measured: ([\d.]+) s, (\d+) env frames, (\d+) updates$", out, re.M)
    seconds, frames, updates = float(measured[1]), int(measured[2]), int(measured[3])
    assert seconds >= 3 and frames > 0 and updates > 0
    assert float(re.search(r"^env frames/s: ([\d.]+)$", out, re.M)[1]) == pytest.approx(frames / seconds, rel=0.02)
    assert float(re.search(r"^updates/s: ([\d.]+)$", out, re.M)[1]) == pytest.approx(updates / seconds, rel=0.02)
    per_update = re.search(r"^seconds per update: median ([\d.]+) \(min ([\d.]+), max ([\d.]+);", out, re.M)
    median, low, high = (float(per_update[i]) for i in (1, 2, 3))
    update_share = float(re.search(r"^  updates +[\d.]+%  +([\d.]+) s", out, re.M)[1])
    assert 0 < low <= median <= high and low * updates <= update_share + 0.01 <= high * updates + 0.02
    assert re.search(r"^per update \(median\): [\d,]+ page faults, CPU [\d.]+ s user \+ [\d.]+ s system", out, re.M), out
    if sys.platform.startswith("linux"):  # glibc: the fit keeps freed memory, as `python -m wm fit` does
        assert re.search(r"threads 1  freed memory kept in the process$", out, re.M), out
    share = {name: float(re.search(rf"^  {name} +([\d.]+)%", out, re.M)[1]) for name in NAMES}
    assert sum(share.values()) == pytest.approx(100.0, abs=0.6), share
    assert float(re.search(r"^  total +([\d.]+)%", out, re.M)[1]) == pytest.approx(100.0, abs=0.05)
    for name in ("env stepping", "acting", "updates", "checkpointing", "evaluation"):
        assert share[name] > 0, (name, out)
    assert re.search(r"^update phases \(share of update time\): encode", out, re.M)
    assert wm.model.phases._recorder is None, "recording is off again"
    assert "MLFLOW_TRACKING_URI" not in os.environ, "the temporary store does not leak into later runs of the process"
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"], \
        "the run lived in a temporary root, removed afterwards"

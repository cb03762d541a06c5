"""`python -m wm.bench update`: one rule with `fit` for the precision it measures."""

from __future__ import annotations

import re

import torch

import wm.run.validation
from wm.bench.update import main as bench_update


def test_bf16_on_a_cpu_without_native_bfloat16_is_measured_in_float32_and_said(monkeypatch, capsys):
    """Whatever this machine has: without native bfloat16 a benchmark of bf16-mixed runs, and
    reports, 32-true, as a fit would (emulated bfloat16 is slower than float32)."""
    monkeypatch.setattr(wm.run.validation, "native_bf16", lambda device: False)
    monkeypatch.setattr(wm.run.validation, "has_bf16_instructions", lambda: False)  # the message for this case
    threads = torch.get_num_threads()
    try:
        bench_update(["update", "--size", "size1M", "--batch", "2", "--length", "4", "--updates", "1", "--warmup", "1",
                    "--precision", "bf16", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "precision=bf16-mixed: this device has no native bfloat16" in out and "running in 32-true instead" in out
    assert re.search(r"^objective barlow  size size1M  B=2 T=4  precision 32-true  device cpu", out, re.M), out
    assert "float32 matmul peak" in out
    assert re.search(r"^per update \(median\): [\d,]+ page faults, CPU [\d.]+ s user \+ [\d.]+ s system "
                     r"\([\d.]+ cores busy\)$", out, re.M), out


def test_the_world_model_update_of_the_probe_studies_is_measured_alone(capsys):
    """`--world-model-only`: the update of `wm.probe train`, the world model's loss alone: no
    actor or critic among its parameters and no imagination in its phases."""
    threads = torch.get_num_threads()
    try:
        bench_update(["update", "--world-model-only", "--size", "size1M", "--batch", "2", "--length", "4", "--updates", "1",
                      "--warmup", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"^world-model update \(wm.probe train\)  objective barlow  size size1M  B=2 T=4", out, re.M), out
    table = {line.split()[0] for line in out.splitlines() if re.fullmatch(r"\w+\s+[\d.]+M", line.strip())}
    assert table == {"encoder", "rssm", "reward", "continue", "projector", "total"}, table
    assert re.search(r"^  imagine\s+0\.000 s", out, re.M) and re.search(r"^  observe\s+0\.0*[1-9]", out, re.M), out

"""The hardware check (`python -m wm.bench check`): real measurement processes at tiny sizes on the
CPU, the JSON and markdown it writes, and how it records what failed, timed out or did not fit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wm.bench.check import Plan, Runner, update_rows

REPO = Path(__file__).resolve().parents[1]


def run_check(out: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "wm.bench", "check", "--tiny", "--device", "cpu", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# wm hardware check" in done.stdout, "the page is printed at the end"
    return json.loads((out / "check.json").read_text())


def test_the_check_measures_updates_in_their_own_processes_and_writes_json_and_markdown(tmp_path):
    report = run_check(tmp_path, "--sections", "update", "--objectives", "barlow", "--modes", "eager")
    device = report["device"]
    assert device["device"] == "cpu" and device["bf16_tflops"] > 0 and device["fp32_tflops"] > 0
    (row,) = report["update"]
    assert (row["objective"], row["mode"], row["status"]) == ("barlow", "eager", "ok")
    result = row["result"]
    assert result["host_syncs"] == 0 and result["median"] > 0 and len(result["seconds"]) == 2
    assert (result["size"], result["batch"], result["length"]) == ("size1M", 2, 8)
    page = (tmp_path / "check.md").read_text()
    assert "| barlow | eager | ok |" in page and f"{result['median']:.3f}" in page
    assert "===== update barlow eager" in (tmp_path / "check.log").read_text(), "each process's output is kept"


def test_the_rows_come_in_the_order_a_user_needs_them():
    plan = Plan("cuda")
    first, rest = update_rows(plan, True), update_rows(plan, False)
    assert first == [(o, "eager") for o in plan.objectives] + [("barlow", "regions"), ("barlow", "regions-warm")]
    assert rest[:2] == [("barlow", "update"), ("barlow", "update-warm")]
    assert set(rest[2:]) == {(o, m) for o in ("reconstruction", "mudreamer", "dreamerpro") for m in ("regions", "update")}


def test_a_failed_a_timed_out_and_a_skipped_measurement_are_recorded_and_the_check_goes_on(tmp_path):
    runner = Runner(tmp_path, time.monotonic() + 30, env=None)
    failed = runner.run("fails", ["-c", "import sys; print('working'); sys.exit('ValueError: the last line says why')"], 20)
    assert failed.status == "failed" and "the last line says why" in failed.why
    oom = runner.run("oom", ["-c", "raise MemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')"], 20)
    assert oom.status == "out of memory"
    slow = runner.run("slow", ["-c", "import time; time.sleep(60)"], 2, least=1)
    assert slow.status == "timed out" and slow.seconds < 10
    path = tmp_path / "x.json"
    ok = runner.run("ok", ["-c", f"import json; json.dump({{'a': 1}}, open({str(path)!r}, 'w'))"], 20, path)
    assert ok.status == "ok" and ok.result == {"a": 1}
    runner.deadline = time.monotonic() + 5
    skipped = runner.run("late", ["-c", "pass"], 20)
    assert skipped.status == "skipped" and "budget" in skipped.why
    log = (tmp_path / "check.log").read_text()
    assert "===== fails" in log and "working" in log


@pytest.mark.slow  # about 5 minutes on 2 cores: every section at tiny sizes
def test_the_whole_check_at_tiny_sizes_on_the_cpu(tmp_path):
    report = run_check(tmp_path, "--modes", "eager", "regions", "--budget", "1200")
    rows = {(r["objective"], r["mode"]): r for r in report["update"]}
    assert {o for o, _ in rows} == {"barlow", "reconstruction", "mudreamer", "dreamerpro"}
    assert all(r["status"] == "ok" and r["result"]["host_syncs"] == 0 for r in rows.values()), rows
    cold, warm = rows["barlow", "regions"]["result"], rows["barlow", "regions-warm"]["result"]
    assert cold["graph_breaks"] == 0 and warm["compile_seconds"] < cold["compile_seconds"], "the warm compile reads the cache"
    fit = report["fit"]
    assert fit["fit"]["status"] == "ok" and fit["fit"]["result"]["updates_per_second"] > 0
    assert fit["alone"]["status"] == "ok"
    resume = fit["resume"]
    assert resume["status"] == "ok" and resume["after"]["global_step"] > resume["before"]["global_step"]
    assert resume["after"]["run"] == resume["before"]["run"] is not None, "the resume continues the same MLflow run"
    assert [r["status"] for r in report["largest"]] == ["ok", "ok"]
    dmc = report["dmc"]
    assert dmc["status"] == "ok" and dmc["result"]["frames_per_second"] > 0 and dmc["result"]["num_envs"] == 2
    page = (tmp_path / "check.md").read_text()
    for heading in ("## Updates", "## A real fit and its resume", "## Largest size", "## configs/dmc.yaml"):
        assert heading in page

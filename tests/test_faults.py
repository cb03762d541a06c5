"""Faults beyond a kill, with real processes and real files: two processes on one run, a save out
of space, damaged checkpoints and replay files, and a tracking store another process holds. After
each, the run resumes to its end, and its MLflow run has no gap and no metric point twice."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.test_crash_safety import STARTED, counters, no_process_left_behind, start, wait, wait_for  # noqa: F401
from tests.test_training import TINY, client_for
from wm.run.lock import LOCK_FILE, RunLock, RunLockedError, check_free

REPO = Path(__file__).resolve().parents[1]


def run_wm(root: Path, *args: str, preexec=None, module: str = "wm") -> subprocess.CompletedProcess:
    """`python -m <module> <args>` to its end, its output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=preexec)


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", *TINY, "--run.root", str(root), *extra]


def assert_one_history(run_dir: Path, until: int) -> None:
    """One FINISHED MLflow run whose training points reach `until` frames, each step once, in order,
    with no stretch of frames left out (points come every log interval, a few frames apart)."""
    client, run = client_for(run_dir)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/updates")]
    assert len(steps) == len(set(steps)) and steps == sorted(steps), steps
    assert steps[-1] >= until - 2 and max(b - a for a, b in zip(steps, steps[1:])) <= 4, steps


# ------------------------------------------------------------------------ two processes, one run
def test_the_run_lock_refuses_a_second_holder_and_says_who_holds_it(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on host .*nothing was changed"):
        RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunLockedError):
        check_free(tmp_path / "run")
    first.release()
    check_free(tmp_path / "run")
    second = RunLock(tmp_path / "run")
    assert second.acquire() is None, "a released lock leaves nothing to report"
    second.release()
    check_free(tmp_path / "elsewhere")  # no lock file: free, and nothing is made
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow  # real fits, about 1 min
def test_a_second_fit_on_a_live_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "tiny"
    live = start(tmp_path, "--env.total_steps", "400")
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), live, tmp_path)
    second = run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "400", "--ckpt_path", "last"))
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert f"is in use by pid {live.pid} on host" in line and "nothing was changed" in line
    client, run = client_for(run_dir)
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the refused command made no MLflow run"
    assert live.poll() is None, "the live fit goes on"
    # A holder killed outright leaves its name in the lock file, but not the lock: the next fit takes it over.
    live.send_signal(signal.SIGKILL)
    live.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == live.pid
    resumed = start(tmp_path, "--env.total_steps", "120", "--ckpt_path", "last")
    assert wait(resumed, tmp_path) == 0
    log = (tmp_path / "fit.log").read_text()
    assert f"the last process on this run, pid {live.pid}" in log and "ended without releasing it" in log
    assert (run_dir / LOCK_FILE).read_text() == "", "a clean end releases the run"
    assert_one_history(run_dir, 120)


# ------------------------------------------------------------------------------- out of space
def limit_file_size(megabytes: float):
    """A file-size limit for a child process: a write past it fails with EFBIG, as on a full disk."""
    def preexec():
        limit = int(megabytes * 2**20)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow  # three real fits, about 1 min
def test_a_save_out_of_space_keeps_the_last_checkpoint_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "tiny"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "40")).returncode == 0
    frames, updates = counters(last)
    manifests = sorted((run_dir / "checkpoints/replay/rank0/manifests").iterdir())
    # Resumed under a 2 MiB file-size limit: every checkpoint is larger (a replay chunk of a few
    # frames fits, and its manifest must not outlive the failed save).
    limited = run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "80", "--ckpt_path", "last"),
                     preexec=limit_file_size(2))
    assert limited.returncode == 1, limited.stderr[-3000:]
    said = [line for line in limited.stderr.splitlines() if "UserWarning:" in line and "was not saved" in line]
    assert said and all(f"last.ckpt still resumes the run at {frames:,} frames" in line for line in said), said
    assert "File too large" in said[0] and "training goes on" in said[0]
    assert limited.stderr.strip().splitlines()[-1].startswith("error: the run's last state was not saved")
    assert counters(last) == (frames, updates), "the last good checkpoint is untouched"
    assert sorted((run_dir / "checkpoints/replay/rank0/manifests").iterdir()) == manifests
    assert not [p for p in run_dir.rglob(".*tmp-*")], "no temporary file is left behind"
    client, run = client_for(run_dir)
    assert run.info.status == "KILLED", "a run whose end is not saved is not finished"
    # With space again, the run resumes from the last good checkpoint and ends.
    assert run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "80", "--ckpt_path", "last")).returncode == 0
    assert counters(last)[0] >= 80
    assert_one_history(run_dir, 80)


# ------------------------------------------------------------------------------ damaged files
@pytest.mark.slow  # real fits, about 1 min
def test_last_falls_back_to_the_newest_checkpoint_that_loads_with_its_replay(tmp_path):
    run_dir = tmp_path / "tiny"
    checkpoints = run_dir / "checkpoints"
    assert run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "62")).returncode == 0
    last = checkpoints / "last.ckpt"
    assert counters(last)[0] == 62 and counters(checkpoints / "envstep=60.ckpt")[0] == 60
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # cut short by a quota or a copy
    # envstep=60's replay loses a chunk file: it cannot resume either, and envstep=40 is the newest that can.
    manifest = torch.load(checkpoints / "envstep=60.ckpt", map_location="cpu", weights_only=True)["replay"]["manifest"]
    listed = json.loads((checkpoints / "replay/rank0/manifests" / manifest).read_text())["chunks"]
    older = torch.load(checkpoints / "envstep=40.ckpt", map_location="cpu", weights_only=True)["replay"]["manifest"]
    needed = {c["file"] for c in json.loads((checkpoints / "replay/rank0/manifests" / older).read_text())["chunks"]}
    (checkpoints / "replay/rank0/chunks" / next(c["file"] for c in listed if c["file"] not in needed)).unlink()
    resumed = run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "90", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if "UserWarning: --ckpt_path last:" in line]
    assert len(said) == 1 and "resuming from envstep=40.ckpt instead" in said[0], said
    assert "last.ckpt" in said[0] and "corrupted or unreadable" in said[0]
    assert counters(last)[0] >= 90
    assert_one_history(run_dir, 90)
    # Every checkpoint damaged: refused in one line, nothing changed.
    for path in checkpoints.glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:100])
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    refused = run_wm(tmp_path, *fit_args(tmp_path, "--env.total_steps", "120", "--ckpt_path", "last"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --ckpt_path last: no checkpoint in")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_test_and_probe_eval_answer_a_damaged_checkpoint_in_one_line(tmp_path):
    truncated = tmp_path / "damaged.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    for module, args in (("wm", ["test", "--ckpt_path", str(truncated)]),
                         ("wm.probe", ["eval", "--ckpt", str(truncated), "--data", str(tmp_path)])):
        done = run_wm(tmp_path, *args, module=module)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: checkpoint") and "corrupted or unreadable" in last, last


# ------------------------------------------------------------------------ a store another holds
HOLD = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
connection.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""


@pytest.mark.slow  # a real fit while another process holds its sqlite store for 30 s (MLflow waits 20 s), about 1 min
def test_a_store_held_by_another_process_does_not_stop_the_run(tmp_path):
    run_dir = tmp_path / "tiny"
    fit = start(tmp_path, "--env.total_steps", "400")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def logging_started() -> bool:
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train/updates"))
        except Exception:  # noqa: BLE001 - the store is being made
            return False

    wait_for(logging_started, fit, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "mlflow.db"), "30"], stdout=subprocess.PIPE,
                              text=True)
    STARTED.append(holder)
    assert holder.stdout.readline().strip() == "held"
    assert holder.wait(timeout=60) == 0
    assert wait(fit, tmp_path, timeout=900) == 0
    log = (tmp_path / "fit.log").read_text()
    assert log.count("UserWarning: the MLflow store did not take metrics") == 1, "an outage is said once"
    assert "Traceback" not in log, "and in one line"
    assert "the MLflow store answers again" in log
    assert_one_history(run_dir, 400)

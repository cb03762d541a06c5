"""Crash safety with real processes and real signals: SIGKILL at random moments and while
checkpoints or replay files are being written, SIGTERM and Ctrl-C, and a killed env worker."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.test_training import TINY, client_for, saved_buffer

REPO = Path(__file__).resolve().parents[1]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    while STARTED:
        STARTED.pop().kill()


def start(root: Path, *extra: str) -> subprocess.Popen:
    """`python -m wm fit` on the tiny quickstart config, as its own process."""
    log = open(root / "fit.log", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "wm", "fit", *TINY, "--run.root", str(root), *extra],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    STARTED.append(process)
    return process


def wait(process: subprocess.Popen, root: Path, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the fit did not end in time:\n" + (root / "fit.log").read_text()[-3000:]) from None


def counters(checkpoint: Path) -> tuple[int, int]:
    """(env frames, updates) of a checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    env_loop = next(v for k, v in state["callbacks"].items() if k.startswith("EnvLoop"))
    return env_loop["env_steps"], state["global_step"]


def wait_for(condition, process: subprocess.Popen, root: Path, timeout: float = 120, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError("the fit ended early:\n" + (root / "fit.log").read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def writing(checkpoints: Path, pid: int) -> bool:
    """Whether process `pid` is writing a checkpoint, replay chunk or manifest (its temporary file
    exists; those of writers killed earlier are left out)."""
    return checkpoints.exists() and any(p.name.endswith(f".tmp-{pid}") for p in checkpoints.rglob(".*"))


def logged_frames(run_dir: Path) -> int:
    """The furthest env frame count the run logged to MLflow (0 before any)."""
    if not (run_dir.parent / "mlflow.db").exists():
        return 0
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return max((m.step for r in runs for m in client.get_metric_history(r.info.run_id, "train/updates")), default=0)


def soak(tmp_path: Path, kills: int, total_steps: int, seed: int) -> None:
    """SIGKILL a fit `kills` times, resuming with --ckpt_path last each time: during start-up,
    while a checkpoint or replay file is being written, and at random moments of training; then
    let it finish and check the run."""
    rng = random.Random(seed)
    run_dir, args = tmp_path / "tiny", ["--env.total_steps", str(total_steps), "--run.checkpoint_every", "24",
                                        "--ckpt_path", "last"]
    checkpoints, last = run_dir / "checkpoints", run_dir / "checkpoints/last.ckpt"
    history, report = [], []
    during_write = 0
    for kill in range(kills):
        process = start(tmp_path, *args)
        before = counters(last) if last.exists() else (0, 0)
        if kill % 4 == 0:  # during start-up or prefill
            time.sleep(rng.uniform(1.0, 6.0))
        elif kill % 2:  # while a checkpoint or replay file is being written
            wait_for(lambda: writing(checkpoints, process.pid), process, tmp_path, timeout=300, poll=0.0005)
        else:  # at a random moment once this attempt has made progress (a new checkpoint), whatever the load
            previous = last.stat().st_mtime_ns if last.exists() else 0
            wait_for(lambda: last.exists() and last.stat().st_mtime_ns != previous, process, tmp_path, timeout=300)
            time.sleep(rng.uniform(0.0, 3.0))
        hit_write = writing(checkpoints, process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        during_write += hit_write
        after = counters(last) if last.exists() else (0, 0)
        history.append(after)
        reached = logged_frames(run_dir)
        report.append(f"kill {kill + 1}: {'during a write' if hit_write else 'at a random moment'}, "
                      f"checkpoint at {before[0]} -> {after[0]} env frames, {after[1]} updates; "
                      f"{max(0, reached - after[0])} frames lost (reached {reached})")
    process = start(tmp_path, *args)
    assert wait(process, tmp_path, timeout=900) == 0, (tmp_path / "fit.log").read_text()[-3000:]
    history.append(counters(last))
    print("\n".join(report + [f"final: {history[-1]}"]))
    assert during_write >= kills // 4, f"only {during_write} kills landed during a write"
    # Counters never went backwards and end at the target.
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(history, history[1:])), history
    assert history[-1][0] >= total_steps
    # The replay holds exactly the rows the final checkpoint covers, and nothing else is on disk.
    reference = torch.load(last, map_location="cpu", weights_only=True)["replay"]
    assert saved_buffer(run_dir).rows_added == reference["rows"]
    replay = checkpoints / "replay/rank0"
    kept = {torch.load(p, map_location="cpu", weights_only=True)["replay"]["manifest"] for p in checkpoints.glob("*.ckpt")}
    assert {p.name for p in (replay / "manifests").iterdir()} == kept
    # One MLflow run, FINISHED, with no metric logged twice at one step.
    client, run = client_for(run_dir)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/updates")]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)


@pytest.mark.slow  # about 2 min of real kills
def test_soak_sigkill_at_random_moments_and_during_writes(tmp_path):
    soak(tmp_path, kills=10, total_steps=400, seed=0)


@pytest.mark.slow
def test_soak_long(tmp_path):
    soak(tmp_path, kills=12, total_steps=480, seed=1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGUSR1"])
@pytest.mark.slow  # a fit, a signal and a resume each, about 25 s
def test_a_stop_signal_writes_a_final_checkpoint_that_resumes(tmp_path, signum):
    run_dir = tmp_path / "tiny"
    last = run_dir / "checkpoints/last.ckpt"
    process = start(tmp_path, "--env.total_steps", "100000", "--run.checkpoint_every", "16")
    wait_for(last.exists, process, tmp_path)  # training is under way
    periodic = counters(last)
    time.sleep(3.0)
    process.send_signal(signum)
    assert wait(process, tmp_path, timeout=60) == 128 + signum
    frames, updates = counters(last)
    assert updates > periodic[1], "the final checkpoint is the one written at the signal"
    client, run = client_for(run_dir)
    assert run.info.status == "KILLED"
    logged = client.get_metric_history(run.info.run_id, "train/updates")
    assert max(m.step for m in logged) <= frames, "nothing was logged after the final checkpoint"

    process = start(tmp_path, "--env.total_steps", str(frames + 16), "--ckpt_path", "last")
    assert wait(process, tmp_path) == 0
    resumed_frames, resumed_updates = counters(last)
    assert resumed_frames >= frames + 16 and resumed_updates > updates
    client, run = client_for(run_dir)
    assert run.info.status == "FINISHED"
    updates_logged = client.get_metric_history(run.info.run_id, "train/updates")
    assert min(m.value for m in updates_logged if m.step > frames) > updates - 1, "the resume continued the count"


def worker_pids(pid: int) -> list[int]:
    """The env worker processes of a fit: its forked children (same command line)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == command]


@pytest.mark.slow  # a fit with worker processes, about 45 s
def test_a_killed_env_worker_is_restarted_and_the_run_goes_on(tmp_path):
    run_dir = tmp_path / "tiny"
    process = start(tmp_path, "--env.num_envs", "2", "--env.total_steps", "400", "--run.checkpoint_every", "40")
    wait_for(lambda: (run_dir / "checkpoints/last.ckpt").exists(), process, tmp_path)
    workers = worker_pids(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    assert wait(process, tmp_path) == 0, (tmp_path / "fit.log").read_text()[-3000:]
    client, run = client_for(run_dir)
    assert run.info.status == "FINISHED"
    restarts = client.get_metric_history(run.info.run_id, "env/restarts")
    assert restarts[-1].value == 1
    assert counters(run_dir / "checkpoints/last.ckpt")[0] >= 400


@pytest.mark.slow  # several CLI commands on one run, about 40 s
def test_refused_and_read_only_commands_leave_a_finished_run_alone(tmp_path):
    process = start(tmp_path, "--env.total_steps", "24")
    assert wait(process, tmp_path) == 0
    run_dir = tmp_path / "tiny"
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "mlflow.db"}
    _, before = client_for(run_dir)
    for command, *extra in (["predict"], ["test"], ["fit", "--data.batch_size", "0", "--ckpt_path", "last"],
                            ["fit", "--env.total_steps", "48"]):
        result = subprocess.run([sys.executable, "-m", "wm", command, *TINY, "--run.root", str(tmp_path), *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, result.stderr[-2000:]
    # Every replay chunk damaged, so no older checkpoint can stand in (test_faults has that
    # fallback): the resume is refused before the run is touched.
    for chunk in (run_dir / "checkpoints/replay/rank0/chunks").glob("*.chunk"):
        files[chunk] = chunk.read_bytes()[:-5]
        chunk.write_bytes(files[chunk])
    result = subprocess.run([sys.executable, "-m", "wm", "fit", *TINY, "--run.root", str(tmp_path),
                             "--env.total_steps", "48", "--ckpt_path", "last"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "corrupted or truncated" in result.stderr and "Traceback" not in result.stderr
    assert "no checkpoint in" in result.stderr and "can be resumed" in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([before.info.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == before.info.run_id
    assert runs[0].data.params == before.data.params
    assert {p: p.read_bytes() for p in files} == files

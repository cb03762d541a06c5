"""Runs that are what they say (wm.run.identity, wm.run.cli), with real fits and real MLflow stores: one seed
derives every other, a resume refuses a changed config and leaves the run alone, runs of a root
share one store (or the one MLFLOW_TRACKING_URI names) that the report reads, and runs made before
checkpoints recorded their config, each with its own store, still resume and test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.test_training import TINY, saved_buffer
from wm import report
from wm.run.cli import CheckpointError, main
from wm.run.identity import RECORD_KEY, RESUMABLE


def fit(root: Path, name: str, *extra: str) -> None:
    main(["fit", *TINY, "--run.root", str(root), "--run.name", name, "--env.total_steps", "24", *extra])


def mlflow_run(uri: str, name: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                                filter_string=f"attributes.run_name = '{name}'")
    return client, run


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics if key.startswith("train/")}


def first_images(run_dir: Path) -> torch.Tensor:
    """The first observation of every episode the run collected (its envs' initial states)."""
    buffer = saved_buffer(run_dir)
    rows = buffer.arrays["is_first"][: buffer.rows_added, 0].bool()
    return buffer.arrays["image"][: buffer.rows_added, 0][rows]


def replay_draws(run_dir: Path) -> torch.Tensor:
    """Replay indices the run's sampler draws next, from the state its checkpoint holds."""
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["ReplayDataModule"]
    generator = torch.Generator()
    generator.set_state(state["generator"])
    return torch.randint(0, 10**6, (64,), generator=generator)


def recorded(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)[RECORD_KEY]


@pytest.fixture
def one_thread():
    """Bitwise repeatable CPU kernels: with two threads, a loaded machine made two fits of one seed
    part at the fourth update about one time in six (a float rounding that flipped a sampled latent)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_seed_repeats_a_fit_exactly_and_another_differs_in_every_stream(tmp_path, monkeypatch, one_thread):
    """--seed_everything is the run's one seed: env resets, random prefill and replay sampling
    follow it. A second fit with seed 0 (tracked where MLFLOW_TRACKING_URI says) repeats the first
    update for update; seed 1 differs in prefill actions, initial states and replay indices."""
    fit(tmp_path, "first")
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    fit(tmp_path, "again")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    fit(tmp_path, "other", "--seed_everything", "1")
    root_store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (client, first), (client_again, again), (_, other) = (
        mlflow_run(root_store, "first"), mlflow_run(elsewhere, "again"), mlflow_run(root_store, "other"))
    with pytest.raises(ValueError):
        mlflow_run(root_store, "again")  # the environment's store, not the root's
    assert histories(client, first) == histories(client_again, again), "one seed, the same updates"
    assert len(histories(client, first)["train/world_model/loss"]) >= 8
    assert histories(client, first)["train/world_model/loss"] != histories(client, other)["train/world_model/loss"]

    runs = {name: tmp_path / name for name in ("first", "again", "other")}
    prefill = {name: saved_buffer(path).arrays["action"][:16] for name, path in runs.items()}
    assert torch.equal(prefill["first"], prefill["again"]) and not torch.equal(prefill["first"], prefill["other"])
    starts = {name: first_images(path) for name, path in runs.items()}
    assert len(starts["first"]) >= 3 and torch.equal(starts["first"], starts["again"])
    assert not torch.equal(starts["first"][:3], starts["other"][:3]), "seed 1 starts its episodes elsewhere"
    draws = {name: replay_draws(path) for name, path in runs.items()}
    assert torch.equal(draws["first"], draws["again"]) and not torch.equal(draws["first"], draws["other"])
    # The derived seeds are in the recorded config and the MLflow params: a run says what it used.
    configs = {name: recorded(path)["config"] for name, path in runs.items()}
    for key in ("env", "data"):
        assert configs["first"][key]["seed"] == configs["again"][key]["seed"] != configs["other"][key]["seed"]
    assert first.data.params["env.seed"] == str(configs["first"]["env"]["seed"])
    assert configs["first"]["env"]["seed"] != configs["first"]["data"]["seed"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_another_config_is_refused_and_touches_nothing(tmp_path):
    fit(tmp_path, "tiny")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, run = mlflow_run(store, "tiny")
    before = file_hashes(tmp_path)
    changes = {"model.optimizer.lr": ("1e-4", "0.0003", "0.0001"), "data.batch_size": ("3", "2", "3"),
               "env.train_ratio": ("8", "16.0", "8.0"), "model.objective.init_args.scale": ("0.1", "0.05", "0.1")}
    for key, (given, old, new) in changes.items():
        with pytest.raises(CheckpointError) as refused:
            fit(tmp_path, "tiny", "--ckpt_path", "last", f"--{key}", given)
        message = str(refused.value)
        assert f"  {key}: {old} (checkpoint) -> {new} (now)" in message, message
        assert "start a new run: give it another --run.name" in message
        assert "Nothing was changed" in message and all(k in message for k in RESUMABLE)
    # Several at once, each named.
    with pytest.raises(CheckpointError, match=r"(?s)model.size: 'size1M' \(checkpoint\) -> 'size12M'.*env.task: "
                                              r"'toy-catch' \(checkpoint\) -> 'toy-point_reach'"):
        fit(tmp_path, "tiny", "--ckpt_path", "last", "--model.size", "size12M", "--env.task", "toy-point_reach")
    assert file_hashes(tmp_path) == before
    _, after = mlflow_run(store, "tiny")
    assert after.info.status == "FINISHED" and after.data.params == run.data.params
    assert after.data.metrics == run.data.metrics


def test_fit_then_report_on_the_default_root(tmp_path, monkeypatch):
    """The README's flow, from a fresh folder: a fit with no --run.root lands in runs/<experiment>/,
    whose store the report reads by default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    main(["fit", *TINY, "--env.total_steps", "24"])
    assert (tmp_path / "runs/quickstart/mlflow.db").is_file() and (tmp_path / "runs/quickstart/tiny/checkpoints/last.ckpt").is_file()
    report.main(["--experiment", "quickstart", "--out", "report", "--reps", "100"])
    text = (tmp_path / "report/report.md").read_text()
    assert "toy-catch" in text and "barlow" in text and (tmp_path / "report/curves.png").is_file()
    assert os.environ.get("MLFLOW_TRACKING_URI") is None, "a fit leaves the user's environment as it was"


def strip_record(checkpoint: Path) -> None:
    """Make `checkpoint` one of a wm that recorded no run (replaced, so its other names keep theirs)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del state[RECORD_KEY]
    torch.save(state, checkpoint.with_name("old.tmp"))
    os.replace(checkpoint.with_name("old.tmp"), checkpoint)


@pytest.mark.slow  # a fit, a resume and a test
def test_a_run_with_its_own_store_from_an_older_wm_still_resumes_and_tests(tmp_path):
    run_dir = tmp_path / "tiny"
    own = f"sqlite:///{run_dir / 'mlflow.db'}"
    fit(tmp_path, "tiny", "--run.tracking_uri", own)  # the layout of runs made before one store per root
    last = run_dir / "checkpoints/last.ckpt"
    strip_record(last)
    with pytest.warns(UserWarning, match="records no config"):
        fit(tmp_path, "tiny", "--env.total_steps", "40", "--ckpt_path", "last")  # no store named: the run's own
    assert not (tmp_path / "mlflow.db").exists()
    client, run = mlflow_run(own, "tiny")
    assert run.info.status == "FINISHED" and max(m.step for m in client.get_metric_history(run.info.run_id, "train/updates")) >= 40
    strip_record(last)
    main(["test", *TINY, "--ckpt_path", str(last), "--env.eval_episodes", "2"])  # --config says what it is
    _, tested = mlflow_run(own, "tiny")
    assert tested.data.metrics["test/episodes"] == 2 and tested.info.status == "FINISHED"


def test_runs_that_start_together_on_a_new_store_share_one_experiment(tmp_path):
    """A parallel sweep's runs each find the experiment missing; every process must end up with the
    same experiment instead of one failing on MLflow's unique-name constraint."""
    import subprocess
    import sys

    from wm.run.tracking import create_store, sqlite_uri

    create_store(tmp_path / "mlflow.db")
    uri = sqlite_uri(tmp_path / "mlflow.db")
    code = f"from wm.run.tracking import ensure_experiment; print(ensure_experiment({uri!r}, 'together'))"
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    results = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-500:] for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 1 and ids == {MlflowClient(uri).get_experiment_by_name("together").experiment_id}
    assert MlflowClient(uri).get_experiment_by_name("together").tags["mlflow.experimentKind"] == "custom_model_development"

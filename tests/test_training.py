"""The training system end to end: `python -m wm fit` through LightningCLI on a toy task, with a
real MLflow store, checkpoints, resume, DDP and the errors a user meets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import lightning as L
import pytest
import torch
import yaml
from mlflow import MlflowClient

from datamodules import ReplayBuffer, ReplayStore
from wm.run.cli import CheckpointError, main
from wm.run.identity import RECORD_KEY
from wm.run.validation import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(REPO / "configs/quickstart.yaml"),
    "--data.batch_size", "2", "--data.sequence_length", "8", "--data.capacity", "1000",
    "--env.prefill", "16", "--env.train_ratio", "16", "--env.eval_episodes", "1",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--run.checkpoint_every", "20", "--run.name", "tiny",
]


def fit(root: Path, *extra: str) -> None:
    main(["fit", *TINY, "--run.root", str(root), *extra])


def client_for(run_dir: Path) -> tuple[MlflowClient, object]:
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return client, runs[0]


def saved_buffer(run_dir: Path, rank: int = 0, checkpoint: str = "last.ckpt") -> ReplayBuffer:
    """The replay buffer a checkpoint of the run resumes with."""
    reference = torch.load(run_dir / "checkpoints" / checkpoint, map_location="cpu", weights_only=True)["replay"]
    return ReplayStore(run_dir / f"checkpoints/replay/rank{rank}").open(reference["manifest"])


def callback_state(checkpoint: Path, name: str) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return next(v for k, v in state["callbacks"].items() if k.startswith(name))


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for name, t in tensors.items()}


class ParameterDigests(L.Callback):
    """Test-only: when training ends, each rank writes a digest of every model tensor to
    `<directory>/rank<r>.json` ({"parameters": {name: sha256}, "buffers": {...}})."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        entries = {"parameters": digests(dict(pl_module.named_parameters())),
                   "buffers": digests(dict(pl_module.named_buffers()))}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(entries))


def test_fit_logs_a_run_that_mlflow_reads_back(tmp_path):
    fit(tmp_path, "--env.total_steps", "40", "--env.eval_every", "20")
    run_dir = tmp_path / "tiny"
    client, run = client_for(run_dir)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["env.task"] == "toy-catch" and params["model.size"] == "size1M"
    assert params["model.objective.class_path"] == "wm.objectives.Barlow"
    # Metrics are against environment frames: episode returns from prefill on, eval at the end.
    for key in run.data.metrics:  # one point per step: nothing logged twice, not even when the fit stops
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has two points at one step: {steps}"
    returns = client.get_metric_history(run.info.run_id, "episode/return")
    assert returns and all(-1.0 <= m.value <= 1.0 for m in returns)
    assert max(m.step for m in returns) <= 40
    losses = client.get_metric_history(run.info.run_id, "train/world_model/loss")
    assert len(losses) >= 10 and [m.step for m in losses] == sorted(m.step for m in losses)
    assert max(m.step for m in losses) >= 40  # env frames, not the ~24 updates
    # One agent step per update here: evaluations at 20 and 40 frames, the last one not repeated at the end.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return")] == [20, 40]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "videos" in artifacts
    video = client.download_artifacts(run.info.run_id, "videos", str(tmp_path / "dl"))
    mp4 = next(Path(video).glob("eval_*.mp4"))  # the one eval episode, enlarged from 64 to 256 pixels
    frames = iio.imread(mp4, plugin="pyav")
    assert frames.shape[1:] == (256, 256, 3) and len(frames) >= 2
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert "task: toy-catch" in config and "class_path: wm.objectives.Barlow" in config
    checkpoint = client.download_artifacts(run.info.run_id, "last/last.ckpt", str(tmp_path / "dl"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["size"] == "size1M" and state["global_step"] > 0


@pytest.mark.slow  # two fits, about 35 s
def test_resume_continues_the_same_run_counters_and_buffer(tmp_path):
    fit(tmp_path, "--env.total_steps", "30")
    run_dir = tmp_path / "tiny"
    _, first = client_for(run_dir)
    last = run_dir / "checkpoints/last.ckpt"
    state = callback_state(last, "EnvLoop")
    global_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    buffer = saved_buffer(run_dir)
    assert buffer.steps_added == state["env_steps"] + 1, "prefill's first observation, then one row per step"

    fit(tmp_path, "--env.total_steps", "50", "--ckpt_path", "last")
    client, second = client_for(run_dir)
    assert second.info.run_id == first.info.run_id and second.info.status == "FINISHED"
    resumed = callback_state(last, "EnvLoop")
    assert resumed["env_steps"] >= 50 and resumed["episodes"] > state["episodes"]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] > global_step
    # The resumed buffer starts exactly as it was saved; new steps follow the old ones.
    after = saved_buffer(run_dir)
    assert after.steps_added == resumed["env_steps"] + 2, "each fit starts with a reset observation"
    rows = buffer.rows_added
    for key, array in buffer.arrays.items():
        if key not in ("deter", "stoch"):  # replay context is rewritten by later updates
            assert torch.equal(after.arrays[key][:rows], array[:rows]), key
    assert after.arrays["is_first"][rows].all(), "a resume starts new episodes"
    updates = client.get_metric_history(second.info.run_id, "train/updates")
    assert max(m.value for m in updates) > global_step
    for key in ("train/updates", "train/world_model/loss", "episode/return"):
        steps = [m.step for m in client.get_metric_history(second.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has two points at one step"


def test_refuses_to_overwrite_or_load_a_bad_checkpoint(tmp_path):
    fit(tmp_path, "--env.total_steps", "24")
    run_dir = tmp_path / "tiny"
    last = run_dir / "checkpoints/last.ckpt"
    before = last.read_bytes()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        fit(tmp_path, "--env.total_steps", "24")
    # A checkpoint that records no config (an older wm's) is still checked against the model built
    # for the config: another objective, model size, or a task with another action space is refused.
    state = torch.load(last, map_location="cpu", weights_only=True)
    del state[RECORD_KEY]
    old = run_dir / "checkpoints/old.ckpt"
    torch.save(state, old)
    with pytest.raises(ValueError, match="belongs to another model.*objective"):
        fit(tmp_path, "--env.total_steps", "40", "--ckpt_path", str(old), "--model.objective", "wm.objectives.NoObjective")
    with pytest.raises(CheckpointError, match=r"another model \(size: checkpoint 'size1M', config 'size12M'\)"):
        fit(tmp_path, "--env.total_steps", "40", "--ckpt_path", str(old), "--model.size", "size12M")
    with pytest.raises(CheckpointError, match=r"action_dim: checkpoint 3, config 2; discrete: checkpoint True, config False"):
        fit(tmp_path, "--env.total_steps", "40", "--ckpt_path", str(old), "--env.task", "toy-point_reach")
    old.unlink()
    assert last.read_bytes() == before
    last.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="corrupted or unreadable"):  # named: no fallback (--ckpt_path last has one)
        fit(tmp_path, "--env.total_steps", "40", "--ckpt_path", str(last))
    assert last.read_bytes() == before[: len(before) // 2]


@pytest.mark.slow  # a longer fit, about 20 s
def test_periodic_checkpoints_at_each_multiple_of_checkpoint_every(tmp_path):
    """--run.checkpoint_every 20: envstep=20/40/60.ckpt and no others. Prefill collects 16
    frames, then each update is followed by one env frame, so update u ends at 16 + u frames."""
    fit(tmp_path, "--env.total_steps", "60")
    checkpoints = tmp_path / "tiny/checkpoints"
    names = sorted(p.name for p in checkpoints.glob("*.ckpt"))
    assert names == ["envstep=20.ckpt", "envstep=40.ckpt", "envstep=60.ckpt", "last.ckpt"]
    for frames in (20, 40, 60):
        path = checkpoints / f"envstep={frames}.ckpt"
        assert callback_state(path, "EnvLoop")["env_steps"] == frames
        assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == frames - 16
    last, kept = checkpoints / "last.ckpt", checkpoints / "envstep=60.ckpt"
    assert last.read_bytes() == kept.read_bytes(), "the run ended at 60 frames"
    assert not last.samefile(kept), "a copy: writing one file in place cannot change the other"
    with open(last, "r+b") as f:  # what a careless in-place write does
        f.truncate(100)
    assert torch.load(kept, map_location="cpu", weights_only=True)["global_step"] == 44


def test_cli_refuses_unknown_keys_and_tasks_in_one_line_naming_the_closest(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--model.sise", "size1M")
    (line,) = capsys.readouterr().err.strip().splitlines()  # not the 100 lines of usage
    assert line.startswith("error: unrecognized arguments: --model.sise size1M. Did you mean --model.size?")
    assert line.endswith("Every option: python -m wm fit --help")
    with pytest.raises(ConfigError, match=r"env.task='toy-cath' is not a task. Did you mean toy-catch\? The toy tasks"):
        fit(tmp_path, "--env.task", "toy-cath")
    with pytest.raises(ConfigError, match=r"no suite 'dcm'. Did you mean dmc\?"):
        fit(tmp_path, "--env.task", "dcm-walker_walk")
    assert not any(tmp_path.iterdir()), "nothing was created"


def test_print_config_shows_every_setting_and_no_shapes():
    out = subprocess.run([sys.executable, "-m", "wm", "fit", "--config", "configs/dmc.yaml", "--print_config"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "task: dmc-walker_walk" in out and "observation_shapes" not in out
    model = yaml.safe_load(out)["model"]
    # the loss weights, free nats, learning rate and warm-up of a run can be read, none left null
    assert model["world_model"]["kl_dyn"] == 1.0 and model["world_model"]["free_nats"] == 1.0
    assert model["optimizer"] == {"lr": 4e-5, "beta1": 0.9, "beta2": 0.999, "eps": 1e-20, "agc": 0.3, "pmin": 1e-3,
                                  "warmup": 1000}
    assert model["actor_critic"]["horizon"] == 15 and model["objective"]["init_args"]["scale"] == 0.05
    assert "lr_scheduler" not in yaml.safe_load(out) and "optimizer" not in yaml.safe_load(out)


def test_another_logger_is_refused_before_anything_is_made(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.logger=.* is not supported: wm logs every run to MLflow.*--run.tracking_uri"):
        fit(tmp_path, "--trainer.logger", "false")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # two processes, about 20 s
def test_two_process_ddp_fit(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    callback = {"class_path": "tests.test_training.ParameterDigests", "init_args": {"directory": str(tmp_path / "digests")}}
    cmd = [sys.executable, "-m", "wm", "fit", *TINY, "--run.root", str(tmp_path), "--env.total_steps", "24",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.callbacks", json.dumps([callback])]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    images = [saved_buffer(tmp_path / "tiny", rank).arrays["image"] for rank in (0, 1)]
    assert images[0].any() and not torch.equal(images[0], images[1]), "ranks must collect their own experience"
    client_for(tmp_path / "tiny")  # exactly one MLflow run
    # The ranks train one model: after their updates every parameter is the same on both, and
    # the checkpoint holds it. Buffers are not compared: each rank's return normaliser
    # (actor_critic.retnorm low/high) follows its own imagined returns, and they differ here.
    ranks = [json.loads((tmp_path / f"digests/rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["parameters"] and ranks[0]["parameters"] == ranks[1]["parameters"]
    last = torch.load(tmp_path / "tiny/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] > 0
    saved = digests({name: last["state_dict"][name] for name in ranks[0]["parameters"]})
    assert saved == ranks[0]["parameters"]


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """configs/quickstart.yaml as shipped (~9 min on 2 CPU cores): the final greedy evaluation
    beats a random policy (mean return -0.5 on Catch) by a wide margin."""
    main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--run.root", str(tmp_path),
          "--trainer.enable_progress_bar", "false"])
    client, run = client_for(next(tmp_path.iterdir()))
    final = client.get_metric_history(run.info.run_id, "eval/return")[-1].value
    assert final > 0.5, f"final eval return {final}"

"""Each benchmark config runs end to end: a short fit with a small model that logs to MLflow."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from wm.run.cli import main
from wm.envs import available_tasks, make_env

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model.size", "size1M", "--data.batch_size", "2", "--data.sequence_length", "8", "--data.capacity", "1000",
         "--env.num_envs", "1", "--env.prefill", "16", "--env.train_ratio", "16", "--env.total_steps", "40",
         "--env.eval_episodes", "0", "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--model.compile", "false"]  # the configs compile the update: minutes per graph; tests/test_compile.py covers it


@pytest.mark.parametrize(
    "benchmark, objective",
    [("dmc", "barlow"), *(pytest.param(*case, marks=pytest.mark.slow)  # the main config by default; each suite's under -m slow
                          for case in [("dmc_subtle", "reconstruction"), ("dmc_distracting", "mudreamer"),
                                       ("atari100k", "barlow"), ("metaworld", "none")])],
)
def test_benchmark_config_fits_and_logs(tmp_path, benchmark, objective):
    config = REPO / f"configs/{benchmark}.yaml"
    short_episodes = ["--env.time_limit", "6"]  # so that episodes, and their success, are logged
    main(["fit", "--config", str(config), "--config", str(REPO / f"configs/objective/{objective}.yaml"), *SMALL,
          *short_episodes, "--run.root", str(tmp_path)])
    (run_dir,) = (p for p in tmp_path.iterdir() if p.is_dir() and p.name != "artifacts")
    task = yaml.safe_load(config.read_text())["env"]["task"]
    assert run_dir.name == f"{task}-{objective}-s0"  # suite (benchmark), task, objective, seed
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(benchmark).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["env.task"] == task
    assert client.get_metric_history(run.info.run_id, "train/world_model/loss")
    assert (run_dir / "checkpoints/last.ckpt").exists()
    assert client.get_metric_history(run.info.run_id, "episode/return")
    # success only where the task has it (Meta-World's): elsewhere a 0 would read as a failure
    assert bool(client.get_metric_history(run.info.run_id, "episode/success")) == (benchmark == "metaworld")


@pytest.mark.parametrize(
    "task", ["toy-catch", "dmc-cartpole_balance", "dmc-quadruped_walk", "dmc_subtle-point_mass_easy", "dmc_distracting-cheetah_run",
             "atari-breakout", "metaworld-reach-v3"],
)
def test_every_suite_is_registered_with_gymnasium(task):
    env = gym.make(f"wm/{task}")
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    obs, *_ = env.step(env.action_space.sample())
    assert obs["image"].shape == (64, 64, 3)
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("task", available_tasks(["dmc", "dmc_subtle", "dmc_distracting"]))
def test_every_dmc_task_steps(task):
    env = make_env(task, seed=0)
    obs, *_ = env.step(env.action_space.sample())
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    env.close()

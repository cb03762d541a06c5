"""Memory Maze: construct, reset, step, the observation and action spaces, episode length, and a
real fit that logs to MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.wrappers import TimeLimit
from mlflow import MlflowClient

pytest.importorskip("memory_maze", reason="the memory-maze extra is not installed (pip install -e '.[memory-maze]')")

from tests.test_training import TINY  # noqa: E402
from wm.run.cli import main  # noqa: E402
from wm.envs import make_env  # noqa: E402


@pytest.mark.slow  # whole 1000-step episodes
def test_a_9x9_maze_from_pixels_with_1000_step_episodes():
    env = make_env("memory_maze-9x9", action_repeat=1, seed=0)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs["image"].shape == (64, 64, 3)
    assert env.action_space.n == 6
    first = obs["image"]
    obs, reward, terminated, truncated, _ = env.step(1)  # forward
    assert not np.array_equal(first, obs["image"]) and reward in (0.0, 1.0) and not terminated
    again = make_env("memory_maze-9x9", action_repeat=1, seed=0)
    np.testing.assert_array_equal(again.reset(seed=0)[0]["image"], first)  # a seed fixes the maze
    while not isinstance(env, TimeLimit):
        env = env.env
    assert env._max_episode_steps == 1000  # 250 s at 4 actions per second, the paper's 9x9 episodes
    assert not truncated


@pytest.mark.slow  # 32 s: a real fit that renders every step
def test_a_short_fit_logs_to_mlflow(tmp_path):
    main(["fit", *TINY, "--run.root", str(tmp_path), "--env.task", "memory_maze-9x9", "--env.action_repeat", "1",
          "--env.time_limit", "40", "--env.total_steps", "120", "--env.eval_every", "60"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["env.task"] == "memory_maze-9x9"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return")][-1] >= 120
    assert client.get_metric_history(run.info.run_id, "episode/return")

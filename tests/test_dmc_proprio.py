"""DMC from proprioceptive states: the suite's own observation vector, and a real fit of each
objective from it that logs to MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.test_training import REPO, TINY
from wm.run.cli import main
from wm.envs import make_env


def test_observes_the_suite_state_vector_and_truncates_at_1000_frames():
    from dm_control import suite  # after wm.envs, which picks the headless renderer

    env = make_env("dmc_proprio-cartpole_balance", action_repeat=2, seed=0)
    obs, _ = env.reset(seed=3)
    reference = suite.load("cartpole", "balance")
    reference.task.random.seed(3)
    state = reference.reset().observation  # position (3) and velocity (2)
    assert set(obs) == {"state"} and obs["state"].dtype == np.float32 and obs["state"].shape == (5,)
    np.testing.assert_allclose(obs["state"], np.concatenate([state["position"], state["velocity"]]), rtol=1e-6)
    assert env.observation_space.contains(obs)
    steps, truncated = 0, False
    while not truncated:
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert 0.0 <= reward <= 2.0 and not terminated  # two frames of a reward in [0, 1]
        steps += 1
    assert steps == 500  # 1000 frames at action repeat 2
    assert env.render().shape == (64, 64, 3)


@pytest.mark.slow  # a suite's fit
@pytest.mark.parametrize("objective", ["barlow", "reconstruction"])
def test_a_short_fit_from_states_logs_to_mlflow(tmp_path, objective):
    """The state vector goes through the encoder's MLP path, and for reconstruction the decoder's."""
    main(["fit", *TINY, "--config", str(REPO / f"configs/objective/{objective}.yaml"), "--run.root", str(tmp_path),
          "--env.task", "dmc_proprio-cartpole_balance", "--env.action_repeat", "2", "--env.total_steps", "120",
          "--env.eval_every", "60", "--env.eval_videos", "0"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["env.task"] == "dmc_proprio-cartpole_balance"
    returns = client.get_metric_history(run.info.run_id, "eval/return")
    assert [m.step for m in returns][-1] >= 120 and all(0.0 <= m.value <= 1000.0 for m in returns)
    assert client.get_metric_history(run.info.run_id, "train/world_model/loss")

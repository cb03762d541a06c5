"""Crafter: the env's spaces and episode ends, its achievements, the Crafter score, and a real fit
that logs the achievements to MLflow."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow import MlflowClient

pytest.importorskip("crafter", reason="the crafter extra is not installed (pip install -e '.[crafter]')")

from tests.test_training import TINY  # noqa: E402
from wm.run.cli import main  # noqa: E402
from wm.envs import make_env  # noqa: E402
from wm.envs.crafter import CRAFTER_ACHIEVEMENTS, crafter_score  # noqa: E402


def test_steps_from_pixels_and_reports_every_achievement():
    env = make_env("crafter-reward", action_repeat=1, seed=0)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs["image"].shape == (64, 64, 3)
    import crafter

    assert env.action_space.n == 17 and CRAFTER_ACHIEVEMENTS == tuple(crafter.constants.achievements)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert {k.removeprefix("achievement/") for k in info} == set(CRAFTER_ACHIEVEMENTS)
    again = make_env("crafter-reward", action_repeat=1, seed=0)
    np.testing.assert_array_equal(again.reset(seed=0)[0]["image"], env.reset(seed=0)[0]["image"])
    # "noop" for 10000 steps: never dead at full health... the player starves slowly; either way the
    # episode ends by itself, terminal only with a death
    steps, done = 0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(0)
        steps, done = steps + 1, terminated or truncated
    assert truncated == (steps == 10000) and terminated == (steps < 10000)


def test_the_crafter_score_is_the_shifted_geometric_mean_of_percentages():
    assert abs(crafter_score([1.0] * 22) - 100.0) < 1e-9 and crafter_score([0.0] * 22) == 0.0
    rates = [0.5, 0.1, 0.0, 0.9]
    expected = math.exp(sum(math.log(1 + 100 * r) for r in rates) / 4) - 1
    assert abs(crafter_score(rates) - expected) < 1e-9


@pytest.mark.slow  # 22 s
def test_a_short_fit_logs_achievement_rates_and_the_score(tmp_path):
    main(["fit", *TINY, "--run.root", str(tmp_path), "--env.task", "crafter-reward", "--env.action_repeat", "1",
          "--env.time_limit", "40", "--env.total_steps", "160", "--env.eval_every", "80", "--env.eval_videos", "1"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])[0]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for prefix in ("episode", "eval"):
        rates = [metrics[f"{prefix}/achievement/{name}"] for name in CRAFTER_ACHIEVEMENTS]
        assert all(0.0 <= rate <= 1.0 for rate in rates)
        assert metrics[f"{prefix}/crafter_score"] == crafter_score(rates)
    assert any(a.path.startswith("videos/eval_") for a in client.list_artifacts(run.info.run_id, "videos"))

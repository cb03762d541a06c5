"""Meta-World MT1 from pixels: the camera of docs/algorithm.md §3 and flip, repeat 2, 500-frame episodes, success."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
from metaworld.policies import SawyerReachV3Policy

from wm.envs import make_env
from wm.envs.meta_world import MetaWorldEnv, metaworld_tasks


def check_steps(env, steps: int = 2) -> None:
    obs, info = env.reset(seed=0)
    assert info["success"] is False
    for _ in range(steps):
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(reward, float) and not terminated and "success" in info


@pytest.mark.parametrize("task", ["reach-v3", "door-open-v3", "pick-place-v3"])
def test_sample_tasks_step(task):
    env = make_env(f"metaworld-{task}", action_repeat=2)
    check_steps(env)
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("task", metaworld_tasks())
def test_every_task_steps(task):
    env = make_env(f"metaworld-{task}", action_repeat=2)
    check_steps(env)
    env.close()


def test_fifty_tasks():
    assert len(metaworld_tasks()) == 50 and "reach-v3" in metaworld_tasks()


def test_camera_moved_and_image_flipped():
    """docs/algorithm.md §3: camera `corner2` moved to [0.75, 0.075, 0.7], the image flipped vertically. The
    observation is checked against a render of our own through that camera, flipped by hand."""
    env = MetaWorldEnv("door-open-v3")
    obs, _ = env.reset(seed=1)
    inner = env._env
    camera = mujoco.mj_name2id(inner.model, mujoco.mjtObj.mjOBJ_CAMERA, "corner2")
    assert camera >= 0
    np.testing.assert_array_equal(inner.model.cam_pos[camera], np.array([0.75, 0.075, 0.7]))
    with mujoco.Renderer(inner.model, 64, 64) as renderer:
        renderer.update_scene(inner.data, camera="corner2")
        raw = renderer.render()
    assert not np.array_equal(raw, raw[::-1])  # the flip is visible
    np.testing.assert_array_equal(obs["image"], raw[::-1])
    env.close()


@pytest.mark.slow  # whole 500-frame episodes
def test_success_is_sticky_and_episodes_last_500_frames():
    """The scripted reach policy reaches the goal; success then stays set for the rest of the
    episode, which is truncated (never terminated) after 250 agent steps at action repeat 2."""
    env = make_env("metaworld-reach-v3", action_repeat=2)
    policy = SawyerReachV3Policy()
    env.reset(seed=2)
    inner = env.unwrapped._env
    successes, steps, done = [], 0, False
    while not done:
        action = policy.get_action(inner._get_obs()) if not any(successes) else env.action_space.sample()
        _, _, terminated, truncated, info = env.step(action)
        successes.append(info["success"])
        steps += 1
        assert not terminated
        done = truncated
    first = successes.index(True)
    assert first < 200 and all(successes[first:])
    assert steps == 250 and inner.curr_path_length == 500
    env.close()

"""Environment layer: toy tasks, DMC from pixels, the factory, vector envs and gymnasium registration."""

import importlib.util
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from wm.envs import ActionRepeat, Catch, DMCEnv, PointReach, available_tasks, make_env, make_vector_env


def _centroid(image, colour):
    """Mean (x, y) in arena units [-1, 1] of the pixels painted `colour`."""
    rows, cols = np.nonzero((image == colour).all(-1))
    return (np.array([cols.mean(), rows.mean()]) + 0.5) / image.shape[0] * 2 - 1


def _reach_policy(obs):
    """Steers from the red dot towards the green one, seen in the image."""
    image = obs["image"]
    delta = _centroid(image, PointReach.TARGET_COLOUR) - _centroid(image, PointReach.AGENT_COLOUR)
    return np.clip(delta / PointReach.SPEED, -1, 1).astype(np.float32)


def _catch_policy(obs):
    """Moves the paddle towards the ball's column until it is under the ball, seen in the image."""
    image = obs["image"]
    ball = np.nonzero((image == Catch.BALL_COLOUR).all(-1))[1].mean()
    paddle = np.nonzero((image == Catch.PADDLE_COLOUR).all(-1))[1]
    return 0 if ball < paddle.min() else 2 if ball > paddle.max() else 1


def _episode_return(env, policy, seed):
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += reward
        done = terminated or truncated
    return total


TOY = ["toy-point_reach", "toy-catch", "toy-catch_small", "toy-catch_distract"]


@pytest.mark.parametrize("task", TOY)
def test_toy_spaces_and_steps(task):
    env = make_env(task)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)


@pytest.mark.parametrize("task", TOY)
def test_toy_deterministic_under_seed(task):
    def rollout(seed):
        env = make_env(task)
        env.action_space.seed(0)
        frames = [env.reset(seed=seed)[0]["image"]]
        frames += [env.step(env.action_space.sample())[0]["image"] for _ in range(2)]
        return np.stack(frames)

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert any(not np.array_equal(rollout(3), rollout(seed)) for seed in (4, 5, 6))


def test_point_reach_rewards_approach_and_target_then_truncates():
    env = make_env("toy-point_reach", action_repeat=1, time_limit=60)
    obs, _ = env.reset(seed=0)
    rewards, flags = [], []
    for _ in range(60):
        obs, reward, terminated, truncated, _ = env.step(_reach_policy(obs))
        rewards.append(reward)
        flags.append((terminated, truncated))
    assert rewards[0] < rewards[5] < 0.5 and rewards[-1] == 1.0
    assert flags[-1] == (False, True) and set(flags[:-1]) == {(False, False)}


def test_catch_terminates_with_plus_or_minus_one():
    env = make_env("toy-catch", action_repeat=1)
    obs, _ = env.reset(seed=0)
    rewards, terminated = [], False
    while not terminated:
        obs, reward, terminated, truncated, _ = env.step(_catch_policy(obs))
        rewards.append(reward)
    assert rewards[-1] == 1.0 and set(rewards[:-1]) == {0.0} and not truncated
    env.reset(seed=0)
    assert _episode_return(env, lambda obs: 1 + (1 - _catch_policy(obs)), seed=0) <= 0  # flee the ball
    assert {_episode_return(env, lambda obs: 1, seed) for seed in range(20)} == {1.0, -1.0}


@pytest.mark.parametrize("task", ["toy-catch_small", "toy-catch_distract"])
def test_catch_variants_keep_the_game_and_change_the_picture(task):
    """The same game as Catch (the scripted policy catches every ball, standing still does not),
    drawn with a 2x2-pixel ball or over a background that moves every step."""
    env = make_env(task, action_repeat=1)
    assert {_episode_return(env, _catch_policy, seed) for seed in range(20)} == {1.0}
    assert {_episode_return(env, lambda obs: 1, seed) for seed in range(20)} == {1.0, -1.0}
    obs, _ = env.reset(seed=0)
    ball = (obs["image"] == Catch.BALL_COLOUR).all(-1)
    if task == "toy-catch_small":
        assert ball.sum() == 4 and (obs["image"].sum(-1) > 0).sum() == 4 + 2 * 8 * 8  # ball + paddle, black elsewhere
    else:
        firsts, moved = [], []
        for seed in range(4):
            first = env.reset(seed=seed)[0]["image"]
            second = env.step(1)[0]["image"]
            background = ~((first == Catch.BALL_COLOUR).all(-1) | (first == Catch.PADDLE_COLOUR).all(-1))
            background &= ~((second == Catch.BALL_COLOUR).all(-1) | (second == Catch.PADDLE_COLOUR).all(-1))
            assert (first[background] < 255).all()  # nothing in the background looks like the ball
            firsts.append(first)
            moved.append(not np.array_equal(first[background], second[background]))
        assert sum(moved) >= 3  # it scrolls (a velocity of 0 has odds 1/81 per episode)
        assert not np.array_equal(firsts[0], firsts[1])  # a new texture every episode


@pytest.mark.parametrize(
    "task, policy, episodes, margin",
    [("toy-point_reach", _reach_policy, 3, 30.0), ("toy-catch", _catch_policy, 100, 1.0)],
)
def test_scripted_policy_beats_random(task, policy, episodes, margin):
    env = make_env(task)
    env.action_space.seed(0)
    good = np.mean([_episode_return(env, policy, seed) for seed in range(episodes)])
    rand = np.mean([_episode_return(env, lambda obs: env.action_space.sample(), seed) for seed in range(episodes)])
    assert good > rand + margin, (good, rand)


def test_dmc_pixels_with_action_repeat():
    env = make_env("dmc-cartpole_balance", action_repeat=2, seed=0)
    assert env.get_wrapper_attr("_max_episode_steps") == 500  # 1000 frames at action repeat 2
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    np.testing.assert_array_equal(obs["image"], env.reset(seed=0)[0]["image"])
    suite_env = env.unwrapped._env
    for step in range(1, 4):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and 0.0 <= reward <= 2.0
        assert not terminated and not truncated
        # Two control steps of the simulator per agent step, and both rewards summed: the pole
        # starts upright, where each control step pays almost 1.
        assert suite_env.physics.data.time == pytest.approx(2 * step * suite_env.control_timestep())
        assert reward > 1.5
    env.close()


class Frames(gym.Env):
    """Counts the frames it is stepped; pays the frame number; terminates at frame `end`."""

    observation_space = gym.spaces.Discrete(100)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, end: int):
        self.end, self.frames = end, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.frames = 0
        return 0, {}

    def step(self, action):
        self.frames += 1
        return self.frames, float(self.frames), self.frames == self.end, False, {}


def test_action_repeat_steps_repeat_frames_sums_rewards_and_stops_at_the_end():
    env = ActionRepeat(Frames(end=5), 3)
    env.reset()
    assert env.step(0) == (3, 1.0 + 2.0 + 3.0, False, False, {})
    assert env.unwrapped.frames == 3
    assert env.step(0) == (5, 4.0 + 5.0, True, False, {})  # the episode ends after 2 of 3 frames
    assert env.unwrapped.frames == 5
    with pytest.raises(ValueError, match=">= 1"):
        ActionRepeat(Frames(end=5), 0)


def test_factory_repeats_toy_actions():
    """make_env's action_repeat=3 on point_reach equals 3 steps of the bare task."""
    env = make_env("toy-point_reach", action_repeat=3, seed=0)
    bare = PointReach()
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(obs["image"], bare.reset(seed=1)[0]["image"])
    action = np.array([1.0, -0.5], np.float32)
    obs, reward, *_ = env.step(action)
    steps = [bare.step(action) for _ in range(3)]
    np.testing.assert_array_equal(obs["image"], steps[-1][0]["image"])
    assert reward == pytest.approx(sum(step[1] for step in steps)) and 0 < steps[0][1] < reward


def test_unknown_tasks_list_valid_names():
    with pytest.raises(ValueError, match="dmc-walker_walk") as error:
        make_env("dmc-walker_fly")  # a known suite lists its own tasks
    assert "dmc-ball_in_cup_catch" in str(error.value) and "toy-catch" not in str(error.value)
    with pytest.raises(ValueError, match="toy-point_reach") as error:
        make_env("gym-pong")  # an unknown suite lists every task
    assert "dmc_subtle-reacher_hard" in str(error.value)
    with pytest.raises(ValueError, match="walker_walk"):
        DMCEnv("walker", "fly")
    assert "dmc-ball_in_cup_catch" in available_tasks()


def test_dmc_without_gl_backend_explains_the_fix():
    code = (
        "import pytest; from wm.envs import make_env; make_env('toy-catch').reset(seed=0)\n"
        "with pytest.raises(RuntimeError, match='MUJOCO_GL=egl'): make_env('dmc-cartpole_balance')"
    )
    env = {**os.environ, "MUJOCO_GL": "disable"}  # dm_control loads, but has no renderer
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_vector_env_same_step_autoreset(asynchronous):
    envs = make_vector_env("toy-catch", num_envs=2, action_repeat=2, seed=0, asynchronous=asynchronous)
    obs, _ = envs.reset()
    assert obs["image"].shape == (2, 64, 64, 3)
    for _ in range(3):  # Catch lasts 6 frames: 3 agent steps at action repeat 2
        obs, reward, terminated, truncated, infos = envs.step(np.ones(2, np.int64))
    assert terminated.all() and set(reward) <= {1.0, -1.0}
    assert infos["_final_obs"].all()
    ball = np.array(Catch.BALL_COLOUR)
    for i in range(2):
        final = infos["final_obs"][i]["image"]
        assert (final[48:56] == ball).all(-1).any()  # the ball landed in the row above the paddle
        assert (obs["image"][i, :8] == ball).all(-1).any()  # the returned obs is already reset
    envs.close()


def test_gymnasium_make():
    env = gym.make("wm/toy-catch", action_repeat=1)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (64, 64, 3)
    assert env.step(1)[0]["image"].dtype == np.uint8
    assert "wm/dmc-walker_walk" in gym.registry and "wm/toy-point_reach" in gym.registry


@pytest.mark.parametrize("task, module, extra", [("crafter-reward", "crafter", "crafter"),
                                                 ("memory_maze-9x9", "gym", "memory-maze")])
def test_a_missing_optional_simulator_is_one_line_naming_its_extra(task, module, extra, tmp_path, monkeypatch, capsys):
    """The Crafter and Memory Maze simulators are extras; without one, building its task says which
    extra to install, and `python -m wm fit` refuses in one line before anything is made. Memory
    Maze's case hides the package it imports (gym), which names it where memory_maze is installed
    (CI's install) and the simulator itself where it is not (the README's plain `.[test]`)."""
    from wm.run.cli import main
    from wm.envs.base import MissingSimulator

    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    monkeypatch.delitem(sys.modules, "memory_maze", raising=False)
    with pytest.raises(MissingSimulator, match=rf"the {task.split('-')[0]} tasks need the '{extra}' extra.*"
                                               rf"pip install -e '\.\[{extra}\]'") as refused:
        make_env(task)
    simulator = task.split("-")[0]
    missing = module if importlib.util.find_spec(simulator) is not None else simulator
    assert "\n" not in str(refused.value) and f"no module '{missing}'" in str(refused.value)
    with pytest.raises(MissingSimulator):
        main(["fit", "--config", "configs/quickstart.yaml", "--env.task", task, "--run.root", str(tmp_path)])
    assert not any(tmp_path.iterdir())

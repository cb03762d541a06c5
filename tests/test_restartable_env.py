"""RestartingVectorEnv: NEXT_STEP autoreset, and a crashed, raising or hung env worker replaced mid-run
(real worker processes, real signals)."""

import functools
import os
import signal
import threading
import time

import gymnasium as gym
import numpy as np
import pytest

from wm.envs import Catch, RestartingVectorEnv, make_env, make_vector_env
from wm.envs.restartable import EnvWorkerError

# gymnasium reports a failed worker's traceback as a warning; here the failures are on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*ERROR:")

NEXT_STEP = gym.vector.AutoresetMode.NEXT_STEP
CELL = 8  # pixels per Catch grid cell at image size 64


class FailingCatch(gym.Wrapper):
    """toy-catch whose call number `fail_at` (resets and steps, from 1) raises, or hangs if `hang`;
    with a `once` file only the first env to get there fails (the file marks it), so its restart runs on."""

    def __init__(self, fail_at: int, once=None, hang: bool = False):
        super().__init__(make_env("toy-catch", action_repeat=1))
        self.fail_at, self.once, self.hang, self.calls = fail_at, once, hang, 0

    def _count_call(self):
        self.calls += 1
        if self.calls == self.fail_at and not (self.once and self.once.exists()):
            if self.once:
                self.once.touch()
            if self.hang:
                time.sleep(60)
            raise RuntimeError("simulated simulator failure")

    def reset(self, **kwargs):
        self._count_call()
        return super().reset(**kwargs)

    def step(self, action):
        self._count_call()
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {"success": reward > 0}  # as Meta-World reports it


def _ball_rows(obs):
    """The ball's grid row in each env's image: the number of steps into its Catch episode."""
    return np.array([np.nonzero((image == Catch.BALL_COLOUR).all(-1))[0][0] // CELL for image in obs["image"]])


def _step_checked(envs, actions, expected_rows):
    """One step, checking that every env not cut short (truncated) is where NEXT_STEP autoreset
    puts it; returns the step and the rows to expect next (row 0, a new episode, after an end)."""
    obs, reward, terminated, truncated, info = envs.step(actions)
    np.testing.assert_array_equal(_ball_rows(obs)[~truncated], expected_rows[~truncated])
    np.testing.assert_array_equal(reward[expected_rows == 0], 0.0)
    done = terminated | truncated
    return (obs, reward, terminated, truncated, info), np.where(done, 0, _ball_rows(obs) + 1)


def _catch_envs(fail_at, tmp_path=None, asynchronous=True, hang=False, timeout=None):
    """Env 0 is plain toy-catch, env 1 fails at `fail_at` (once, if tmp_path is given)."""
    once = None if tmp_path is None else tmp_path / "failed"
    env_fns = [functools.partial(make_env, "toy-catch", action_repeat=1), functools.partial(FailingCatch, fail_at, once, hang)]
    return RestartingVectorEnv(env_fns, "toy-catch", asynchronous, context="fork", timeout=timeout, seed=0)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_next_step_autoreset(asynchronous):
    envs = make_vector_env("toy-catch", 2, action_repeat=1, seed=0, asynchronous=asynchronous, autoreset_mode=NEXT_STEP)
    assert isinstance(envs, RestartingVectorEnv) and envs.metadata["autoreset_mode"] == NEXT_STEP
    assert envs.single_observation_space == make_env("toy-catch").observation_space
    assert envs.single_action_space == gym.spaces.Discrete(3)
    obs, _ = envs.reset(seed=0)
    assert obs["image"].shape == (2, 64, 64, 3) and obs["image"].dtype == np.uint8
    assert envs.observation_space.contains(obs)
    rows, ends = np.ones(2, int), 0
    for _ in range(20):  # Catch episodes last 6 steps
        (obs, reward, terminated, truncated, _), rows = _step_checked(envs, envs.action_space.sample(), rows)
        assert not truncated.any() and set(reward[terminated]) <= {1.0, -1.0}
        ends += terminated.sum()
    assert ends == 6 and envs.restarts == 0
    envs.close()


def test_killed_worker_is_replaced():
    envs = make_vector_env("toy-catch", 2, action_repeat=1, seed=0, autoreset_mode=NEXT_STEP)
    reference = make_env("toy-catch", action_repeat=1)  # env 0 alone, under the same seed and actions
    obs, _ = envs.reset(seed=0)
    np.testing.assert_array_equal(obs["image"][0], reference.reset(seed=0)[0]["image"])
    rows, reference_done = np.ones(2, int), False
    pid = envs.worker_pids()[1]
    for t in range(30):
        if t == 2:
            os.kill(pid, signal.SIGKILL)
        previous = obs
        actions = envs.action_space.sample()
        (obs, reward, terminated, truncated, info), rows = _step_checked(envs, actions, rows)
        if reference_done:
            expected, reference_done = reference.reset()[0], False
        else:
            expected, _, reference_done, _, _ = reference.step(actions[0])
        np.testing.assert_array_equal(obs["image"][0], expected["image"])
        assert terminated[0] == reference_done and not truncated[0]
        if t == 2:  # the killed env's episode ends, truncated, on its last observation
            np.testing.assert_array_equal(obs["image"][1], previous["image"][1])
            assert reward[1] == 0 and not terminated[1] and truncated[1]
            assert info["restarted"].tolist() == [False, True], "marked, so it is no real episode end"
        if t == 3:  # then a new episode starts
            assert _ball_rows(obs)[1] == 0 and not truncated[1]
    assert envs.restarts == 1 and envs.slot_restarts == [0, 1]
    assert "died, exit code -9" in envs.last_error and envs.worker_pids()[1] != pid
    envs.close()


@pytest.mark.parametrize("asynchronous", [True, False])
@pytest.mark.parametrize(
    "fail_at, cut_at", [(4, 2), (8, None)], ids=["mid-episode", "at-autoreset"]
)  # call 4: the third step; call 8: the reset after the 6-step episode, which needs no cut
def test_raising_env_is_restarted(tmp_path, asynchronous, fail_at, cut_at):
    envs = _catch_envs(fail_at, tmp_path, asynchronous)
    envs.reset(seed=0)
    rows = np.ones(2, int)
    for t in range(25):
        (_, reward, terminated, truncated, info), rows = _step_checked(envs, np.ones(2, int), rows)
        assert truncated.tolist() == [False, t == cut_at]
        if "success" in info:  # env 1's infos merged as gymnasium does: an array over envs, masked
            assert info["success"].dtype == bool and info["_success"].tolist() == [False, True]
            assert info["success"][1] == (reward[1] > 0)
    assert envs.restarts == 1 and envs.slot_restarts == [0, 1]
    assert envs.last_error == "env 1: RuntimeError: simulated simulator failure"
    envs.close()


@pytest.mark.parametrize("fail_at", [1, 2], ids=["reset", "step"])
def test_env_that_always_fails_stops_the_run(fail_at):
    envs = _catch_envs(fail_at)
    with pytest.raises(EnvWorkerError) as error:
        envs.reset(seed=0)
        for _ in range(10):
            envs.step(np.ones(2, int))
    message = str(error.value)
    assert "toy-catch" in message and "env worker 1 failed 3 times" in message
    assert "RuntimeError: simulated simulator failure" in message and "simulator install" in message
    assert envs.restarts == 2
    envs.close()


def test_hung_worker_times_out(tmp_path):
    envs = _catch_envs(3, tmp_path, hang=True, timeout=0.5)
    envs.reset(seed=0)
    start = time.perf_counter()
    rows = np.ones(2, int)
    for t in range(4):
        (_, _, _, truncated, _), rows = _step_checked(envs, np.ones(2, int), rows)
        assert truncated.tolist() == [False, t == 1]
    assert time.perf_counter() - start < 5 and envs.restarts == 1 and "timed out" in envs.last_error
    envs.close()


def test_close_with_a_dead_worker_does_not_hang():
    envs = make_vector_env("toy-catch", 2, action_repeat=1, seed=0, autoreset_mode=NEXT_STEP)
    envs.reset(seed=0)
    pids = envs.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    closing = threading.Thread(target=envs.close, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and envs.closed
    for pid in pids:  # both workers are gone, reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

"""A vector env that restarts a crashed env worker instead of ending the run.

A simulator worker can die mid-run (a segfault in MuJoCo or ALE, an OOM kill, a stray signal) or
raise from inside the env. gymnasium's AsyncVectorEnv then fails as a whole with a bare
BrokenPipeError or EOFError, and a long run stops for one lost episode. Here every env is its own
one-env gymnasium vector env (a slot): a slot that fails is replaced, its unfinished episode is cut
short as truncated, and the run goes on. An env that keeps failing is a broken install, not bad
luck, and stops the run with an error that says so.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

log = logging.getLogger(__name__)

RESTART_SEED_STRIDE = 10_000_019  # restart k of env i resets it with seed_i + k x stride


class EnvWorkerError(RuntimeError):
    """An env failed `max_consecutive_failures` times in a row: restarting it does not help."""


def _first(infos: dict) -> dict:
    """The info of env 0 of a one-env vector info (the inverse of VectorEnv._add_info)."""
    single = {}
    for key, value in infos.items():
        if not key.startswith("_") and infos[f"_{key}"][0]:
            value = _first(value) if isinstance(value, dict) else value[0]
            single[key] = value.item() if isinstance(value, np.generic) else value
    return single


def _describe(error: Exception, slot: gym.vector.VectorEnv | None) -> str:
    """The error's type and message; for a lost worker process, also its exit code (-9: killed,
    as by the out-of-memory killer; -11: segmentation fault)."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(slot, AsyncVectorEnv) and isinstance(error, (EOFError, BrokenPipeError, ConnectionResetError)):
        process = slot.processes[0]
        process.join(1)  # it is exiting: wait until it is reaped
        if process.exitcode is not None:
            text += f" (the worker process died, exit code {process.exitcode})"
    return text


def _discard(slot: gym.vector.VectorEnv) -> None:
    """Closes a failed slot without waiting on its worker, which may be dead or hung: it is killed."""
    if isinstance(slot, AsyncVectorEnv):
        for process in slot.processes:
            process.kill()
            process.join()
        for pipe in slot.parent_pipes:
            if pipe is not None:
                pipe.close()
        slot.closed = True  # closed by hand: its close() would talk to the dead worker
    else:
        with contextlib.suppress(Exception):
            slot.close()


class RestartingVectorEnv(gym.vector.VectorEnv):
    """One env per factory, each in its own worker process when asynchronous, with NEXT_STEP autoreset.

    Behaves as gymnasium's vector envs under AutoresetMode.NEXT_STEP: the step after an episode's
    last one returns the next episode's first observation and ignores that env's action. When env
    i fails in `reset` or `step` (its worker died, the env raised, or it did not answer within
    `timeout` seconds of being awaited), its slot is killed and rebuilt from the same factory, then
    reset with seed_i + RESTART_SEED_STRIDE x (restarts of env i), where seed_i is seed + i of the
    last seeded reset (or of `seed`). That step returns for env i its previous observation, reward
    0, truncated and info "restarted", ending its unfinished episode in the replay buffer (callers
    leave it out of episode statistics); the next step returns the
    new episode's first observation, as after any episode end. A failed reset returns the rebuilt
    env's first observation at once. After `max_consecutive_failures` failures of one env without
    a successful step in between, EnvWorkerError names the task (`name`), the env and its error.

    Attributes: `restarts` (in all), `slot_restarts` (per env), `last_error` (text, or None).
    Actions are batched arrays (Box or Discrete action spaces).
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        name: str = "env",
        asynchronous: bool = True,
        context: str | None = None,
        timeout: float | None = None,
        max_consecutive_failures: int = 3,
        seed: int | None = None,
    ):
        self.env_fns, self.name, self.asynchronous, self.context = list(env_fns), name, asynchronous, context
        self.timeout, self.max_consecutive_failures = timeout, max_consecutive_failures
        self.num_envs = len(self.env_fns)
        self.seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        self.restarts, self.slot_restarts = 0, [0] * self.num_envs
        self.failures = [0] * self.num_envs  # failures of each env since its last successful step
        self.last_error: str | None = None
        self.slots = self._make_slots()
        first = self.slots[0]
        self.single_observation_space, self.single_action_space = first.single_observation_space, first.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = {**first.metadata, "autoreset_mode": AutoresetMode.NEXT_STEP}
        self.render_mode = first.render_mode
        self.observations: list = [None] * self.num_envs  # the last observation of each env
        self.ended = np.zeros(self.num_envs, bool)  # whose last step ended its episode
        self.pending: list[tuple | None] = [None] * self.num_envs  # a restarted env's (first obs, info)

    def _make_slots(self) -> list[gym.vector.VectorEnv]:
        """Every env's slot. Worker slots start side by side: each constructor waits for its worker
        to build the env (a DMC env: seconds of simulator and renderer start-up), so threads let
        the workers build theirs at the same time. If one fails, the others are closed."""
        forks = (self.context or multiprocessing.get_start_method()) == "fork"  # forking from threads can deadlock
        if not self.asynchronous or self.num_envs == 1 or forks:
            return [self._make_slot(i) for i in range(self.num_envs)]
        with ThreadPoolExecutor(self.num_envs) as pool:
            futures = [pool.submit(self._make_slot, i) for i in range(self.num_envs)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            for future in futures:
                if future.exception() is None:
                    _discard(future.result())
            raise errors[0]
        return [f.result() for f in futures]

    def _make_slot(self, i: int) -> gym.vector.VectorEnv:
        if self.asynchronous:
            return AsyncVectorEnv([self.env_fns[i]], context=self.context, autoreset_mode=AutoresetMode.NEXT_STEP)
        return SyncVectorEnv([self.env_fns[i]], autoreset_mode=AutoresetMode.NEXT_STEP)

    def worker_pids(self) -> list[int]:
        """The worker process id of each env (asynchronous only)."""
        return [slot.processes[0].pid for slot in self.slots]

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is not None:
            self.seeds = list(seed) if isinstance(seed, Sequence) else [seed + i for i in range(self.num_envs)]
        calls = {i: {"seed": None if seed is None else self.seeds[i], "options": options} for i in range(self.num_envs)}
        results, errors = self._call("reset", calls)
        self.pending = [None] * self.num_envs
        resets = [self._restart(i, errors[i]) if i in errors else self._unbatch(results[i]) for i in range(self.num_envs)]
        observations, _, _, _, infos = self._batch([(obs, 0.0, False, False, info) for obs, info in resets])
        return observations, infos

    def step(self, actions):
        actions = np.asarray(actions)
        calls = {i: {"actions": actions[i : i + 1]} for i in range(self.num_envs) if self.pending[i] is None}
        results, errors = self._call("step", calls)
        return self._batch([self._outcome(i, results, errors) for i in range(self.num_envs)])

    def _outcome(self, i: int, results: dict, errors: dict) -> tuple:
        """Env i's (obs, reward, terminated, truncated, info) of this step."""
        if i in results:
            self.failures[i] = 0
            return self._unbatch(results[i])
        if i in errors:
            self.pending[i] = self._restart(i, errors[i])
            if not self.ended[i]:  # its episode ends here; the new one starts on the next step
                return self.observations[i], 0.0, False, True, {"restarted": True}
        observation, info = self.pending[i]  # the new episode starts; the action is ignored
        self.pending[i] = None
        return observation, 0.0, False, False, info

    def _call(self, method: str, calls: dict[int, dict]) -> tuple[dict, dict]:
        """Runs `method` ("reset" or "step") with the given arguments on each slot keyed in `calls`, all
        started before any is awaited; returns {slot: its one-env result}, {slot: what it raised}."""
        results, errors = {}, {}
        if self.asynchronous:
            for i, kwargs in calls.items():
                try:
                    getattr(self.slots[i], f"{method}_async")(**kwargs)
                except Exception as e:
                    errors[i] = e
        for i, kwargs in calls.items():
            if i not in errors:
                slot = self.slots[i]
                try:
                    if self.asynchronous:
                        results[i] = getattr(slot, f"{method}_wait")(timeout=self.timeout)
                    else:
                        results[i] = getattr(slot, method)(**kwargs)
                except Exception as e:
                    errors[i] = e
        return results, errors

    def _restart(self, i: int, error: Exception) -> tuple:
        """Replaces slot i, which failed with `error`, by a fresh one; returns its reset (obs, info)."""
        failed = self.slots[i]  # what raised `error`: a slot, or None when building one did
        while True:
            self.failures[i] += 1
            description = _describe(error, failed)
            self.last_error = f"env {i}: {description}"
            _discard(self.slots[i])
            if self.failures[i] >= self.max_consecutive_failures:
                raise EnvWorkerError(
                    f"{self.name}: env worker {i} failed {self.failures[i]} times in a row, last with "
                    f"{description}. An env that fails again after every restart is broken, "
                    f"not unlucky: check the simulator install and that the env runs alone (make_env("
                    f"{self.name!r}), reset and step it); a worker's traceback is logged above."
                ) from error
            self.restarts += 1
            self.slot_restarts[i] += 1
            seed = None if self.seeds[i] is None else self.seeds[i] + RESTART_SEED_STRIDE * self.slot_restarts[i]
            log.warning("%s: restarting env %d with seed %s after %s", self.name, i, seed, self.last_error)
            try:
                self.slots[i] = failed = self._make_slot(i)
            except Exception as e:
                error, failed = e, None
                continue
            results, errors = self._call("reset", {i: {"seed": seed}})
            if i in results:
                return self._unbatch(results[i])
            error = errors[i]

    def _unbatch(self, result: tuple) -> tuple:
        """A one-env (obs, ..., info) result as one env's values."""
        observations, *values, infos = result
        return next(iterate(self.observation_space, observations)), *(v[0] for v in values), _first(infos)

    def _batch(self, steps: list[tuple]) -> tuple:
        """The envs' (obs, reward, terminated, truncated, info) as a vector env's; remembers the obs."""
        observations, rewards, terminated, truncated, infos = zip(*steps)
        self.observations = list(observations)
        self.ended = np.array(terminated, bool) | np.array(truncated, bool)
        info = {}
        for i, env_info in enumerate(infos):
            info = self._add_info(info, env_info, i)
        space = self.single_observation_space
        batch = concatenate(space, observations, create_empty_array(space, self.num_envs))
        return batch, np.array(rewards, np.float64), np.array(terminated, bool), np.array(truncated, bool), info

    def close_extras(self, **kwargs) -> None:
        for slot in self.slots:
            try:
                slot.close()
            except Exception:  # a dead worker: its pipe is broken
                _discard(slot)

"""Task factory for the pixel environments, and their gymnasium registration as "wm/<task>".

Task names: "toy-point_reach", "toy-catch" and "dmc-<domain>_<task>" (e.g. "dmc-walker_walk").
"""

from __future__ import annotations

import functools
import math
import warnings

import gymnasium as gym
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import TimeLimit

from wm.envs.dmc import DMCEnv, dmc_tasks
from wm.envs.toy import TOY_TASKS, Catch, PointReach
from wm.envs.wrappers import ActionRepeat

__all__ = [
    "ActionRepeat",
    "Catch",
    "DMCEnv",
    "PointReach",
    "available_tasks",
    "make_env",
    "make_vector_env",
]


def available_tasks() -> list[str]:
    """Every task name make_env accepts."""
    return [f"toy-{name}" for name in TOY_TASKS] + [f"dmc-{name}" for name in dmc_tasks()]


def make_env(
    task: str,
    action_repeat: int = 2,
    time_limit: int | None = None,
    seed: int | None = None,
    image_size: int = 64,
) -> gym.Env:
    """Builds a task with action repeat and a time limit counted in agent steps (after the repeat).

    time_limit defaults to the task's episode length divided by the repeat (DMC: 1000 // action_repeat;
    Catch ends itself). A seed resets the env and seeds its action space once, so it is deterministic.
    """
    kind, _, name = task.partition("-")
    if kind == "toy" and name in TOY_TASKS:
        env_cls = TOY_TASKS[name]
        env = ActionRepeat(env_cls(image_size), action_repeat)
    elif kind == "dmc" and name in (suite_tasks := dmc_tasks()):
        env_cls = DMCEnv
        env = DMCEnv(*suite_tasks[name], image_size=image_size, action_repeat=action_repeat)
    else:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(available_tasks())}")
    if time_limit is None and env_cls.episode_steps is not None:
        time_limit = math.ceil(env_cls.episode_steps / action_repeat)
    if time_limit is not None:
        env = TimeLimit(env, time_limit)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_vector_env(
    task: str,
    num_envs: int,
    action_repeat: int = 2,
    seed: int | None = None,
    time_limit: int | None = None,
    image_size: int = 64,
    asynchronous: bool = True,
    autoreset_mode: AutoresetMode = AutoresetMode.SAME_STEP,
) -> gym.vector.VectorEnv:
    """Runs num_envs copies of a task (env i seeded seed + i), in worker processes when asynchronous.

    Autoreset is explicit. SAME_STEP (default): when an episode ends, step() already returns the
    next episode's first observation and puts the last one in infos["final_obs"] (masked by
    infos["_final_obs"]). NEXT_STEP: the step after the last one resets that env, ignoring its
    action, which is the one-row-per-step layout of the replay buffer.
    DMC workers start by forkserver, as a forked copy of a process holding a GL context is unsafe.
    """
    env_fns = [
        functools.partial(
            make_env,
            task,
            action_repeat=action_repeat,
            time_limit=time_limit,
            seed=None if seed is None else seed + index,
            image_size=image_size,
        )
        for index in range(num_envs)
    ]
    if num_envs == 1 or not asynchronous:
        return SyncVectorEnv(env_fns, autoreset_mode=autoreset_mode)
    context = "forkserver" if task.startswith("dmc-") else "fork"
    return AsyncVectorEnv(env_fns, context=context, autoreset_mode=autoreset_mode)


def _register() -> None:
    """Registers every task as "wm/<task>"; DMC ones only where dm_control can load."""
    try:
        tasks = available_tasks()
    except RuntimeError as e:
        warnings.warn(f"DMC tasks not registered: {e}", stacklevel=2)
        tasks = [f"toy-{name}" for name in TOY_TASKS]
    for task in tasks:
        gym.register(f"wm/{task}", entry_point="wm.envs:make_env", kwargs={"task": task})


_register()

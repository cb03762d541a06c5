"""Task factory for the pixel environments, and their gymnasium registration as "wm/<task>".

Task names are "<suite>-<name>":
  toy-point_reach, toy-catch                       built-in numpy tasks, no simulator
  toy-catch_small, toy-catch_distract              Catch with a 2x2-pixel ball / a moving background
  dmc-<domain>_<task>          e.g. dmc-walker_walk DeepMind Control from pixels
  dmc_proprio-<domain>_<task>  e.g. dmc_proprio-walker_walk  DeepMind Control from its state vector
  dmc_subtle-<domain>_<task>   e.g. dmc_subtle-reacher_hard  (R2-Dreamer's shrunk objects)
  dmc_distracting-<domain>_<task>                  DMC with video backgrounds
  atari-<game>                 e.g. atari-pong     the 26 games of Atari 100k
  crafter-reward                                   Crafter, its 22 achievements logged
  memory_maze-<size>           e.g. memory_maze-9x9  Memory Maze, 9x9 to 15x15
  metaworld-<task>             e.g. metaworld-reach-v3  the 50 tasks of Meta-World MT1

Imports nothing else of wm: env worker processes load this package and no more.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import TimeLimit

from wm.envs.ale import ATARI_GAMES, AtariEnv
from wm.envs.crafter import CrafterEnv
from wm.envs.distracting import DistractingDMCEnv
from wm.envs.dmc import DMCEnv, dmc_tasks
from wm.envs.dmc_proprio import DMCProprioEnv
from wm.envs.dmc_subtle import SUBTLE_TASKS, DMCSubtleEnv
from wm.envs.memory_maze import MAZE_SIZES, MemoryMazeEnv
from wm.envs.meta_world import MetaWorldEnv, metaworld_tasks
from wm.envs.restartable import RestartingVectorEnv
from wm.envs.toy import TOY_TASKS, Catch, PointReach
from wm.envs.wrappers import ActionRepeat

__all__ = [
    "ActionRepeat",
    "AtariEnv",
    "CrafterEnv",
    "Catch",
    "DMCEnv",
    "DMCProprioEnv",
    "DMCSubtleEnv",
    "DistractingDMCEnv",
    "MemoryMazeEnv",
    "MetaWorldEnv",
    "PointReach",
    "RestartingVectorEnv",
    "SUITES",
    "available_tasks",
    "make_env",
    "make_vector_env",
]


@dataclass(frozen=True)
class Suite:
    """A family of tasks: its task names and how to build one with the action repeat applied.

    `build(name, image_size, action_repeat, video_dir, split)`; the built env's `episode_steps`
    (environment frames, None if episodes end themselves) sets the default time limit.
    """

    tasks: Callable[[], list[str]]
    build: Callable[..., gym.Env]


def _toy(name, image_size, action_repeat, video_dir, split):
    return ActionRepeat(TOY_TASKS[name](image_size), action_repeat)


def _dmc(name, image_size, action_repeat, video_dir, split):
    return DMCEnv(*dmc_tasks()[name], image_size=image_size, action_repeat=action_repeat)


def _dmc_proprio(name, image_size, action_repeat, video_dir, split):
    return DMCProprioEnv(*dmc_tasks()[name], action_repeat=action_repeat, image_size=image_size)


def _dmc_subtle(name, image_size, action_repeat, video_dir, split):
    return DMCSubtleEnv(name, image_size=image_size, action_repeat=action_repeat)


def _dmc_distracting(name, image_size, action_repeat, video_dir, split):
    return DistractingDMCEnv(*dmc_tasks()[name], video_dir=video_dir, split=split, image_size=image_size,
                             action_repeat=action_repeat)


def _atari(name, image_size, action_repeat, video_dir, split):
    return AtariEnv(name, image_size=image_size, action_repeat=action_repeat)


def _crafter(name, image_size, action_repeat, video_dir, split):
    return ActionRepeat(CrafterEnv(image_size), action_repeat)


def _memory_maze(name, image_size, action_repeat, video_dir, split):
    return ActionRepeat(MemoryMazeEnv(name, image_size), action_repeat)


def _metaworld(name, image_size, action_repeat, video_dir, split):
    return MetaWorldEnv(name, image_size=image_size, action_repeat=action_repeat)


SUITES: dict[str, Suite] = {
    "toy": Suite(lambda: list(TOY_TASKS), _toy),
    "dmc": Suite(lambda: list(dmc_tasks()), _dmc),
    "dmc_proprio": Suite(lambda: list(dmc_tasks()), _dmc_proprio),
    "dmc_subtle": Suite(lambda: list(SUBTLE_TASKS), _dmc_subtle),
    "dmc_distracting": Suite(lambda: list(dmc_tasks()), _dmc_distracting),
    "atari": Suite(lambda: list(ATARI_GAMES), _atari),
    "metaworld": Suite(metaworld_tasks, _metaworld),
    "crafter": Suite(lambda: ["reward"], _crafter),
    "memory_maze": Suite(lambda: list(MAZE_SIZES), _memory_maze),
}


def available_tasks(suites: list[str] | None = None) -> list[str]:
    """Every task name make_env accepts (of the given suites)."""
    return [f"{suite}-{name}" for suite in (suites or SUITES) for name in SUITES[suite].tasks()]


def make_env(
    task: str,
    action_repeat: int = 2,
    time_limit: int | None = None,
    seed: int | None = None,
    image_size: int = 64,
    video_dir: str | None = None,
    split: str = "train",
) -> gym.Env:
    """Builds a task with action repeat and a time limit counted in agent steps (after the repeat).

    time_limit defaults to the task's episode length divided by the repeat (DMC: 1000 // action_repeat;
    Catch ends itself). A seed resets the env and seeds its action space once, so it is deterministic.
    `video_dir` and `split` ("train" or "eval") choose the background videos of dmc_distracting.
    """
    suite, _, name = task.partition("-")
    if suite not in SUITES or name not in SUITES[suite].tasks():
        known = available_tasks([suite]) if suite in SUITES else available_tasks()
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(known)}")
    env = SUITES[suite].build(name, image_size, action_repeat, video_dir, split)
    episode_steps = env.unwrapped.episode_steps
    if time_limit is None and episode_steps is not None:
        time_limit = math.ceil(episode_steps / action_repeat)
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
    video_dir: str | None = None,
    split: str = "train",
) -> gym.vector.VectorEnv:
    """Runs num_envs copies of a task (env i seeded seed + i), in worker processes when asynchronous.

    Autoreset is explicit. SAME_STEP (default): when an episode ends, step() already returns the
    next episode's first observation and puts the last one in infos["final_obs"] (masked by
    infos["_final_obs"]). NEXT_STEP: the step after the last one resets that env, ignoring its
    action, which is the one-row-per-step layout of the replay buffer; it gives a
    RestartingVectorEnv, which replaces a crashed env worker (its episode ends truncated) instead of
    failing the run. SAME_STEP gives a plain gymnasium vector env, as RestartingVectorEnv has no
    SAME_STEP mode.
    Simulator workers start by forkserver, as a forked copy of a process holding a GL context is
    unsafe, from a server that has loaded `wm.envs` and nothing of the trainer; the numpy toy
    tasks fork. A RestartingVectorEnv starts its workers side by side.
    """
    env_fns = [
        functools.partial(
            make_env,
            task,
            action_repeat=action_repeat,
            time_limit=time_limit,
            seed=None if seed is None else seed + index,
            image_size=image_size,
            video_dir=video_dir,
            split=split,
        )
        for index in range(num_envs)
    ]
    asynchronous = asynchronous and num_envs > 1
    context = "fork" if task.startswith("toy-") else "forkserver"
    if asynchronous and context == "forkserver":
        # The fork server preloads only the envs: its default, the main module (`python -m wm`),
        # would give every worker a copy of the trainer's torch and Lightning too.
        multiprocessing.set_forkserver_preload(["wm.envs"])
    if autoreset_mode == AutoresetMode.NEXT_STEP:
        return RestartingVectorEnv(env_fns, name=task, asynchronous=asynchronous, context=context, seed=seed)
    if not asynchronous:
        return SyncVectorEnv(env_fns, autoreset_mode=autoreset_mode)
    return AsyncVectorEnv(env_fns, context=context, autoreset_mode=autoreset_mode)


def _register() -> None:
    """Registers every task as "wm/<task>", skipping a suite whose simulator cannot load here."""
    for suite in SUITES:
        try:
            tasks = available_tasks([suite])
        except (RuntimeError, ImportError) as e:  # a simulator that is missing or cannot load here
            warnings.warn(f"{suite} tasks not registered: {e}", stacklevel=2)
            continue
        for task in tasks:
            gym.register(f"wm/{task}", entry_point="wm.envs:make_env", kwargs={"task": task})


_register()

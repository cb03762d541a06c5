"""Greedy evaluation episodes, shared by evaluations during a fit and `wm test`.

Episodes run in parallel envs under NEXT_STEP autoreset; each env plays episodes until the wanted
number has started, so no episode is biased towards the short ones that finish first. An episode
that a restart of its worker cut short is played again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np


ACHIEVEMENT = "achievement/"  # info keys of per-episode flags an env reports (Crafter's achievements)


@dataclass
class Episode:
    """One finished episode: its return, length, success (None for a task with no notion of
    success, whose env reports none), the achievements its env reports (name -> unlocked), and if it
    was recorded its frames and the actions that led to them (actions[0], before the first frame, is
    zeros)."""

    ret: float
    length: int
    success: bool | None
    achievements: dict[str, bool] = field(default_factory=dict)
    frames: list[np.ndarray] | None = None
    actions: list[np.ndarray] | None = None


def success_rate(successes: list[bool | None]) -> dict[str, float]:
    """{"success": the fraction of episodes that succeeded}, or {} for a task with no notion of success."""
    known = [s for s in successes if s is not None]
    return {"success": float(np.mean(known))} if known else {}


def achievement_rates(episodes: list[dict[str, bool]]) -> dict[str, float]:
    """Per achievement, the fraction of episodes that unlocked it."""
    names = sorted({name for achievements in episodes for name in achievements})
    return {name: float(np.mean([a.get(name, False) for a in episodes])) for name in names}


class EpisodeStats:
    """Return, length, success and achievements of each env's running episode, under NEXT_STEP
    autoreset (the step after an episode's end only resets, so its reward is not the episode's)."""

    def __init__(self, num_envs: int):
        self.total, self.length, self.success = np.zeros(num_envs), np.zeros(num_envs, int), np.zeros(num_envs, bool)
        self.reports_success = False  # whether the env says whether an episode succeeded (Meta-World)
        self.achieved: dict[str, np.ndarray] = {}  # achievement -> whether each env's episode unlocked it

    def step(self, reward, first, done, info) -> list[tuple[int, tuple[float, int, bool | None, dict[str, bool]] | None]]:
        """Add one vector step; returns (env, (return, length, success, achievements)) for each
        episode that ended with it, with None for one a restart of its worker cut short; success
        is None where the env reports none."""
        live = ~first
        self.total += np.where(live, reward, 0.0)
        self.length += live
        if "success" in info:
            self.reports_success = True
            self.success |= np.asarray(info["success"], bool) & live
        for key in (k for k in info if k.startswith(ACHIEVEMENT)):
            achieved = self.achieved.setdefault(key.removeprefix(ACHIEVEMENT), np.zeros_like(self.success))
            achieved |= np.asarray(info[key], bool) & live
        restarted = np.broadcast_to(np.asarray(info.get("restarted", False), bool), live.shape)
        ended = []
        for i in np.flatnonzero(done & live):
            achievements = {name: bool(achieved[i]) for name, achieved in self.achieved.items()}
            success = bool(self.success[i]) if self.reports_success else None
            episode = (float(self.total[i]), int(self.length[i]), success, achievements)
            ended.append((int(i), None if restarted[i] else episode))
            self.total[i], self.length[i], self.success[i] = 0.0, 0, False
            for achieved in self.achieved.values():
                achieved[i] = False
        return ended


def play_episodes(envs: gym.vector.VectorEnv, act: Callable, count: int, seed: int, record: int = 0,
                  stop: Callable[[], bool] = lambda: False, to_env: Callable = lambda action: action) -> Iterator[Episode]:
    """`count` episodes of the policy `act(obs, is_first, state) -> (action, state)`, whose actions
    `to_env` turns into what the envs take, yielded as they finish. The first `record` episodes to
    start keep their image frames (the first observation to the last) and actions. Returns early,
    short of `count`, once `stop()` is true."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed)
    first, done, state = np.ones(n, bool), np.zeros(n, bool), None
    running = np.arange(n) < count  # whether env i's current episode counts
    started = int(running.sum())
    stats = EpisodeStats(n)
    recording: list[list[np.ndarray] | None] = [None] * n  # frames of env i's episode, if recorded
    actions: list[list[np.ndarray] | None] = [None] * n
    recorded = 0
    if "image" in obs:
        for i in range(min(record, count, n)):
            recording[i], recorded = [obs["image"][i]], recorded + 1
    finished = 0
    while finished < count:
        if stop():
            return
        action, state = act(obs, first, state)
        obs, reward, terminated, truncated, info = envs.step(to_env(action))
        first, done = done, terminated | truncated  # NEXT_STEP: the step after an end resets
        for i, frames in enumerate(recording):
            if frames is not None and not first[i]:
                if actions[i] is None:
                    actions[i] = [np.zeros_like(action[i])]
                frames.append(obs["image"][i])
                actions[i].append(action[i])
        for i in np.flatnonzero(first):
            running[i] = started < count
            started += running[i]
            if running[i] and recorded < record and "image" in obs:
                recording[i], recorded = [obs["image"][i]], recorded + 1
        for i, episode in stats.step(reward, first, done, info):
            frames, recording[i], taken, actions[i] = recording[i], None, actions[i], None
            if not running[i]:
                continue
            running[i] = False
            if episode is None:  # cut short by a restart of its worker: play it again
                started -= 1
                recorded -= frames is not None
                continue
            finished += 1
            yield Episode(*episode, frames=frames, actions=taken)

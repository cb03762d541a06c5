"""Crafter (Hafner 2021): an open-world survival game with 22 achievements, from 64x64 pixels.

Reward +1 the first time an achievement is unlocked in an episode, and +-0.1 per health point
gained or lost. Episodes end when the player dies (terminal) or after 10,000 steps (truncated).
Every step reports `achievement/<name>`: whether the episode has unlocked it so far, which the
env loop turns into per-achievement success rates and the Crafter score.

`crafter` is an optional extra (`pip install -e '.[crafter]'`), imported only when an env is built:
it imports the retired `gym` package where one is installed (memory-maze needs it), which prints a
notice.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from wm.envs.base import PixelEnv, import_simulator

CRAFTER_ACHIEVEMENTS = (  # crafter.constants.achievements, in its order
    "collect_coal", "collect_diamond", "collect_drink", "collect_iron", "collect_sapling", "collect_stone",
    "collect_wood", "defeat_skeleton", "defeat_zombie", "eat_cow", "eat_plant", "make_iron_pickaxe",
    "make_iron_sword", "make_stone_pickaxe", "make_stone_sword", "make_wood_pickaxe", "make_wood_sword",
    "place_furnace", "place_plant", "place_stone", "place_table", "wake_up",
)


def crafter_score(rates: list[float]) -> float:
    """Crafter's score, in percent: the geometric mean of the achievements' success rates (as
    percentages), shifted by 1 so an achievement never unlocked does not zero it."""
    percent = 100.0 * np.asarray(rates, float)
    return float(np.exp(np.log1p(percent).mean()) - 1.0)


class CrafterEnv(PixelEnv):
    """Crafter with its 17 discrete actions; a seeded reset starts crafter's own world sequence
    from that seed."""

    episode_steps = None  # crafter ends its episodes itself

    def __init__(self, image_size: int = 64) -> None:
        crafter = import_simulator("crafter", "crafter", "crafter")
        super().__init__(image_size)
        self._size = image_size
        self._make = crafter.Env
        self._env = crafter.Env(size=(image_size, image_size))
        self.action_space = spaces.Discrete(len(crafter.constants.actions))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._env = self._make(size=(self._size, self._size), seed=seed)
        return self._observe(self._env.reset()), {}

    def step(self, action):
        frame, reward, done, info = self._env.step(int(action))
        terminated = bool(done and info["discount"] == 0)
        unlocked = {f"achievement/{name}": count > 0 for name, count in info["achievements"].items()}
        return self._observe(frame), float(reward), terminated, bool(done and not terminated), unlocked

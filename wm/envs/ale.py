"""Atari 100k from pixels (docs/algorithm.md §3): repeat 4 with a max over the last two frames, up to 30 no-ops
at reset, no sticky actions, the minimal action set, 64x64 RGB; losing a life is not terminal."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from PIL import Image

from wm.envs.base import PixelEnv

ATARI_GAMES = (
    "alien", "amidar", "assault", "asterix", "bank_heist", "battle_zone", "boxing", "breakout", "chopper_command",
    "crazy_climber", "demon_attack", "freeway", "frostbite", "gopher", "hero", "jamesbond", "kangaroo", "krull",
    "kung_fu_master", "ms_pacman", "pong", "private_eye", "qbert", "road_runner", "seaquest", "up_n_down",
)
NOOP = 0  # index of NOOP in every minimal action set


def ale_id(game: str) -> str:
    """"ms_pacman" -> "ALE/MsPacman-v5"."""
    return "ALE/" + "".join(word.capitalize() for word in game.split("_")) + "-v5"


def resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Area-averaging downscale (PIL's box filter) to size x size."""
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX))


class AtariEnv(PixelEnv):
    """One Atari 100k game; `action_repeat` emulator frames per step, observing the pixel-wise
    max of the last two (sprites that flicker between frames stay visible)."""

    episode_steps = 108_000  # emulator frames: the usual 30-minute cap, as a truncation

    def __init__(self, game: str, image_size: int = 64, action_repeat: int = 4, noops: int = 30) -> None:
        if game not in ATARI_GAMES:
            raise ValueError(f"unknown Atari 100k game {game!r}; valid: {', '.join(ATARI_GAMES)}")
        if action_repeat < 1:
            raise ValueError(f"action repeat must be >= 1, got {action_repeat}")
        import ale_py

        gym.register_envs(ale_py)
        super().__init__(image_size)
        self._env = gym.make(ale_id(game), frameskip=1, repeat_action_probability=0.0, full_action_space=False,
                             max_num_frames_per_episode=self.episode_steps)
        self.ale = self._env.unwrapped.ale
        self.action_space = self._env.action_space
        self._size, self._repeat, self._noops = image_size, action_repeat, noops

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        frame, info = self._env.reset(seed=None if seed is None else int(self.np_random.integers(2**31)))
        for _ in range(int(self.np_random.integers(0, self._noops + 1))):
            frame, _, terminated, truncated, info = self._env.step(NOOP)
            if terminated or truncated:
                frame, info = self._env.reset()
        return self._observe(resize(frame, self._size)), info

    def step(self, action):
        total, frames = 0.0, []
        for _ in range(self._repeat):
            frame, reward, terminated, truncated, info = self._env.step(int(action))
            total += float(reward)
            frames = [*frames[-1:], frame]
            if terminated or truncated:
                break
        return self._observe(resize(np.max(frames, axis=0), self._size)), total, terminated, truncated, info

    def close(self) -> None:
        self._env.close()

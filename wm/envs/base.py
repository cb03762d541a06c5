"""Shared base of the pixel environments: every task observes {"image": uint8 (H, W, 3)}."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class MissingSimulator(ImportError):
    """A suite's simulator is an optional extra of wm that is not installed here."""


def import_simulator(module: str, extra: str, suite: str):
    """`module`, or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # the simulator, or a package it imports (memory_maze: gym)
        raise MissingSimulator(f"the {suite} tasks need the {extra!r} extra, which is not installed here (no module "
                               f"{e.name!r}): pip install -e '.[{extra}]' in the wm repository") from None


class PixelEnv(gym.Env):
    """Declares the image observation space and keeps the last frame, so render() costs nothing."""

    metadata = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"

    def __init__(self, image_size: int) -> None:
        self.observation_space = spaces.Dict(
            {"image": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)}
        )
        self._frame: np.ndarray | None = None

    def _observe(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        self._frame = frame
        return {"image": frame}

    def render(self) -> np.ndarray | None:
        return self._frame

    def true_state(self) -> dict[str, np.ndarray]:
        """The simulator's state behind the current observation, in named groups of float vectors
        (what a probe of the latent state is scored against: wm.probe)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its true state")

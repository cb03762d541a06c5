"""Shared base of the pixel environments: every task observes {"image": uint8 (H, W, 3)}."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EnvSpec:
    """What the model must be built for: observation shapes and the action space."""

    observation_shapes: dict[str, tuple[int, ...]]
    action_dim: int
    discrete: bool


def env_spec(env: gym.Env) -> EnvSpec:
    obs_space, act_space = env.observation_space, env.action_space
    shapes = {k: tuple(int(d) for d in space.shape) for k, space in obs_space.spaces.items()}
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvSpec(shapes, int(act_space.n), True)
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return EnvSpec(shapes, int(act_space.shape[0]), False)
    raise ValueError(f"unsupported action space {act_space}: use Box(-1, 1, (A,)) or Discrete(n)")

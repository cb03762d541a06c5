"""Memory Maze (Pasukonis et al. 2022): find the targets of a given colour in a random 3D maze
from first-person 64x64 pixels; rewards +1 per target reached, and the maze must be remembered to
find the next one fast. Episodes end by truncation: 1000 steps for 9x9 (4 actions per second).

`memory_maze` is an optional extra (`pip install -e '.[memory-maze]'`, with the retired `gym`
package that it imports to register its own gym envs), imported only when a maze is built; it
renders with MuJoCo like dm_control.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from wm.envs.base import PixelEnv, import_simulator
from wm.envs.dmc import gl_error

MAZE_SIZES = {"9x9": 1000, "11x11": 2000, "13x13": 3000, "15x15": 4000}  # size -> steps per episode


class MemoryMazeEnv(PixelEnv):
    """A maze of `size` ("9x9" ... "15x15") with its 6 discrete actions (noop, forward, left,
    right, forward-left, forward-right); the target colour is drawn into the image's border, as
    in the paper's standard image-only setting. A seeded reset builds the maze sequence of that seed."""

    def __init__(self, size: str, image_size: int = 64) -> None:
        if size not in MAZE_SIZES:
            raise ValueError(f"unknown Memory Maze size {size!r}; valid: {', '.join(MAZE_SIZES)}")
        super().__init__(image_size)
        self.episode_steps = MAZE_SIZES[size]
        self._size, self._image_size = size, image_size
        self._env = self._build(None)
        self.action_space = spaces.Discrete(int(self._env.action_spec().num_values))

    def _build(self, seed: int | None):
        import_simulator("memory_maze", "memory-maze", "memory_maze")
        try:
            from memory_maze import tasks
        except Exception as e:  # a missing GL library surfaces as ImportError, AttributeError or OSError
            raise gl_error(e) from e
        build = getattr(tasks, f"memory_maze_{self._size}")
        return build(image_only_obs=True, camera_resolution=self._image_size, seed=seed)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.close()
            self._env = self._build(seed)
        return self._observe(np.asarray(self._env.reset().observation)), {}

    def step(self, action):
        time_step = self._env.step(int(action))
        return self._observe(np.asarray(time_step.observation)), float(time_step.reward or 0.0), False, time_step.last(), {}

    def close(self) -> None:
        self._env.close()

"""Toy pixel tasks drawn with numpy (no simulator): thousands of steps/s, learnable in minutes on a CPU,
for smoke tests and quick learning checks of the agents."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from wm.envs.base import PixelEnv


class PointReach(PixelEnv):
    """Steer a red dot onto a green target dot placed at random each episode.

    Velocity control in the arena [-1, 1]^2. Reward per step is 1 on the target, else a distance shaping
    term below 0.5, so staying on the target is optimal; a random walk rarely gets there. Never terminal.
    """

    episode_steps = 200  # env steps before truncation (the factory divides by the action repeat)
    SPEED = 0.05  # arena units moved per step at full action
    TARGET_RADIUS = 0.12
    AGENT_RADIUS = 0.08
    BACKGROUND = (30, 30, 30)
    TARGET_COLOUR = (40, 220, 40)
    AGENT_COLOUR = (230, 40, 40)

    def __init__(self, image_size: int = 64) -> None:
        super().__init__(image_size)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        centres = (np.arange(image_size) + 0.5) / image_size * 2 - 1
        self._x, self._y = np.meshgrid(centres, centres)  # x along columns, y along rows (downwards)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        while True:  # start at least 0.5 away from the target, so every episode needs steering
            self._agent, self._target = self.np_random.uniform(-0.8, 0.8, (2, 2))
            if np.linalg.norm(self._agent - self._target) >= 0.5:
                break
        return self._observe(self._draw()), {}

    def step(self, action):
        move = self.SPEED * np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        self._agent = np.clip(self._agent + move, -1.0, 1.0)
        distance = np.linalg.norm(self._agent - self._target)
        if distance <= self.TARGET_RADIUS:
            reward = 1.0
        else:
            reward = 0.5 * (1.0 - distance / (2 * np.sqrt(2)))  # 2*sqrt(2): the arena's diagonal
        return self._observe(self._draw()), float(reward), False, False, {}

    def true_state(self) -> dict[str, np.ndarray]:
        """Arena positions of the agent and of the target."""
        return {"agent": self._agent.copy(), "target": self._target.copy()}

    def _draw(self) -> np.ndarray:
        image = np.empty(self._x.shape + (3,), np.uint8)
        image[:] = self.BACKGROUND
        for (cx, cy), radius, colour in (
            (self._target, self.TARGET_RADIUS, self.TARGET_COLOUR),
            (self._agent, self.AGENT_RADIUS, self.AGENT_COLOUR),
        ):
            image[(self._x - cx) ** 2 + (self._y - cy) ** 2 <= radius**2] = colour
        return image


class Catch(PixelEnv):
    """Move a paddle (left/stay/right) under a ball falling from a random column of an 8x8 grid.

    Rewards +1 on a catch and -1 on a miss when the ball reaches the row above the paddle, which
    terminates the episode (6 steps). The paddle is two cells wide so that every ball stays catchable
    at action repeat 2 (which moves it two cells at a time); a random policy misses most balls.
    """

    episode_steps = None  # the episode ends itself
    GRID = 8
    PADDLE_WIDTH = 2
    BALL_COLOUR = (255, 255, 255)
    PADDLE_COLOUR = (60, 140, 255)

    def __init__(self, image_size: int = 64) -> None:
        if image_size % self.GRID:
            raise ValueError(f"Catch needs an image size divisible by {self.GRID}, got {image_size}")
        super().__init__(image_size)
        self.action_space = spaces.Discrete(3)
        self._cell = image_size // self.GRID

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._start()
        return self._observe(self._draw()), {}

    def _start(self) -> None:
        self._ball_row, self._ball_col = 0, int(self.np_random.integers(self.GRID))
        self._paddle = (self.GRID - self.PADDLE_WIDTH) // 2  # leftmost paddle cell; starts centred

    def step(self, action):
        self._paddle = min(max(self._paddle + int(action) - 1, 0), self.GRID - self.PADDLE_WIDTH)
        self._ball_row += 1
        landed = self._ball_row == self.GRID - 2
        caught = 0 <= self._ball_col - self._paddle < self.PADDLE_WIDTH
        reward = (1.0 if caught else -1.0) if landed else 0.0
        return self._observe(self._draw()), reward, landed, False, {}

    def true_state(self) -> dict[str, np.ndarray]:
        """Grid cells: the ball's column (x) and row (y), and the paddle's centre column (x)."""
        return {"ball": np.array([self._ball_col, self._ball_row], np.float64),
                "paddle": np.array([self._paddle + (self.PADDLE_WIDTH - 1) / 2], np.float64)}

    def _draw(self) -> np.ndarray:
        grid = np.zeros((self.GRID, self.GRID, 3), np.uint8)
        grid[self._ball_row, self._ball_col] = self.BALL_COLOUR
        grid[self.GRID - 1, self._paddle : self._paddle + self.PADDLE_WIDTH] = self.PADDLE_COLOUR
        return grid.repeat(self._cell, axis=0).repeat(self._cell, axis=1)


class SmallBallCatch(Catch):
    """Catch whose ball is a 2x2-pixel dot in the middle of its cell, 1/16 of Catch's ball.

    A miniature of DMC-Subtle: the one object the reward depends on covers 4 of 4096 pixels, so a
    pixel reconstruction loss spends almost nothing on it.
    """

    BALL_PIXELS = 2

    def _draw(self) -> np.ndarray:
        image = super()._draw()
        row, col = self._ball_row * self._cell, self._ball_col * self._cell
        image[row : row + self._cell, col : col + self._cell] = 0  # the ball's cell (never the paddle's row)
        top = self._ball_row * self._cell + (self._cell - self.BALL_PIXELS) // 2
        left = self._ball_col * self._cell + (self._cell - self.BALL_PIXELS) // 2
        image[top : top + self.BALL_PIXELS, left : left + self.BALL_PIXELS] = self.BALL_COLOUR
        return image


class DistractingCatch(Catch):
    """Catch in front of a moving background: a random coloured texture, new each episode, that
    scrolls by a random velocity every step.

    A miniature of DMC with video backgrounds: most pixels change every step and none of them
    matter, so reconstruction must model the background while the task needs only ball and paddle.
    The texture stays darker than the ball and unlike the paddle's blue.
    """

    TEXTURE_CELLS = 16  # random colours on a 16x16 grid, tiled and scrolled over the image
    MAX_SPEED = 4  # pixels per step, per axis

    def _start(self) -> None:
        super()._start()
        size = self._cell * self.GRID
        cells = self.np_random.integers(0, 150, (self.TEXTURE_CELLS, self.TEXTURE_CELLS, 3)).astype(np.uint8)
        cells[..., 2] //= 2  # keep blue low, away from the paddle's colour
        scale = -(-2 * size // self.TEXTURE_CELLS)  # the texture is twice the image, so it can scroll
        self._texture = cells.repeat(scale, axis=0).repeat(scale, axis=1)
        self._velocity = self.np_random.integers(-self.MAX_SPEED, self.MAX_SPEED + 1, 2)
        self._offset = self.np_random.integers(0, self._texture.shape[0], 2)

    def step(self, action):
        self._offset = (self._offset + self._velocity) % self._texture.shape[0]
        return super().step(action)

    def _draw(self) -> np.ndarray:
        size = self._cell * self.GRID
        background = np.roll(self._texture, (-self._offset[0], -self._offset[1]), axis=(0, 1))[:size, :size]
        image = background.copy()
        objects = super()._draw()
        drawn = objects.any(-1)
        image[drawn] = objects[drawn]
        return image


TOY_TASKS: dict[str, type[PixelEnv]] = {
    "point_reach": PointReach,
    "catch": Catch,
    "catch_small": SmallBallCatch,
    "catch_distract": DistractingCatch,
}

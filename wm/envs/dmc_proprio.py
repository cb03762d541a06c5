"""DeepMind Control from proprioceptive states: the suite's own observation vector (joint angles,
velocities, ...) instead of pixels, so the three agents can be compared beyond images. The vector
goes through the encoder's MLP path (symlog inputs); no frame is rendered while training."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wm.envs.dmc import default_camera, load_task, step_repeated


def flatten_observation(observation: dict) -> np.ndarray:
    """The suite's observation dict as one float32 vector, keys in the suite's order."""
    return np.concatenate([np.asarray(v, np.float32).ravel() for v in observation.values()])


class DMCProprioEnv(gym.Env):
    """A suite task observed as {"state": (D,) float32}, actions normalised to [-1, 1].

    Repeats each action `action_repeat` physics steps; episodes end by truncation at the suite's
    1000-step limit, as from pixels. `render()` draws camera 0 (2 for quadruped) for videos.
    """

    metadata = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"
    episode_steps = 1000

    def __init__(self, domain: str, task: str, action_repeat: int = 1, image_size: int = 64) -> None:
        self._env = load_task(domain, task, action_repeat)
        self._repeat, self._size = action_repeat, image_size
        self._camera = default_camera(domain)
        dim = sum(int(np.prod(spec.shape)) for spec in self._env.observation_spec().values())
        self.observation_space = spaces.Dict({"state": spaces.Box(-np.inf, np.inf, (dim,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, self._env.action_spec().shape, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        time_step = self._env.reset()
        return {"state": flatten_observation(time_step.observation)}, {}

    def step(self, action):
        time_step, reward = step_repeated(self._env, action, self._repeat)
        return {"state": flatten_observation(time_step.observation)}, reward, False, time_step.last(), {}

    def render(self) -> np.ndarray:
        return self._env.physics.render(self._size, self._size, camera_id=self._camera)

    def close(self) -> None:
        self._env.close()

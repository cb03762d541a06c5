"""DeepMind Control Suite from pixels as gymnasium envs (docs/algorithm.md §3: 64x64, camera 0, 2 for quadruped,
1000-step episodes, never terminal). dm_control is imported lazily so the toy tasks work without OpenGL."""

from __future__ import annotations

import os

import numpy as np
from gymnasium import spaces

from wm.envs.base import PixelEnv

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control loads


def gl_error(cause: Exception) -> RuntimeError:
    """What to install and which MUJOCO_GL to set when MuJoCo cannot render."""
    return RuntimeError(
        f"MuJoCo (dm_control / Meta-World) could not load or render with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} ({cause!r}). "
        "Install `dm_control==1.0.28 mujoco==3.3.0`, then an OpenGL backend: on CPU, Mesa's EGL "
        "(apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri) with MUJOCO_GL=egl, or OSMesa "
        "(apt-get install libosmesa6) with MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa; on an NVIDIA "
        "GPU, MUJOCO_GL=egl with the driver's libEGL."
    )


def _suite():
    try:
        from dm_control import suite
    except Exception as e:  # a missing GL library surfaces as ImportError, AttributeError or OSError
        raise gl_error(e) from e
    return suite


def dmc_tasks() -> dict[str, tuple[str, str]]:
    """Maps every suite task's "domain_task" name to its (domain, task); domains may contain '_'."""
    return {f"{domain}_{task}": (domain, task) for domain, task in _suite().ALL_TASKS}


def load_task(domain: str, task: str, action_repeat: int):
    """The suite's env for (domain, task), after checking the task and the action repeat."""
    suite = _suite()
    if (domain, task) not in suite.ALL_TASKS:
        raise ValueError(f"unknown DMC task {domain}-{task}; valid: {', '.join(dmc_tasks())}")
    if action_repeat < 1:
        raise ValueError(f"action repeat must be >= 1, got {action_repeat}")
    return suite.load(domain, task)


def default_camera(domain: str) -> int:
    """Camera 0, and 2 for quadruped (docs/algorithm.md §3)."""
    return 2 if domain == "quadruped" else 0


def step_repeated(env, action: np.ndarray, repeat: int):
    """`repeat` physics steps of a suite env with an action in [-1, 1] (rescaled to the env's
    bounds), stopping at the episode's end: the last time step and the summed reward."""
    spec = env.action_spec()
    action = spec.minimum + (np.clip(action, -1.0, 1.0) + 1.0) / 2.0 * (spec.maximum - spec.minimum)
    reward = 0.0
    for _ in range(repeat):
        time_step = env.step(action)
        reward += time_step.reward or 0.0
        if time_step.last():
            break
    return time_step, float(reward)


def physics_state(physics, task) -> dict[str, np.ndarray]:
    """DMCEnv.true_state of a suite task's physics."""
    state = {"qpos": physics.data.qpos.copy(), "qvel": physics.data.qvel.copy()}
    for name, value in task.get_observation(physics).items():
        state[name] = np.asarray(value, np.float64).ravel()
    contacts = physics.data.contact[: physics.data.ncon]
    touching = set(contacts.geom1) | set(contacts.geom2)
    agent_geoms = [g for g in range(physics.model.ngeom) if physics.model.geom_bodyid[g] != 0]  # body 0: the world
    state["contact"] = np.array([g in touching for g in agent_geoms], np.float64)
    return state


class DMCEnv(PixelEnv):
    """A suite task with actions normalised to [-1, 1] and the camera image as observation.

    Repeats each action `action_repeat` physics steps itself and renders only the last one (rendering
    dominates the cost on CPU). Episodes end by truncation when the suite's 1000-step limit is reached.
    """

    episode_steps = 1000

    def __init__(
        self, domain: str, task: str, image_size: int = 64, camera: int | None = None, action_repeat: int = 1
    ) -> None:
        super().__init__(image_size)
        self._env = load_task(domain, task, action_repeat)
        self._size = image_size
        self._camera = default_camera(domain) if camera is None else camera
        self._repeat = action_repeat
        self.action_space = spaces.Box(-1.0, 1.0, self._env.action_spec().shape, np.float32)
        try:  # render once now, so a missing GL backend fails here rather than mid-training
            self._render()
        except Exception as e:
            raise gl_error(e) from e

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)  # the suite draws initial states from the task's RNG
        self._env.reset()
        return self._observe(self._render()), {}

    def step(self, action):
        time_step, reward = step_repeated(self._env, action, self._repeat)
        return self._observe(self._render()), reward, False, time_step.last(), {}

    def close(self) -> None:
        self._env.close()

    def true_state(self) -> dict[str, np.ndarray]:
        """`qpos` and `qvel`, the task's own state observations by name (what dm_control's state
        observation holds: e.g. position, velocity, to_target, touch) and `contact`: whether each
        geom of the agent touches anything."""
        return physics_state(self._env.physics, self._env.task)

    def _render(self) -> np.ndarray:
        return self._env.physics.render(self._size, self._size, camera_id=self._camera)

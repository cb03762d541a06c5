"""Meta-World MT1 from pixels (docs/algorithm.md §3): camera `corner2` moved to [0.75, 0.075, 0.7], image
flipped vertically (MuJoCo renders it upside down), action repeat 2, 500-frame episodes, and
success = success at any step of the episode."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from wm.envs.base import PixelEnv
from wm.envs.dmc import gl_error

CAMERA = "corner2"
CAMERA_POS = (0.75, 0.075, 0.7)


def metaworld_tasks() -> list[str]:
    """The 50 v3 task names, e.g. "reach-v3"."""
    import metaworld

    return list(metaworld.MT1.ENV_NAMES)


class MetaWorldEnv(PixelEnv):
    """One MT1 task; every episode draws one of the task's 50 goal variations. Never terminal:
    episodes end by truncation after 500 frames; `info["success"]` stays set once reached."""

    episode_steps = 500  # frames (the benchmark's max_path_length)

    def __init__(self, task: str, image_size: int = 64, action_repeat: int = 2) -> None:
        if task not in metaworld_tasks():
            raise ValueError(f"unknown Meta-World task {task!r}; valid: {', '.join(metaworld_tasks())}")
        if action_repeat < 1:
            raise ValueError(f"action repeat must be >= 1, got {action_repeat}")
        import metaworld
        import mujoco

        super().__init__(image_size)
        benchmark = metaworld.MT1(task, seed=0)  # the benchmark's fixed set of goal variations
        self._variations = benchmark.train_tasks
        self._env = benchmark.train_classes[task](render_mode="rgb_array", camera_name=CAMERA, width=image_size, height=image_size)
        camera = mujoco.mj_name2id(self._env.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA)
        self._env.model.cam_pos[camera] = CAMERA_POS
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._repeat = action_repeat
        self._success = False
        self._env.set_task(self._variations[0])
        try:  # render once now, so a missing GL backend fails here rather than mid-training
            self._env.reset()
            self._render()
        except Exception as e:
            raise gl_error(e) from e

    def _render(self) -> np.ndarray:
        return np.ascontiguousarray(np.flipud(self._env.render()))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._env.set_task(self._variations[int(self.np_random.integers(len(self._variations)))])
        self._env.reset(seed=int(self.np_random.integers(2**31)))
        self._success = False
        return self._observe(self._render()), {"success": False}

    def step(self, action):
        action = np.clip(action, -1.0, 1.0)
        total, truncated = 0.0, False
        for _ in range(self._repeat):
            _, reward, _, truncated, info = self._env.step(action)
            total += float(reward)
            self._success |= bool(info["success"])
            if truncated:
                break
        return self._observe(self._render()), total, False, bool(truncated), {"success": self._success}

    def true_state(self) -> dict[str, np.ndarray]:
        """World positions of the gripper (`hand`), of the task's object(s) and of the goal."""
        return {"hand": np.asarray(self._env.tcp_center, np.float64).copy(),
                "object": np.asarray(self._env._get_pos_objects(), np.float64).ravel().copy(),
                "goal": np.asarray(self._env._target_pos, np.float64).copy()}

    def close(self) -> None:
        self._env.close()

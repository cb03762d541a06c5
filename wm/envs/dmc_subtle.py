"""DMC-Subtle (R2-Dreamer, docs/algorithm.md §3): five suite tasks whose task-critical object is shrunk, so that
it covers only a few pixels at 64x64 and a pixel-reconstruction objective can afford to ignore it.

The compiled model is edited after `suite.load`: only the rendered and reward-relevant sizes change;
masses and inertias stay those of the original model, so the dynamics are the original ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from wm.envs.dmc import DMCEnv


class SubtleSpec(NamedTuple):
    """One task's shrink: `factor` scales each (named model field, key) entry, and the task attribute
    (if any) from which `initialize_episode` resets that size every episode."""

    domain: str
    task: str
    factor: float
    sizes: tuple[tuple[str, object], ...]
    task_attribute: str | None = None


SUBTLE_TASKS: dict[str, SubtleSpec] = {
    "ball_in_cup_catch": SubtleSpec(
        "ball_in_cup", "catch", 1 / 12, (("geom_size", ("ball", 0)), ("tendon_width", "string"))
    ),
    "cartpole_swingup": SubtleSpec("cartpole", "swingup", 1 / 20, (("geom_size", ("pole_1", 0)),)),
    "finger_turn_hard": SubtleSpec(
        "finger", "turn_hard", 1 / 2, (("site_size", ("target", 0)),), "_target_radius"
    ),
    "point_mass_easy": SubtleSpec(
        "point_mass", "easy", 1 / 6, (("geom_size", ("target", 0)), ("geom_size", ("pointmass", 0)))
    ),
    "reacher_hard": SubtleSpec("reacher", "hard", 1 / 3, (("geom_size", ("target", 0)),), "_target_size"),
}


class DMCSubtleEnv(DMCEnv):
    """A DMCEnv of one of SUBTLE_TASKS (e.g. "reacher_hard") with its object shrunk."""

    def __init__(
        self, name: str, image_size: int = 64, camera: int | None = None, action_repeat: int = 1
    ) -> None:
        if name not in SUBTLE_TASKS:
            raise ValueError(f"unknown DMC-Subtle task {name!r}; valid: {', '.join(SUBTLE_TASKS)}")
        spec = SUBTLE_TASKS[name]
        super().__init__(spec.domain, spec.task, image_size, camera, action_repeat)
        model = self._env.physics.named.model
        for field, key in spec.sizes:
            getattr(model, field)[key] *= spec.factor
        if spec.task_attribute is not None:
            task = self._env.task
            setattr(task, spec.task_attribute, getattr(task, spec.task_attribute) * spec.factor)
        self._objects = [(field.removesuffix("_size"), key[0]) for field, key in spec.sizes if field != "tendon_width"]

    def true_state(self) -> dict[str, np.ndarray]:
        """DMCEnv's groups and `object`: the world position of each shrunk geom or site, the small
        object that R2-Dreamer's claim is about."""
        data = self._env.physics.named.data
        state = super().true_state()
        state["object"] = np.concatenate([getattr(data, f"{kind}_xpos")[name] for kind, name in self._objects])
        return state

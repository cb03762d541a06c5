"""DMC-Subtle: the five tasks run from pixels with their objects shrunk by the factors of docs/algorithm.md §3."""

import numpy as np
import pytest

from wm.envs.dmc import DMCEnv
from wm.envs.dmc_subtle import SUBTLE_TASKS, DMCSubtleEnv

FACTORS = {
    "ball_in_cup_catch": 1 / 12,
    "cartpole_swingup": 1 / 20,
    "finger_turn_hard": 1 / 2,
    "point_mass_easy": 1 / 6,
    "reacher_hard": 1 / 3,
}


def _sizes(env, name):
    """The sizes docs/algorithm.md §3 shrinks, read from the env's compiled model."""
    model = env._env.physics.named.model
    return [getattr(model, field)[key] for field, key in SUBTLE_TASKS[name].sizes]


@pytest.mark.parametrize("name", sorted(FACTORS))
def test_steps_from_pixels_with_sizes_shrunk_by_spec_factor(name):
    assert set(SUBTLE_TASKS) == set(FACTORS) and SUBTLE_TASKS[name].factor == FACTORS[name]
    env = DMCSubtleEnv(name)
    original = DMCEnv(SUBTLE_TASKS[name].domain, SUBTLE_TASKS[name].task)
    obs, _ = env.reset(seed=0)
    original_obs, _ = original.reset(seed=0)  # after reset: initialize_episode may set the sizes
    np.testing.assert_allclose(_sizes(env, name), np.multiply(_sizes(original, name), FACTORS[name]))
    assert len(_sizes(env, name)) == (2 if name in ("ball_in_cup_catch", "point_mass_easy") else 1)
    assert not np.array_equal(obs["image"], original_obs["image"])  # the renderer draws the new size
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert env.observation_space.contains(obs) and isinstance(reward, float)
    assert not terminated and not truncated
    env.close()
    original.close()


@pytest.mark.parametrize(
    "name, effector",
    [("reacher_hard", ("geom_xpos", "finger", "geom_pos")), ("finger_turn_hard", ("site_xpos", "tip", "site_pos"))],
)
def test_reward_uses_the_shrunk_target(name, effector):
    """With the effector 2 cm from the target centre, inside the original target (reacher: 1.5 cm target
    + 1 cm finger; finger: 3 cm) but outside the shrunk one (0.5 + 1 cm; 1.5 cm), only the original
    task rewards."""
    position, effector_name, target_field = effector

    def reward_at_2cm(env):
        env.reset(seed=0)
        physics = env._env.physics
        getattr(physics.named.model, target_field)["target"] = getattr(physics.named.data, position)[
            effector_name
        ] + [0.02, 0.0, 0.0]
        physics.forward()
        return env._env.task.get_reward(physics)

    spec = SUBTLE_TASKS[name]
    assert reward_at_2cm(DMCEnv(spec.domain, spec.task)) == 1.0
    assert reward_at_2cm(DMCSubtleEnv(name)) == 0.0


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="reacher_hard"):
        DMCSubtleEnv("walker_walk")

"""Open-loop predictions and occlusion saliency on real agents and real toy-task frames."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from callbacks.evaluation import play_episodes
from wm.agent.agent import Agent
from wm.envs import make_vector_env
from wm.inspection import occlusion_maps, open_loop, open_loop_grid, saliency, saliency_figure
from wm.objectives import Barlow, Reconstruction

REGION = (slice(16, 32), slice(40, 56))  # rows, columns: 2 x 2 patches of 8 pixels


@pytest.fixture(scope="module")
def episode() -> tuple[np.ndarray, np.ndarray]:
    """Frames and one-hot actions of a real toy-catch episode (random moves, action repeat 1)."""
    envs = make_vector_env("toy-catch", 1, 1, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    rng = np.random.default_rng(0)
    try:
        (played,) = play_episodes(envs, lambda obs, first, state: (np.eye(3, dtype=np.float32)[rng.integers(0, 3, 1)], state),
                                  1, seed=0, record=1, to_env=lambda action: action.argmax(-1))
    finally:
        envs.close()
    return np.stack(played.frames), np.stack(played.actions)


def agent_for(objective) -> Agent:
    torch.manual_seed(0)
    return Agent({"image": (64, 64, 3)}, 3, discrete=True, objective=objective, size="size1M")


class OnlyRegion(nn.Module):
    """The image encoder sees only REGION: every other pixel is set to 0 before it."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        mask = torch.zeros(64, 64, 1, dtype=torch.uint8)
        mask[REGION] = 1
        self.register_buffer("mask", mask)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image * self.mask)


def test_saliency_lies_where_the_agent_looks(episode):
    """An agent whose encoder sees one known region: occluding anything else changes neither the
    value nor the policy, and occluding that region changes both, on every frame."""
    frames, actions = episode
    agent = agent_for(Barlow())
    convs = agent.world_model.encoder.convs
    convs["image"] = OnlyRegion(convs["image"])
    # A fresh critic's output layer is zeros (DreamerV3's init): give it weights, as training would.
    last = [m for m in agent.actor_critic.critic.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(last.weight, std=0.1)
    maps = saliency(agent, frames, actions, patch=8)
    inside = np.zeros((8, 8), bool)
    inside[2:4, 5:7] = True
    for name in ("value", "policy"):
        assert maps[name].shape == (len(frames), 8, 8)
        assert (maps[name][:, ~inside] == 0).all(), name
        assert (maps[name][:, inside].max(-1) > 0).all(), name
        assert np.unravel_index(maps[name][0].argmax(), (8, 8)) in {(2, 5), (2, 6), (3, 5), (3, 6)}
    assert agent.training, "inspection leaves the agent's mode as it was"


def test_occlusion_maps_measure_the_change_of_each_output():
    image = np.zeros((16, 16, 3), np.uint8)
    score = lambda images: {"corner": images[:, :8, :8].reshape(len(images), -1).astype(float).mean(1, keepdims=True),  # noqa: E731
                            "all": images.reshape(len(images), -1).astype(float).sum(1, keepdims=True)}
    maps = occlusion_maps(score, image, patch=8, fill=100)
    np.testing.assert_allclose(maps["corner"], [[100.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(maps["all"], np.full((2, 2), 100.0 * 8 * 8 * 3))



def test_saliency_and_open_loop_figures_show_the_frame_under_their_maps():
    """The saliency figure keeps the frame visible under a translucent map with colour bars; the
    open-loop grid puts time across and truth / prediction / error down."""
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[20:40, 20:40] = (0, 200, 0)  # a green square: it must show through the map
    heat = np.zeros((8, 8))
    heat[0, 0] = 1.0
    image = saliency_figure(frame, {"value": heat, "policy": heat})
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0] and image.dtype == np.uint8
    green = (image[..., 1] > 120) & (image[..., 0] < 100) & (image[..., 2] < 100)
    assert green.sum() > 2 * 100, "the frame is seen through the map, in both panels"
    hot = (image[..., 0] > 200) & (image[..., 1] > 150)  # inferno's yellow: the hot patch and the colour bars' tops
    assert hot.any()
    rows = np.zeros((12, 3 * 64, 64, 3), np.uint8)
    for t in range(12):
        rows[t, :64] = 20 * t  # the truth row brightens with time
    grid = open_loop_grid(rows, context=5, columns=6)
    assert grid.shape[1] > grid.shape[0] and grid.dtype == np.uint8  # wider than tall: time across


def test_open_loop_predicts_from_the_actions_without_seeing_later_frames(episode):
    frames, actions = episode
    agent = agent_for(Reconstruction())
    torch.manual_seed(3)
    rows = open_loop(agent, frames, actions, context=2)
    t, h = len(frames), 64
    assert rows.shape == (t, 3 * h, 64, 3)
    np.testing.assert_array_equal(rows[:, :h], frames)  # the truth row
    prediction, error = rows[:, h:2 * h].astype(float), rows[:, 2 * h:].astype(float)
    np.testing.assert_allclose(error, np.clip((prediction - frames + 255) / 2, 0, 255), atol=1.0)
    # Open loop: frames after the context never reach the predictions; the actions do.
    changed = frames.copy()
    changed[2:] = 255 - changed[2:]
    torch.manual_seed(3)
    np.testing.assert_array_equal(open_loop(agent, changed, actions, context=2)[:, h:2 * h], rows[:, h:2 * h])
    other = actions.copy()
    other[2:] = np.roll(other[2:], 1, axis=-1)
    torch.manual_seed(3)
    assert not np.array_equal(open_loop(agent, frames, other, context=2)[2:, h:2 * h], rows[2:, h:2 * h])


def test_open_loop_needs_an_image_decoder(episode):
    frames, actions = episode
    with pytest.raises(ValueError, match="probe_decoder: true"):
        open_loop(agent_for(Barlow()), frames, actions)
    rows = open_loop(agent_for(Barlow(probe_decoder=True)), frames, actions)
    assert rows.shape == (len(frames), 192, 64, 3)

"""What a trained agent predicts and looks at: open-loop predictions and occlusion saliency.

- `open_loop`: DreamerV3's report video. The world model observes the first `context` frames of
  an episode, then imagines the rest from its prior, fed the actions that were really taken; the
  images come from the objective's image decoder (reconstruction's own, or any objective's
  `probe_decoder`). Rows: truth, prediction, error.
- `saliency`: the R2-Dreamer paper's qualitative figure. Each patch of a frame is occluded in turn
  and the change of the critic's value and of the policy is measured, given the state the agent
  was in before that frame.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from wm.distributions import mode_onehot, policy_mode
from wm.rssm import State
from wm.video import VIDEO_SIZE, side_by_side

ERROR_GREY = 0.5  # the error row shows (prediction - truth + 1) / 2: grey where they agree


@contextmanager
def evaluating(module: torch.nn.Module):
    """The module in eval mode (BatchNorm on its running statistics) for the block, as it was after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _posterior_mode(agent, state: State, action: torch.Tensor, embed: torch.Tensor) -> State:
    """One filtering step with the most likely latents instead of a sample: saliency must not
    change from one draw to the next."""
    rssm = agent.world_model.rssm
    deter = rssm.core(state.deter, state.stoch, action)
    return State(deter, mode_onehot(rssm._posterior_logits(deter, rssm._embed_part(embed))))


def _image_decoder(agent):
    decoder = agent.world_model.objective.image_decoder()
    if decoder is None or not decoder.image_keys:
        raise ValueError("open-loop predictions need an image decoder: train with the reconstruction objective, or "
                         "with probe_decoder: true on the objective (model.objective.init_args.probe_decoder)")
    return decoder


@torch.no_grad()
def open_loop(agent, images: np.ndarray, actions: np.ndarray, context: int = 5, key: str = "image") -> np.ndarray:
    """(T, 3 H, W, 3) uint8 rows truth / prediction / error for one episode's `images` (T, H, W, 3)
    and `actions` (T, A), where actions[t] led to images[t] (actions[0] is ignored). Frames before
    `context` are reconstructions of the posterior; from `context` on, open-loop predictions."""
    with evaluating(agent):
        return _open_loop(agent, _image_decoder(agent), images, actions, context, key)


def _open_loop(agent, decoder, images, actions, context, key) -> np.ndarray:
    device = agent.device
    frames = torch.as_tensor(images, device=device)[None]  # (1, T, H, W, 3)
    acts = torch.as_tensor(actions, dtype=torch.float32, device=device)[None]
    length = frames.shape[1]
    context = max(1, min(context, length))
    embed = agent.world_model.encoder({key: frames[:, :context]})
    is_first = torch.zeros(1, context, dtype=torch.bool, device=device)
    is_first[:, 0] = True
    observed, _, _ = agent.world_model.rssm.observe(embed, acts[:, :context], is_first)
    deters, stochs = [observed.deter[0]], [observed.stoch[0]]
    state = State(observed.deter[:, -1], observed.stoch[:, -1])
    for t in range(context, length):
        state = agent.world_model.rssm.img_step(state, acts[:, t])
        deters.append(state.deter)
        stochs.append(state.stoch)
    deter, stoch = torch.cat(deters), torch.cat(stochs)
    prediction = decoder(deter, stoch.flatten(-2))[key].float().clamp(0, 1)  # (T, H, W, 3)
    truth = frames[0].float() / 255.0
    error = ((prediction - truth + 1.0) / 2.0).clamp(0, 1)
    rows = torch.cat([truth, prediction, error], dim=1)  # (T, 3H, W, 3)
    return (rows * 255.0).round().to(torch.uint8).cpu().numpy()


def occlusion_maps(score, image: np.ndarray, patch: int = 8, fill: int = 127) -> dict[str, np.ndarray]:
    """{name: (H / patch, W / patch)}: how much each output of `score` changes when each patch of
    `image` (H, W, C) uint8 is set to `fill`. `score(images (N, H, W, C) uint8)` returns
    {name: (N, K) floats}; the change is the Euclidean distance to the unoccluded output."""
    height, width, _ = image.shape
    rows, cols = height // patch, width // patch
    occluded = np.repeat(image[None], rows * cols + 1, axis=0)
    for index in range(rows * cols):
        r, c = divmod(index, cols)
        occluded[index + 1, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = fill
    maps = {}
    for name, output in score(occluded).items():
        output = np.asarray(output, np.float64)
        maps[name] = np.linalg.norm(output[1:] - output[:1], axis=-1).reshape(rows, cols)
    return maps


@torch.no_grad()
def saliency(agent, images: np.ndarray, actions: np.ndarray, patch: int = 8, key: str = "image") -> dict[str, np.ndarray]:
    """Occlusion saliency of each frame of an episode, for the critic's value and for the policy:
    {"value": (T, H / patch, W / patch), "policy": (same)}. Frame t is scored from the posterior
    mode of the state before it and actions[t], as when the agent acted on it; the policy's change
    is that of its greedy action (the normal's mean, the categorical's probabilities)."""
    with evaluating(agent):
        return _saliency(agent, images, actions, patch, key)


def _saliency(agent, images, actions, patch, key) -> dict[str, np.ndarray]:
    device = agent.device
    state = agent.world_model.rssm.initial(1, device)
    maps: dict[str, list[np.ndarray]] = {"value": [], "policy": []}
    for t, image in enumerate(images):
        action = torch.as_tensor(actions[t] if t else np.zeros_like(actions[0]), dtype=torch.float32, device=device)[None]

        def outputs(batch: np.ndarray, state=state, action=action) -> dict[str, np.ndarray]:
            n = len(batch)
            embed = agent.world_model.encoder({key: torch.as_tensor(batch, device=device)})
            states = State(state.deter.expand(n, -1), state.stoch.expand(n, -1, -1))
            feat = _posterior_mode(agent, states, action.expand(n, -1), embed).feat
            dist = agent.actor_critic.policy(feat)
            policy = dist.probs if agent.discrete else policy_mode(dist)
            return {"value": agent.actor_critic.value(feat)[:, None].float().cpu().numpy(), "policy": policy.float().cpu().numpy()}

        for name, heat in occlusion_maps(outputs, image, patch).items():
            maps[name].append(heat)
        embed = agent.world_model.encoder({key: torch.as_tensor(image[None], device=device)})
        state = _posterior_mode(agent, state, action, embed)
    return {name: np.stack(frames) for name, frames in maps.items()}


def overlay(image: np.ndarray, heat: np.ndarray, size: int = VIDEO_SIZE) -> np.ndarray:
    """(size, size * W / H, 3) uint8: the frame enlarged, with `heat` (a coarse map) over it in red,
    normalised to its own maximum."""
    scale = max(1, size // image.shape[0])
    frame = image.repeat(scale, 0).repeat(scale, 1).astype(np.float32)
    cell = frame.shape[0] // heat.shape[0]
    weight = (heat / heat.max() if heat.max() > 0 else heat).repeat(cell, 0).repeat(cell, 1)[..., None]
    red = np.array([255.0, 0.0, 0.0], np.float32)
    return (frame * (1 - 0.6 * weight) + red * 0.6 * weight).round().astype(np.uint8)


OPEN_LOOP_FRAMES = 50  # DreamerV3's report: 5 observed, 45 imagined
SALIENCY_FRAMES = 100  # frames of the saliency video (65 encoder passes each at 8-pixel patches)


def open_loop_video(agent, episodes: list[tuple[list[np.ndarray], list[np.ndarray]]], size: int = VIDEO_SIZE) -> np.ndarray:
    """Open-loop predictions of the first `OPEN_LOOP_FRAMES` frames of each (frames, actions)
    episode, side by side, each frame enlarged to `size` pixels: (T, 3 size, k size, 3) uint8."""
    clips = [list(open_loop(agent, np.stack(f[:OPEN_LOOP_FRAMES]), np.stack(a[:OPEN_LOOP_FRAMES]))) for f, a in episodes]
    return side_by_side(clips, height=3 * size)


def saliency_video(agent, frames: list[np.ndarray], actions: list[np.ndarray], size: int = VIDEO_SIZE) -> np.ndarray:
    """The first `SALIENCY_FRAMES` frames of an episode with the value's (left) and the policy's
    (right) occlusion saliency over them: (T, size, 2 size, 3) uint8."""
    maps = saliency(agent, np.stack(frames[:SALIENCY_FRAMES]), np.stack(actions[:SALIENCY_FRAMES]))
    return np.stack([np.concatenate([overlay(f, v, size), overlay(f, p, size)], axis=1)
                     for f, v, p in zip(frames, maps["value"], maps["policy"])])

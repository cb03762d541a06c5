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
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from wm.model.distributions import mode_onehot, policy_mode
from wm.model.rssm import State
from wm.run.video import VIDEO_SIZE, side_by_side

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


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure drawn off screen (not pyplot's: a notebook's display is left alone)."""
    figure = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(figure)
    return figure


def figure_image(figure: Figure) -> np.ndarray:
    """A figure as an (H, W, 3) uint8 image, its height and width even (for mp4s)."""
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    return image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2].copy()


SALIENCY_LABELS = {"value": "change of the critic's value", "policy": "change of the greedy action"}


def saliency_figure(image: np.ndarray, maps: dict[str, np.ndarray], scales: dict[str, float] | None = None,
                    title: str = "") -> np.ndarray:
    """The frame, twice, with the value's and the policy's occlusion saliency over it as a
    translucent heat map (bilinear between the patches), each with its colour bar: (H, W, 3) uint8.
    `scales` fixes each map's top colour (a video's maximum), else each map's own maximum."""
    figure = new_figure(4.4 * len(maps), 3.6)
    axes = figure.subplots(1, len(maps))
    height, width = image.shape[:2]
    colours = colormaps["inferno"]
    for ax, (name, heat) in zip(np.atleast_1d(axes), maps.items()):
        top = (scales or {}).get(name) or float(heat.max()) or 1.0
        level = np.clip(np.asarray(Image.fromarray(heat.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
                        / top, 0.0, 1.0)
        heat_rgba = colours(level)
        heat_rgba[..., 3] = 0.1 + 0.6 * level  # translucent, more so where occlusion changes little
        ax.imshow(image, interpolation="nearest")
        ax.imshow(heat_rgba, interpolation="nearest")
        shown = ScalarMappable(Normalize(0.0, top), colours)
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=SALIENCY_LABELS.get(name, name))
        ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_image(figure)


def open_loop_grid(rows: np.ndarray, context: int, columns: int = 10, title: str = "") -> np.ndarray:
    """`open_loop`'s (T, 3 H, W, 3) output as a grid a person can read: time across (`columns` steps,
    evenly spread, the last observed one among them), truth / prediction / error down."""
    length, height = rows.shape[0], rows.shape[1] // 3
    picked = sorted(set(np.linspace(0, length - 1, min(columns, length)).round().astype(int)) | {min(context, length) - 1})
    figure = new_figure(1.3 * len(picked) + 0.8, 4.3)
    axes = figure.subplots(3, len(picked), squeeze=False)
    for column, t in enumerate(picked):
        for row, label in enumerate(("truth", "prediction", "error")):
            ax = axes[row, column]
            ax.imshow(rows[t, row * height:(row + 1) * height], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(label)
        axes[0, column].set_title(f"t={t}" + (" (observed)" if t < context else ""), fontsize=8,
                                  color="black" if t < context else "tab:red")
    figure.suptitle(title or f"open loop: {context} frames observed, then imagined from the actions taken "
                    "(error: grey where equal)", fontsize=9)
    figure.tight_layout()
    return figure_image(figure)


OPEN_LOOP_FRAMES = 50  # DreamerV3's report: 5 observed, 45 imagined
OPEN_LOOP_CONTEXT = 5
SALIENCY_FRAMES = 100  # frames of the saliency video (65 encoder passes each at 8-pixel patches)


def open_loop_video(agent, episodes: list[tuple[list[np.ndarray], list[np.ndarray]]], size: int = VIDEO_SIZE) -> np.ndarray:
    """Open-loop predictions of the first `OPEN_LOOP_FRAMES` frames of each (frames, actions)
    episode, side by side, each frame enlarged to `size` pixels: (T, 3 size, k size, 3) uint8."""
    clips = [list(open_loop(agent, np.stack(f[:OPEN_LOOP_FRAMES]), np.stack(a[:OPEN_LOOP_FRAMES]), OPEN_LOOP_CONTEXT))
             for f, a in episodes]
    return side_by_side(clips, height=3 * size)


def saliency_video(agent, frames: list[np.ndarray], actions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The first `SALIENCY_FRAMES` frames of an episode, each as `saliency_figure` draws it, on
    one colour scale per map for the whole video: (T, H, W, 3) uint8; and the middle frame as a
    picture of its own, on its own scale (on the video's, one frame's heat can be too faint to see)."""
    maps = saliency(agent, np.stack(frames[:SALIENCY_FRAMES]), np.stack(actions[:SALIENCY_FRAMES]))
    scales = {name: float(heat.max()) for name, heat in maps.items()}
    video = np.stack([saliency_figure(f, {"value": v, "policy": p}, scales, f"t={t}")
                      for t, (f, v, p) in enumerate(zip(frames, maps["value"], maps["policy"]))])
    middle = len(video) // 2
    image = saliency_figure(frames[middle], {name: heat[middle] for name, heat in maps.items()}, title=f"t={middle}")
    return video, image
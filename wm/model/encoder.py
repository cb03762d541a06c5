"""Observation encoder (docs/algorithm.md §1 "Encoder").

Observations are dicts: keys with (H, W, C) uint8 shapes are images for the conv encoder, keys
with (D,) shapes are vectors for an MLP on symlog inputs; the embedding concatenates both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from wm.model.nets import MLP, ChannelNorm, Conv2d, MaxPool2x2, symlog

STAGE_MULTIPLIERS = (2, 3, 4, 4)  # conv channels = depth x these, one 2x2 pool per stage


def split_keys(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """Image keys (H, W, C) and vector keys (D,), refusing any other rank."""
    images, vectors = [], []
    for key, shape in shapes.items():
        if len(shape) == 3:
            images.append(key)
        elif len(shape) == 1:
            vectors.append(key)
        else:
            raise ValueError(
                f"observation {key!r} has shape {tuple(shape)}: expected an image (H, W, C) or a "
                "vector (D,); flatten other arrays in an observation wrapper"
            )
    return images, vectors


def check_image_shape(key: str, shape: tuple[int, ...]) -> None:
    height, width, _ = shape
    stride = 2 ** len(STAGE_MULTIPLIERS)
    if height % stride or width % stride:
        raise ValueError(
            f"image {key!r} of shape {tuple(shape)}: height and width must be multiples of "
            f"{stride} (the encoder halves them {len(STAGE_MULTIPLIERS)} times); resize to 64x64"
        )


def check_batch_shape(key: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape[-len(shape) :]) != tuple(shape):
        raise ValueError(
            f"observation {key!r} has trailing shape {tuple(value.shape[-len(shape):])}, the model "
            f"was built for {tuple(shape)}" + (" (channels last, H x W x C)" if len(shape) == 3 else "")
        )


class ConvEncoder(nn.Module):
    """4 stages of conv(k5, stride 1) -> 2x2 max-pool -> norm -> SiLU, then flatten."""

    def __init__(self, shape: tuple[int, int, int], depth: int, norm: str = "rms"):
        super().__init__()
        height, width, channels = shape
        layers: list[nn.Module] = []
        for mult in STAGE_MULTIPLIERS:
            layers += [Conv2d(channels, depth * mult), MaxPool2x2(), ChannelNorm(depth * mult, norm), nn.SiLU()]
            channels = depth * mult
        self.net = nn.Sequential(*layers)
        stride = 2 ** len(STAGE_MULTIPLIERS)
        self.out_dim = channels * (height // stride) * (width // stride)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> (N, out_dim)."""
        x = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5
        x = x.contiguous(memory_format=torch.channels_last)
        # Flatten channels-last so the layout matches the decoder's (h, w, c) order.
        return self.net(x).permute(0, 2, 3, 1).flatten(1)


class MultiEncoder(nn.Module):
    """Encodes a dict observation into one embedding vector."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], depth: int, units: int, mlp_layers: int = 3, norm: str = "rms"):
        super().__init__()
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.image_keys, self.vector_keys = split_keys(self.shapes)
        for key in self.image_keys:
            check_image_shape(key, self.shapes[key])
        self.convs = nn.ModuleDict({k: ConvEncoder(self.shapes[k], depth, norm) for k in self.image_keys})
        vector_dim = sum(self.shapes[k][0] for k in self.vector_keys)
        self.mlp = MLP(vector_dim, units, mlp_layers) if self.vector_keys else None
        self.out_dim = sum(c.out_dim for c in self.convs.values()) + (self.mlp.out_dim if self.mlp else 0)

    def select(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The observation keys of a batch, refusing a batch that lacks one."""
        missing = [k for k in self.shapes if k not in batch]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; the model expects {list(self.shapes)}")
        return {k: batch[k] for k in self.shapes}

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Dict of (*lead, *shape) -> (*lead, out_dim)."""
        obs = self.select(obs)
        for key, shape in self.shapes.items():
            check_batch_shape(key, obs[key], shape)
        first = obs[next(iter(self.shapes))]
        lead = first.shape[: first.dim() - len(self.shapes[next(iter(self.shapes))])]
        parts = [self.convs[k](obs[k].reshape(-1, *self.shapes[k])) for k in self.image_keys]
        if self.mlp is not None:
            vec = torch.cat([obs[k].reshape(-1, self.shapes[k][0]).float() for k in self.vector_keys], -1)
            parts.append(self.mlp(symlog(vec)))
        return torch.cat(parts, -1).reshape(*lead, self.out_dim)

"""Observation decoder for the reconstruction objective (docs/algorithm.md §1 "Decoder")."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from wm.model.encoder import STAGE_MULTIPLIERS, split_keys
from wm.model.nets import MLP, BlockLinear, ChannelNorm, Conv2d, Linear, NormAct, Upsample2x, symlog


class ConvDecoder(nn.Module):
    """Mirror of the encoder: features -> 4x4 map -> (nearest upsample, conv k5, norm, SiLU) x 3
    -> upsample -> conv to image channels -> sigmoid.

    Like DreamerV3's decoder the first map comes from a block-linear of deter (8 blocks) plus a
    2-layer MLP of the stochastic state, so it costs ~1.27M parameters at size12M instead of a
    dense 2560 x 1024 layer.
    """

    def __init__(self, shape: tuple[int, int, int], deter: int, stoch: int, depth: int, units: int, blocks: int = 8):
        super().__init__()
        height, width, channels = shape
        stride = 2 ** len(STAGE_MULTIPLIERS)
        self.deter, self.blocks = deter, blocks
        self.minres = (height // stride, width // stride)
        top = depth * STAGE_MULTIPLIERS[-1]
        if top % blocks:
            raise ValueError(f"decoder channels {top} must divide by {blocks} blocks")
        self.top = top
        space = top * math.prod(self.minres)
        self.from_deter = BlockLinear(deter, space, blocks)
        self.from_stoch = nn.Sequential(Linear(stoch, 2 * units), NormAct(2 * units), Linear(2 * units, space))
        self.space_norm = ChannelNorm(top)
        layers: list[nn.Module] = []
        widths = [depth * m for m in reversed(STAGE_MULTIPLIERS)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [Upsample2x(), Conv2d(cin, cout), ChannelNorm(cout), nn.SiLU()]
        layers += [Upsample2x(), Conv2d(widths[-1], channels)]
        self.net = nn.Sequential(*layers)
        self.shape = (height, width, channels)

    def forward(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """(*lead, deter), (*lead, stoch) -> image in [0, 1] of (*lead, H, W, C)."""
        lead = deter.shape[:-1]
        h, w = self.minres
        g = self.blocks
        x0 = self.from_deter(deter.reshape(-1, self.deter))  # (N, g * h * w * c/g)
        x0 = x0.reshape(-1, g, h, w, self.top // g).permute(0, 1, 4, 2, 3).reshape(-1, self.top, h, w)
        x1 = self.from_stoch(stoch.reshape(-1, stoch.shape[-1])).reshape(-1, h, w, self.top).permute(0, 3, 1, 2)
        x = torch.nn.functional.silu(self.space_norm(x0 + x1))
        x = self.net(x.contiguous(memory_format=torch.channels_last))
        return torch.sigmoid(x.float()).permute(0, 2, 3, 1).reshape(*lead, *self.shape)


class MultiDecoder(nn.Module):
    """Reconstructs every image key with a ConvDecoder and the vector keys with one MLP that
    predicts their symlog; losses are squared errors summed over pixels / dimensions."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], deter: int, stoch: int, depth: int, units: int, mlp_layers: int = 3):
        super().__init__()
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.image_keys, self.vector_keys = split_keys(self.shapes)
        self.convs = nn.ModuleDict({k: ConvDecoder(self.shapes[k], deter, stoch, depth, units) for k in self.image_keys})
        self.vector_dims = [self.shapes[k][0] for k in self.vector_keys]
        self.mlp = (
            nn.Sequential(MLP(deter + stoch, units, mlp_layers), Linear(units, sum(self.vector_dims)))
            if self.vector_keys
            else None
        )

    def forward(self, deter: torch.Tensor, stoch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [0, 1] and vectors in symlog space, by key."""
        out = {k: conv(deter, stoch) for k, conv in self.convs.items()}
        if self.mlp is not None:
            vectors = self.mlp(torch.cat([deter, stoch.to(deter.dtype)], -1)).float()
            out.update(zip(self.vector_keys, vectors.split(self.vector_dims, -1)))
        return out

    def losses(self, deter: torch.Tensor, stoch: torch.Tensor, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-key squared error, summed over pixels (or dimensions), averaged over samples."""
        losses = {}
        for key, pred in self(deter, stoch).items():
            if key in self.convs:
                target = obs[key].float() / 255.0
                losses[key] = (pred - target).square().sum((-3, -2, -1)).mean()
            else:
                losses[key] = (pred - symlog(obs[key].float())).square().sum(-1).mean()
        return losses

"""Slow copies of networks: the slow critic, MuDreamer's value teacher, DreamerPro's target encoder."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, rate: float, taken: torch.Tensor) -> None:
    """target <- (1 - rate) * target + rate * source, parameters and buffers, where `taken` (a 0-d
    bool tensor: the update was taken; decided on the device)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.copy_(torch.where(taken, t.lerp(s.detach(), rate), t))
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(torch.where(taken, t.lerp(s, rate) if t.dtype.is_floating_point else s, t))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that takes no gradient: the start of a slow/EMA network."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone

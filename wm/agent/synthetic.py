"""Random replay batches with the layout the agent trains on, for benchmarks and tests."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F


def random_batch(
    observation_shapes: Mapping[str, tuple[int, ...]],
    action_dim: int,
    discrete: bool,
    batch: int,
    length: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A (batch, length) batch: uint8 images, float vectors, actions (one-hot if discrete),
    rewards, and episode flags with a start at t = 0 and one episode boundary mid-sequence."""
    g = generator
    out: dict[str, torch.Tensor] = {}
    for key, shape in observation_shapes.items():
        if len(shape) == 3:
            out[key] = torch.randint(0, 256, (batch, length, *shape), dtype=torch.uint8, generator=g)
        else:
            out[key] = torch.randn(batch, length, *shape, generator=g)
    if discrete:
        out["action"] = F.one_hot(torch.randint(0, action_dim, (batch, length), generator=g), action_dim).float()
    else:
        out["action"] = torch.rand(batch, length, action_dim, generator=g) * 2 - 1
    out["reward"] = torch.randn(batch, length, generator=g)
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    is_last = torch.zeros(batch, length, dtype=torch.bool)
    if length > 2:
        is_first[:, length // 2] = True
        is_last[:, length // 2 - 1] = True
    out["action"][is_first] = 0.0  # no action led to the first observation of an episode
    out["is_first"], out["is_last"] = is_first, is_last
    out["is_terminal"] = is_last.clone()
    return out

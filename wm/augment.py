"""Random-shift image augmentation (DrQ), the R2-Dreamer paper's "+ augmentation" ablation."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_shift(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every (H, W, C) image of a (*lead, H, W, C) batch by its own random integer offset
    in [-pad, pad] per axis, filling the border by edge replication. Keeps the dtype. The
    offsets are drawn from `generator` (on the images' device; default: torch's global one),
    rows first: the output's pixel (i, j) is the input's (i + dy - pad, j + dx - pad), clamped."""
    lead, (height, width, channels) = images.shape[:-3], images.shape[-3:]
    x = images.reshape(-1, height, width, channels)
    n = x.shape[0]
    padded = F.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate").permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(height, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (dx + torch.arange(width, device=x.device))[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    return out.to(images.dtype).reshape(*lead, height, width, channels)

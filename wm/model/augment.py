"""Random translation of image sequences by whole pixels: the official R2-Dreamer code's
`random_translate` (DreamerPro's two views), also the `augment=True` ablation of any objective."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def sequence_shift(images: torch.Tensor, max_shift: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, H, W, C) images, each sequence moved by one random whole-pixel offset (dy, dx) in
    [-max_shift, max_shift] per axis, the same for all its steps; the border repeats the edge.

    Every output pixel is an input pixel (no resampling, so the image stays sharp), and the dtype
    is kept. The offsets are drawn from `generator` (on the images' device; default: torch's global
    one), rows first: the output's pixel (i, j) is the input's (i + dy, j + dx), clamped."""
    batch, length, height, width, channels = images.shape
    pad = int(max_shift)
    x = images.reshape(batch * length, height, width, channels)
    padded = F.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate").permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), device=x.device, generator=generator).repeat_interleave(length, 0)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), device=x.device, generator=generator).repeat_interleave(length, 0)
    rows = (dy + torch.arange(height, device=x.device))[:, :, None]  # (B T, H, 1)
    cols = (dx + torch.arange(width, device=x.device))[:, None, :]  # (B T, 1, W)
    out = padded[torch.arange(batch * length, device=x.device)[:, None, None], rows, cols]
    return out.to(images.dtype).reshape(batch, length, height, width, channels)

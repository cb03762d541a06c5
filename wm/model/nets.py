"""Building blocks shared by every network of the agent (docs/algorithm.md §1 "Networks").

RMSNorm after every hidden layer, SiLU activations and DreamerV3's truncated-normal fan-in
initialisation. Layers take channels-last tensors with any number of leading dimensions, so
the same module serves a (B, T, ...) sequence and a (B, ...) batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

TRUNC_NORMAL_STD = 1.1368  # makes a [-2, 2] truncated normal have unit variance


def init_fan_in_(weight: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
    """Truncated normal in [-2, 2] times 1.1368 * sqrt(1 / fan_in) * scale (scale 0 gives zeros)."""
    with torch.no_grad():
        if scale == 0.0:
            return weight.zero_()
        nn.init.trunc_normal_(weight, mean=0.0, std=1.0, a=-2.0, b=2.0)
        return weight.mul_(TRUNC_NORMAL_STD * math.sqrt(1.0 / fan_in) * scale)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, scale only (no offset), eps 1e-4."""

    def __init__(self, dim: int, eps: float = 1e-4):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * scale, computed in float32 (torch's fused kernel)."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear with DreamerV3's fan-in initialisation and zero bias."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, outscale: float = 1.0):
        super().__init__(in_dim, out_dim, bias=bias)
        init_fan_in_(self.weight, in_dim, outscale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class BlockLinear(nn.Module):
    """Block-diagonal linear layer: `blocks` independent linears over equal slices of the input.

    Used by the GRU so that a 2048-wide state costs 1/8 of a dense layer. The fan-in of the
    initialisation is the full input width, as in both official codes (docs/algorithm.md §1), so
    a block layer starts with the weight scale of the dense layer it stands in for.
    """

    def __init__(self, in_dim: int, out_dim: int, blocks: int):
        super().__init__()
        if in_dim % blocks or out_dim % blocks:
            raise ValueError(f"BlockLinear: {in_dim=} and {out_dim=} must divide by {blocks=}")
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, in_dim // blocks, out_dim // blocks))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        init_fan_in_(self.weight, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks).transpose(0, 1)  # (G, N, in/G)
        y = torch.bmm(x, self.weight.to(x.dtype)).transpose(0, 1)  # (N, G, out/G)
        return y.reshape(*lead, -1) + self.bias.to(y.dtype)

    def forward_shared(self, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """`forward` of the input whose block g is [own's slice g, shared]: (N, G * k) and (N, S)
        with in/G = k + S. Each block's weight splits into the rows for its own slice and the
        rows for the shared part, so the shared part is one dense matmul and the (N, G, k + S)
        input is never built (the GRU's input, where it was the largest copy of a step)."""
        n, g = own.shape[0], self.blocks
        k = own.shape[-1] // g
        weight = self.weight.to(own.dtype)
        y = torch.bmm(own.reshape(n, g, k).transpose(0, 1), weight[:, :k]).transpose(0, 1).reshape(n, -1)
        dense = weight[:, k:].permute(1, 0, 2).reshape(shared.shape[-1], -1)  # (S, out): block g's columns
        return torch.addmm(self.bias.to(y.dtype), shared.to(y.dtype), dense) + y


class NormAct(nn.Sequential):
    """RMSNorm (or BatchNorm1d, MuDreamer's switch) then SiLU: what follows every hidden layer."""

    def __init__(self, dim: int, kind: str = "rms"):
        if kind not in ("rms", "batch"):
            raise ValueError(f"unknown norm {kind!r}: use 'rms' or 'batch'")
        super().__init__(RMSNorm(dim) if kind == "rms" else nn.BatchNorm1d(dim), nn.SiLU())


class MLP(nn.Sequential):
    """`layers` x (Linear(units) + RMSNorm + SiLU). Zero layers is the identity."""

    def __init__(self, in_dim: int, units: int, layers: int):
        modules: list[nn.Module] = []
        for i in range(layers):
            modules += [Linear(in_dim if i == 0 else units, units), NormAct(units)]
        super().__init__(*modules)
        self.out_dim = units if layers else in_dim


class Head(nn.Module):
    """MLP trunk plus an output layer; `outscale` 0 zero-initialises the output (reward, value)."""

    def __init__(self, in_dim: int, out_dim: int, units: int, layers: int, outscale: float = 1.0):
        super().__init__()
        self.trunk = MLP(in_dim, units, layers)
        self.out = Linear(self.trunk.out_dim, out_dim, outscale=outscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x))


class Conv2d(nn.Conv2d):
    """Same-padded conv with fan-in initialisation; input and output are NCHW."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 5):
        super().__init__(in_ch, out_ch, kernel, padding=kernel // 2)
        init_fan_in_(self.weight, in_ch * kernel * kernel)
        nn.init.zeros_(self.bias)


def _quadrants(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four pixels of every 2x2 window of an NCHW map, in max_pool2d's scan order."""
    return x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]


class _MaxPool2x2(torch.autograd.Function):
    """2x2 max-pool as pointwise ops, forward and backward, for the compiler.

    Inductor lowers max_pool2d's backward to a scatter plus an unvectorised gather loop, which
    cost about a third of a compiled size12M update on the CPU. Here the gradient goes to the
    first maximum of each window, as in max_pool2d, by masks the compiler fuses into one pass.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = _quadrants(x)
        return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, pooled = ctx.saved_tensors
        a, b, c, d = _quadrants(x)
        first_a = a == pooled
        first_b = (b == pooled) & ~first_a
        first_c = (c == pooled) & ~(first_a | first_b)
        first_d = ~(first_a | first_b | first_c)
        zero = grad.new_zeros(())
        # Assemble the full map in (N, H, W, C) order so it comes out channels-last, the layout
        # the conv backward reads; built in NCHW order it cost an extra transposing copy.
        ga, gb, gc, gd = (torch.where(first, grad, zero).permute(0, 2, 3, 1) for first in (first_a, first_b, first_c, first_d))
        n, h, w, channels = ga.shape
        full = torch.stack([torch.stack([ga, gb], 3), torch.stack([gc, gd], 3)], 2)  # (N, H/2, 2, W/2, 2, C)
        return full.reshape(n, 2 * h, 2 * w, channels).permute(0, 3, 1, 2)


class MaxPool2x2(nn.Module):
    """2x2 max-pool with stride 2: max_pool2d when eager, fusable pointwise ops when compiled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _MaxPool2x2.apply(x)
        return F.max_pool2d(x, 2)


def _repeat_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of an NCHW map as a broadcast and a reshape, channels-last."""
    n, channels, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # (N, H, 1, W, 1, C)
    return pixels.expand(n, h, 2, w, 2, channels).reshape(n, 2 * h, 2 * w, channels).permute(0, 3, 1, 2)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling: interpolate when eager, a broadcast and reshape when compiled.

    Compiled, the reshape's backward is a sum over each 2x2 window that inductor fuses; it lowers
    interpolate's backward to an index_put scatter, about 1 s per size12M decoder pass on the CPU.
    Eager, interpolate's own kernels are the faster ones.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _repeat_2x(x)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class ChannelNorm(nn.Module):
    """Normalisation over the channels of an NCHW map: RMSNorm per pixel, or BatchNorm2d.

    BatchNorm is MuDreamer's switch against representation collapse (docs/algorithm.md §2).
    """

    def __init__(self, channels: int, kind: str = "rms"):
        super().__init__()
        if kind not in ("rms", "batch"):
            raise ValueError(f"unknown norm {kind!r}: use 'rms' or 'batch'")
        self.kind = kind
        self.norm = RMSNorm(channels) if kind == "rms" else nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "batch":
            return self.norm(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity near zero."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of symlog: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(x.abs())

"""LaProp with adaptive gradient clipping and linear warm-up: the single optimiser of docs/algorithm.md §1."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LaProp(torch.optim.Optimizer):
    """LaProp (Ziyin et al. 2020) as DreamerV3 chains it: per-tensor adaptive gradient clipping,
    then RMS normalisation of the gradient, then momentum of the normalised gradient, both
    bias-corrected, then a learning rate warmed up linearly over `warmup` updates.

    AGC scales a tensor's gradient g down to clip * max(pmin, ||w||) when ||g|| exceeds it.
    The update count (and so the warm-up position) is kept in each param group, so a resumed
    run continues the warm-up where it stopped.
    """

    def __init__(
        self,
        params,
        lr: float = 4e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-20,
        agc: float = 0.3,
        pmin: float = 1e-3,
        warmup: int = 1000,
    ):
        if lr < 0 or eps < 0 or agc < 0 or warmup < 0:
            raise ValueError(f"LaProp: lr, eps, agc and warmup must be >= 0 (got {lr}, {eps}, {agc}, {warmup})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, agc=agc, pmin=pmin, warmup=warmup, updates=0))

    def current_lr(self, group: dict) -> float:
        step = group["updates"] + 1
        return group["lr"] * (min(1.0, step / group["warmup"]) if group["warmup"] else 1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = self.current_lr(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if group["agc"]:
                    limit = group["agc"] * torch.clamp(p.detach().float().norm(), min=group["pmin"])
                    grad = grad * torch.clamp(limit / grad.norm().clamp(min=1e-30), max=1.0)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["nu"] = torch.zeros_like(p, dtype=torch.float32)
                    state["mu"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                state["nu"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                nu_hat = state["nu"] / (1 - beta2**t)
                state["mu"].mul_(beta1).add_(grad / (nu_hat.sqrt() + group["eps"]), alpha=1 - beta1)
                p.add_((state["mu"] / (1 - beta1**t)).to(p.dtype), alpha=-lr)
            group["updates"] += 1
        return loss


@dataclass
class OptimizerConfig:
    """docs/algorithm.md §1 optimiser: LaProp, lr 4e-5, 1000 warm-up updates, AGC 0.3 with pmin 1e-3."""

    lr: float = 4e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-20
    agc: float = 0.3
    pmin: float = 1e-3
    warmup: int = 1000

    def build(self, params) -> LaProp:
        return LaProp(params, self.lr, (self.beta1, self.beta2), self.eps, self.agc, self.pmin, self.warmup)

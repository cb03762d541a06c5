"""LaProp with adaptive gradient clipping and linear warm-up: the single optimiser of docs/algorithm.md §1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wm.model.phases import phase


class LaProp(torch.optim.Optimizer):
    """LaProp (Ziyin et al. 2020) as DreamerV3 chains it: per-tensor adaptive gradient clipping,
    then RMS normalisation of the gradient, then momentum of the normalised gradient, both
    bias-corrected, then a learning rate warmed up linearly over `warmup` updates.

    AGC scales a tensor's gradient g down to clip * max(pmin, ||w||) when ||g|| exceeds it.
    The update count (warm-up position and bias correction) is a tensor in each param group, so
    a resumed run continues the warm-up where it stopped and a step never reads a value back to
    the host. `step(finite=flag)` takes the step only where the 0-d bool tensor `flag` is true:
    otherwise parameters, moments and the count stay bit-exact, decided on the device.
    The arithmetic runs as `torch._foreach_*` ops over all tensors of a group at once.
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

    @staticmethod
    def _updates(group: dict) -> torch.Tensor:
        """The group's update count as a float64 tensor (exact bias corrections) on its parameters' device (a checkpoint
        may hold an int, or a tensor restored on another device)."""
        device = group["params"][0].device
        updates = group["updates"]
        if not torch.is_tensor(updates) or updates.device != device or updates.dtype != torch.float64:
            group["updates"] = updates = torch.as_tensor(updates, dtype=torch.float64).to(device)
        return updates

    def current_lr(self, group: dict, updates: torch.Tensor | None = None) -> torch.Tensor:
        """The rate of the group's next step (or of the step that makes the count `updates`)."""
        step = self._updates(group) + 1 if updates is None else updates
        return group["lr"] * (torch.clamp(step / group["warmup"], max=1.0) if group["warmup"] else torch.ones_like(step))

    @torch.no_grad()
    def step(self, closure=None, finite: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, finite)
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor], finite: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        old = self._updates(group)
        take = torch.ones((), dtype=torch.bool, device=old.device) if finite is None else finite.to(old.device)
        updates = old + take.double()
        lr = self.current_lr(group, updates)
        grads = [p.grad.float() for p in params]
        if group["agc"]:
            weight_norms = torch.stack(torch._foreach_norm([p.float() for p in params]))
            grad_norms = torch.stack(torch._foreach_norm(grads))
            limit = group["agc"] * weight_norms.clamp(min=group["pmin"])
            grads = torch._foreach_mul(grads, list(torch.clamp(limit / grad_norms.clamp(min=1e-30), max=1.0).unbind()))
        for p in params:
            if p not in self.state or "nu" not in self.state[p]:
                self.state[p] = {"nu": torch.zeros_like(p, dtype=torch.float32), "mu": torch.zeros_like(p, dtype=torch.float32)}
        nus = [self.state[p]["nu"] for p in params]
        mus = [self.state[p]["mu"] for p in params]
        new_nus = torch._foreach_mul(nus, beta2)
        torch._foreach_addcmul_(new_nus, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(torch._foreach_div(new_nus, 1 - beta2**updates))
        torch._foreach_add_(denominators, group["eps"])
        new_mus = torch._foreach_mul(mus, beta1)
        torch._foreach_add_(new_mus, torch._foreach_div(grads, denominators), alpha=1 - beta1)
        steps = torch._foreach_mul(new_mus, -lr / (1 - beta1**updates))
        for p, nu, mu, new_nu, new_mu, step in zip(params, nus, mus, new_nus, new_mus, steps):
            nu.copy_(torch.where(take, new_nu, nu))
            mu.copy_(torch.where(take, new_mu, mu))
            p.copy_(torch.where(take, p + step.to(p.dtype), p))
        old.copy_(updates)


@dataclass(frozen=True)
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


def finite_flags(total: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Whether each gradient tensor, then (last) the loss, is entirely finite: one fused check.

    The max-abs norm is inf or NaN exactly when a value is (an L2 norm would overflow to inf on
    large finite gradients).
    """
    norms = torch._foreach_norm(grads, float("inf")) if grads else []
    return torch.stack([n.float() for n in norms] + [total.detach().float()]).isfinite()


def guarded_step(module, total: torch.Tensor, saved_buffers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Backward of `total` and one step of the LightningModule's (LaProp) optimiser, taken only if
    the loss and every gradient are finite, decided on the device: otherwise parameters, optimiser
    state and the module's buffers (as `saved_buffers`, cloned before the forward) keep their
    values. Returns (taken, the finite flags of each gradient then the loss, the gradients' names).
    """
    optimizer = module.optimizers()
    optimizer.zero_grad(set_to_none=True)
    with phase("backward"):
        module.manual_backward(total)
    named_grads = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    # Under a GradScaler (16-mixed) the scaled gradients overflow by design; the scaler skips
    # those steps and lowers its scale, so only the loss is checked here.
    scaled = getattr(module.trainer.precision_plugin, "scaler", None) is not None
    finite = finite_flags(total, [] if scaled else [g for _, g in named_grads])
    taken = finite.all()
    with phase("optimizer"):
        optimizer.step(finite=taken)
        optimizer.zero_grad(set_to_none=True)
        for buffer, saved in zip(module.buffers(), saved_buffers):
            buffer.copy_(torch.where(taken, buffer, saved))
    return taken, finite, [] if scaled else [name for name, _ in named_grads]

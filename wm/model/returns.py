"""Returns and their normalisation (docs/algorithm.md §1 "Losses and training")."""

from __future__ import annotations

import torch
from torch import nn


def lambda_return(
    reward: torch.Tensor, cont: torch.Tensor, boot: torch.Tensor, lam: float, last: torch.Tensor | None = None
) -> torch.Tensor:
    """TD(lambda) returns along axis 1, as DreamerV3 computes them.

    All inputs are (N, T). `reward[:, t]` and `cont[:, t]` belong to the arrival at step t (cont
    already holds the discount); `boot` is the value bootstrapped at each step. Returns (N, T - 1):

        R_t = r_{t+1} + c_{t+1} ((1 - lambda_{t+1}) boot_{t+1} + lambda_{t+1} R_{t+1}),  R_{T-1} = boot_{T-1}

    where lambda_{t+1} = lam, or 0 after an `is_last` step (the sequence was cut there).
    """
    lams = torch.full_like(reward[:, 1:], lam)
    if last is not None:
        lams = lams * (1.0 - last[:, 1:].float())
    live = cont[:, 1:]
    interm = reward[:, 1:] + (1.0 - lams) * live * boot[:, 1:]
    returns = [boot[:, -1]]
    for t in reversed(range(live.shape[1])):
        returns.append(interm[:, t] + live[:, t] * lams[:, t] * returns[-1])
    return torch.stack(returns[:0:-1], 1)


def quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """`torch.quantile(values, qs)` with linear interpolation, for a 1-D `values`: the positions
    are known from the shape alone, so nothing is read back to the host (torch.quantile checks
    its `q` on the host)."""
    ordered = values.sort().values
    last = values.shape[0] - 1
    out = []
    for q in qs:
        position = q * last
        below = int(position)
        above = min(below + 1, last)
        out.append(ordered[below].lerp(ordered[above], position - below))
    return torch.stack(out)


@torch.no_grad()
def replay_returns(
    reward: torch.Tensor, cont: torch.Tensor, boot: torch.Tensor, lam: float, last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value targets on a real replayed (B, T) sequence, which may cross episode boundaries.

    Returns the lambda-returns (B, T - 1), cut where the sequence reaches an `is_last` step, and
    their weights (B, T - 1): 0 at an `is_last` step itself, whose return would run into the next
    episode. No gradient flows into either.
    """
    return lambda_return(reward, cont, boot, lam, last=last), 1.0 - last[:, :-1].float()


class ReturnNormalizer(nn.Module):
    """Scale S = EMA of (P_hi - P_lo) of the returns; advantages are divided by max(limit, S).

    The EMAs of both percentiles are kept (their difference is the EMA of the range, the EMA
    being linear) so that both can be logged. Zero-initialised, not debiased, as DreamerV3.
    """

    def __init__(self, rate: float = 0.01, limit: float = 1.0, low: float = 5.0, high: float = 95.0):
        super().__init__()
        self.rate, self.limit = rate, limit
        self.quantiles = (low / 100.0, high / 100.0)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def advance(self, returns: torch.Tensor) -> torch.Tensor:
        """(low, high) after one update with `returns`, without storing it: a loss may use the
        advanced scale while the training step alone stores it (`store_`)."""
        q = quantiles(returns.detach().float().flatten(), self.quantiles)
        return torch.stack([self.low, self.high]).lerp(q, self.rate)

    @torch.no_grad()
    def store_(self, low_high: torch.Tensor, taken: torch.Tensor) -> None:
        """Keep an `advance` result, where `taken` (a 0-d bool tensor: the update was taken)."""
        self.low.copy_(torch.where(taken, low_high[0], self.low))
        self.high.copy_(torch.where(taken, low_high[1], self.high))

    def scale(self, low_high: torch.Tensor | None = None) -> torch.Tensor:
        """max(limit, high - low) of the stored EMAs, or of an `advance` result."""
        low, high = (self.low, self.high) if low_high is None else low_high.unbind()
        return torch.clamp(high - low, min=self.limit)

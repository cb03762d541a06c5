"""The output distributions of docs/algorithm.md §1: categorical latents, two-hot, policies and continue flag."""

from __future__ import annotations

import torch
from torch import distributions as td
from torch.nn import functional as F

from wm.nets import symexp

# Uniform mix of discrete policies, shared by MuDreamer's action head (same family as the
# policy). R2-Dreamer does not state it; DreamerV3 uses 1%.
POLICY_UNIMIX = 0.01


def unimix_logits(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """Log of (1 - unimix) * softmax(logits) + unimix / classes over the last dimension."""
    probs = F.softmax(logits.float(), -1)
    if unimix:
        probs = (1.0 - unimix) * probs + unimix / probs.shape[-1]
    return torch.log(probs)


def mode_onehot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the most likely class."""
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def categorical_kl(lhs_logits: torch.Tensor, rhs_logits: torch.Tensor) -> torch.Tensor:
    """KL[lhs || rhs] of independent categoricals, summed over latents and classes:
    logits (..., latents, classes) -> (...)."""
    lhs_logp = F.log_softmax(lhs_logits.float(), -1)
    rhs_logp = F.log_softmax(rhs_logits.float(), -1)
    return (lhs_logp.exp() * (lhs_logp - rhs_logp)).sum((-2, -1))


def symexp_bins(count: int = 255, limit: float = 20.0) -> torch.Tensor:
    """symexp(linspace(-limit, limit, count)), built from one half so that it is exactly
    symmetric and a uniform prediction decodes to exactly zero."""
    if count % 2 != 1:
        raise ValueError(f"two-hot needs an odd number of bins, got {count}")
    half = symexp(torch.linspace(-limit, 0.0, (count + 1) // 2, dtype=torch.float64))
    return torch.cat([half, -half[:-1].flip(0)]).float()


class TwoHot:
    """Two-hot distribution over fixed bins, for rewards and values (docs/algorithm.md §1).

    A target is split between its two nearest bins so that the weighted sum of the bins is the
    target itself; the prediction is the expected bin under softmax(logits).
    """

    def __init__(self, bins: torch.Tensor):
        self.bins = bins

    def encode(self, target: torch.Tensor) -> torch.Tensor:
        """Weights over the bins whose weighted sum is `target` (clipped to the bin range)."""
        bins = self.bins.to(target.device)
        target = target.float().clamp(bins[0], bins[-1])
        above = torch.searchsorted(bins, target.contiguous(), right=True).clamp(1, len(bins) - 1)
        below = above - 1
        lo, hi = bins[below], bins[above]
        weight_hi = ((target - lo) / (hi - lo)).clamp(0.0, 1.0)
        return F.one_hot(below, len(bins)) * (1 - weight_hi)[..., None] + F.one_hot(
            above, len(bins)
        ) * weight_hi[..., None]

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected value; sums the negative and positive halves separately so that symmetric
        probabilities give exactly zero."""
        probs = F.softmax(logits.float(), -1)
        bins = self.bins.to(logits.device)
        m = len(bins) // 2
        weighted = probs * bins
        return weighted[..., m] + (weighted[..., :m].flip(-1) + weighted[..., m + 1 :]).sum(-1)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy to the two-hot encoding of `target`."""
        return -(self.encode(target.detach()) * F.log_softmax(logits.float(), -1)).sum(-1)


def continuous_policy(raw: torch.Tensor, min_std: float = 0.1, max_std: float = 1.0) -> td.Distribution:
    """Bounded normal: mean tanh(mu), std (max - min) * sigmoid(x + 2) + min; dims independent."""
    mu, x = raw.float().chunk(2, -1)
    std = (max_std - min_std) * torch.sigmoid(x + 2.0) + min_std
    return td.Independent(td.Normal(torch.tanh(mu), std, validate_args=False), 1, validate_args=False)


def discrete_policy(raw: torch.Tensor, unimix: float) -> td.Distribution:
    """Categorical over one-hot actions with `unimix` uniform mixing."""
    return td.OneHotCategorical(logits=unimix_logits(raw, unimix), validate_args=False)


def policy_mode(dist: td.Distribution) -> torch.Tensor:
    """Greedy action: the mean of a normal, the most likely one-hot of a categorical."""
    if isinstance(dist, td.OneHotCategorical):
        return mode_onehot(dist.logits)
    return dist.mean


def continue_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood of a (soft) continue target in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")

"""The output distributions of docs/algorithm.md §1: categorical latents, two-hot, policies and continue flag."""

from __future__ import annotations

import torch
from torch import distributions as td
from torch.nn import functional as F

from wm.model.nets import symexp

# Uniform mix of discrete policies, shared by MuDreamer's action head (same family as the
# policy). R2-Dreamer does not state it; DreamerV3 uses 1%.
POLICY_UNIMIX = 0.01


def unimix_logits(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """Log of (1 - unimix) * softmax(logits) + unimix / classes over the last dimension."""
    probs = F.softmax(logits.float(), -1)
    if unimix:
        probs = (1.0 - unimix) * probs + unimix / probs.shape[-1]
    return torch.log(probs)


def onehot(index: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot vectors of `index` (..., ) -> (..., classes). Unlike `F.one_hot` it does not check
    the index range, which on the CPU reads the indices back to the host (a sync per call)."""
    return (index[..., None] == torch.arange(classes, device=index.device)).to(dtype)


def mode_onehot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the most likely class."""
    return onehot(logits.argmax(-1), logits.shape[-1], logits.dtype)


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
        return onehot(below, len(bins)) * (1 - weight_hi)[..., None] + onehot(above, len(bins)) * weight_hi[..., None]

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


class OneHotCategorical:
    """Categorical over one-hot vectors. torch.distributions' version checks its arguments on the
    host whatever `validate_args` says (its inner Categorical validates), a sync per call."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)  # normalised log-probabilities

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p of one-hot `value`s."""
        return (value * self.logits).sum(-1)

    def entropy(self) -> torch.Tensor:
        logits = self.logits.clamp(min=torch.finfo(self.logits.dtype).min)  # 0 * log 0 = 0
        return -(self.probs * logits).sum(-1)


def discrete_policy(raw: torch.Tensor, unimix: float) -> OneHotCategorical:
    """Categorical over one-hot actions with `unimix` uniform mixing."""
    return OneHotCategorical(unimix_logits(raw, unimix))


def policy_mode(dist: td.Distribution | OneHotCategorical) -> torch.Tensor:
    """Greedy action: the mean of a normal, the most likely one-hot of a categorical."""
    if isinstance(dist, OneHotCategorical):
        return mode_onehot(dist.logits)
    return dist.mean


def sample_policy(dist: td.Distribution | OneHotCategorical) -> torch.Tensor:
    """A sample of a policy, drawn without a host sync: a normal by reparameterisation (its
    `sample` checks the std on the host), a categorical by Gumbel-max over its logits. Same law
    as `dist.sample()`, no gradient."""
    with torch.no_grad():
        if isinstance(dist, OneHotCategorical):
            return gumbel_max(dist.logits)
        return dist.rsample()


def gumbel_max(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample of softmax(logits): argmax(logits + Gumbel noise)."""
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-20, 1.0)))
    return mode_onehot(logits + gumbel)


def continue_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood of a (soft) continue target in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")

"""Recurrent state-space model with a block-diagonal GRU (docs/algorithm.md §1 "RSSM")."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from wm.model.distributions import gumbel_max, unimix_logits
from wm.model.nets import MLP, BlockLinear, Linear, NormAct
from wm.model.sizes import ModelSize


class State(NamedTuple):
    """Latent state: deterministic GRU state and one-hot stochastic latents."""

    deter: torch.Tensor  # (*lead, deter)
    stoch: torch.Tensor  # (*lead, stoch, classes)

    @property
    def feat(self) -> torch.Tensor:
        """concat(deter, flattened stoch): what every head reads."""
        return torch.cat([self.deter, self.stoch.flatten(-2).to(self.deter.dtype)], -1)

    def map(self, fn) -> "State":
        return State(fn(self.deter), fn(self.stoch))

    def masked(self, keep: torch.Tensor) -> "State":
        """Zero the state where keep == 0 (the reset at `is_first`)."""
        keep = keep.to(self.deter.dtype)
        return State(self.deter * keep[..., None], self.stoch * keep[..., None, None])


def sample_latents(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample (Gumbel-max) with straight-through gradients through the probabilities."""
    onehot = gumbel_max(logits)
    probs = F.softmax(logits, -1)
    return onehot + probs - probs.detach()


class BlockGRU(nn.Module):
    """DreamerV3's GRU core: deter, stoch and action each through Linear(hidden) + norm + SiLU,
    concatenated with every block's slice of deter, one block-linear layer, then the gates."""

    def __init__(self, size: ModelSize, action_dim: int):
        super().__init__()
        d, h, g = size.deter, size.hidden, size.blocks
        self.blocks = g
        self.deter_in = nn.Sequential(Linear(d, h), NormAct(h))
        self.stoch_in = nn.Sequential(Linear(size.stoch * size.classes, h), NormAct(h))
        self.action_in = nn.Sequential(Linear(action_dim, h), NormAct(h))
        self.hidden = nn.Sequential(BlockLinear(d + 3 * h * g, d, g), NormAct(d))
        self.gates = BlockLinear(d, 3 * d, g)

    def forward(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        g, n = self.blocks, deter.shape[0]
        action = action / action.abs().clamp(min=1.0).detach()
        x = torch.cat([self.deter_in(deter), self.stoch_in(stoch.flatten(1).to(deter.dtype)), self.action_in(action)], -1)
        # block g reads [deter's slice g, x]: the same as hidden(cat(deter slices, x per block))
        block_linear, norm = self.hidden
        x = self.gates(norm(block_linear.forward_shared(deter, x)))
        reset, cand, update = x.reshape(n, g, 3, -1).unbind(2)
        reset, cand, update = (t.reshape(n, -1) for t in (reset, cand, update))
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * deter


class RSSM(nn.Module):
    """Prior p(z_t | h_t), posterior q(z_t | h_t, e_t) and the GRU h_t = f(h_{t-1}, z_{t-1}, a_{t-1}).

    `posterior_norm` "batch" puts BatchNorm (over the batch, at every step) in the posterior's
    hidden layer instead of RMSNorm: one of MuDreamer's placements.

    Actions are aligned with observations: `action[t]` is the action that led to observation t
    (zeros where `is_first`).
    """

    def __init__(self, size: ModelSize, embed_dim: int, action_dim: int, unimix: float = 0.01, posterior_norm: str = "rms"):
        super().__init__()
        self.size, self.unimix = size, unimix
        self.action_dim = action_dim
        latent = size.stoch * size.classes
        self.core = BlockGRU(size, action_dim)
        self.prior = nn.Sequential(MLP(size.deter, size.hidden, 2), Linear(size.hidden, latent))
        # Posterior over [deter, embed]: one hidden layer. Its first linear is applied in two
        # halves so that the embedding half runs once for the whole sequence in `observe`.
        self.post_in = Linear(size.deter + embed_dim, size.hidden)
        self.post_out = nn.Sequential(NormAct(size.hidden, posterior_norm), Linear(size.hidden, latent))
        self.compiled_step = None  # `observe_step` compiled, when the agent compiles its regions

    def initial(self, batch: int, device: torch.device | str = "cpu") -> State:
        s = self.size
        return State(torch.zeros(batch, s.deter, device=device), torch.zeros(batch, s.stoch, s.classes, device=device))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(*x.shape[:-1], self.size.stoch, self.size.classes)
        return unimix_logits(x, self.unimix)

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        return self._logits(self.prior(deter))

    def _embed_part(self, embed: torch.Tensor) -> torch.Tensor:
        return F.linear(embed, self.post_in.weight[:, self.size.deter :], self.post_in.bias)

    def _posterior_logits(self, deter: torch.Tensor, embed_part: torch.Tensor) -> torch.Tensor:
        x = F.linear(deter, self.post_in.weight[:, : self.size.deter]) + embed_part
        return self._logits(self.post_out(x))

    def observe(
        self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor, state: State | None = None
    ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """Filter a (B, T) sequence: posterior states, posterior logits and prior logits."""
        batch, length = embed.shape[:2]
        state = state if state is not None else self.initial(batch, embed.device)
        embed_part = self._embed_part(embed)
        keep = 1.0 - is_first.float()
        step = self.compiled_step or self.observe_step
        deters, stochs, post_logits = [], [], []
        for t in range(length):
            deter, stoch, logits = step(state.deter, state.stoch, action[:, t], keep[:, t], embed_part[:, t])
            state = State(deter, stoch)
            deters.append(deter)
            stochs.append(stoch)
            post_logits.append(logits)
        deter = torch.stack(deters, 1)
        posterior = State(deter, torch.stack(stochs, 1))
        return posterior, torch.stack(post_logits, 1), self.prior_logits(deter)

    def observe_step(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, keep: torch.Tensor,
                     embed_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One filtering step on tensors (the repeated block a compile of regions compiles): the
        state reset where keep == 0, the GRU, the posterior logits and their sample."""
        state = State(deter, stoch).masked(keep)
        deter = self.core(state.deter, state.stoch, action * keep[:, None])
        logits = self._posterior_logits(deter, embed_part)
        return deter, sample_latents(logits), logits

    def obs_step(self, state: State, action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor) -> State:
        """One filtering step for acting in an environment."""
        deter, stoch, _ = self.observe_step(state.deter, state.stoch, action, 1.0 - is_first.float(), self._embed_part(embed))
        return State(deter, stoch)

    def img_step(self, state: State, action: torch.Tensor) -> State:
        """One step of the prior: imagine the next state given an action."""
        deter = self.core(state.deter, state.stoch, action)
        return State(deter, sample_latents(self.prior_logits(deter)))

"""The actor-critic that learns behaviour inside the world model's imagination (docs/algorithm.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import distributions as td

from wm.model.distributions import POLICY_UNIMIX, TwoHot, continuous_policy, discrete_policy, symexp_bins
from wm.model.nets import Head
from wm.model.ema import ema_update_, frozen_copy
from wm.model.returns import ReturnNormalizer, lambda_return, replay_returns
from wm.model.sizes import ModelSize


@dataclass(frozen=True)
class ActorCriticConfig:
    """Behaviour-learning settings of docs/algorithm.md §1 (DreamerV3 2024 values)."""

    horizon: int = 15  # imagined steps (16 states with the start)
    lam: float = 0.95
    entropy: float = 3e-4
    slow_rate: float = 0.02  # slow critic EMA, every update
    slow_reg: float = 1.0  # weight of the cross-entropy to the slow critic
    retnorm_rate: float = 0.01
    retnorm_limit: float = 1.0
    policy_unimix: float = POLICY_UNIMIX  # discrete policies (and MuDreamer's action head)
    layers: int = 3


class ActorCritic(L.LightningModule):
    """Policy, critic, slow critic and return normaliser."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, size: ModelSize, config: ActorCriticConfig | None = None):
        super().__init__()
        self.config = config = config or ActorCriticConfig()
        self.discrete = discrete
        self.two_hot = TwoHot(symexp_bins())
        self.actor = Head(feat_dim, action_dim * (1 if discrete else 2), size.units, config.layers, outscale=0.01)
        self.critic = Head(feat_dim, len(self.two_hot.bins), size.units, config.layers, outscale=0.0)
        self.slow_critic = frozen_copy(self.critic)
        self.retnorm = ReturnNormalizer(config.retnorm_rate, config.retnorm_limit)

    def policy(self, feat: torch.Tensor) -> td.Distribution:
        raw = self.actor(feat)
        return discrete_policy(raw, self.config.policy_unimix) if self.discrete else continuous_policy(raw)

    def value(self, feat: torch.Tensor, slow: bool = False) -> torch.Tensor:
        return self.two_hot.decode((self.slow_critic if slow else self.critic)(feat))

    def _critic_loss(self, feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Two-hot cross-entropy to the return plus slow_reg times that to the slow critic."""
        logits = self.critic(feat)
        with torch.no_grad():
            slow = self.value(feat, slow=True)
        return self.two_hot.loss(logits, target) + self.config.slow_reg * self.two_hot.loss(logits, slow)

    def imagination_loss(
        self, feat: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, cont: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Actor and critic losses on an imagined rollout.

        feat (N, H + 1, F) imagined states (no gradient to the world model), action (N, H, A) the
        actions taken in the first H states, reward and cont (N, H + 1) predicted for arriving
        at each state. Returns the losses and the lambda-returns (N, H).

        Changes no state: the advantage is scaled by the return normaliser advanced with these
        returns, and the advanced EMAs are returned as `return_low` / `return_high` for the
        training step to store once the update is taken.
        """
        with torch.no_grad():
            value = self.value(feat)
            ret = lambda_return(reward, cont, value, self.config.lam)
            low_high = self.retnorm.advance(ret)
            scale = self.retnorm.scale(low_high)
            adv = (ret - value[:, :-1]) / scale
            weight = torch.cumprod(cont, 1)[:, :-1]
        dist = self.policy(feat[:, :-1])
        logp, entropy = dist.log_prob(action), dist.entropy()
        policy = -(weight * (logp * adv + self.config.entropy * entropy)).mean()
        critic = (weight * self._critic_loss(feat[:, :-1], ret)).mean()
        stats = {
            "policy": policy,
            "critic": critic,
            "policy_entropy": entropy.mean().detach(),
            "imag_return": ret.mean(),
            "return_scale": scale,
            "return_low": low_high[0],
            "return_high": low_high[1],
            "advantage": adv.mean(),
        }
        return stats, ret

    def replay_value_loss(
        self, feat: torch.Tensor, reward: torch.Tensor, cont: torch.Tensor, last: torch.Tensor, boot: torch.Tensor
    ) -> torch.Tensor:
        """"repval": the critic on the real (B, T) sequence, lambda-returns from real rewards and
        continues, bootstrapped from the imagined returns `boot`; its gradient reaches the world
        model through `feat`."""
        ret, weight = replay_returns(reward, cont, boot, self.config.lam, last)
        return (weight * self._critic_loss(feat[:, :-1], ret)).mean()

    def update_slow_critic(self, taken: torch.Tensor) -> None:
        ema_update_(self.slow_critic, self.critic, self.config.slow_rate, taken)

"""DreamerPro (Deng et al., 2022): prototypical representations instead of reconstruction, as the
official R2-Dreamer code trains it (NM512/r2dreamer), whose numbers both papers' tables compare with.

The world model trains on the batch as it is (KL, reward and continue losses, imagination starts,
the replay value); every batch is also translated twice (`sequence_shift`: whole pixels up to 3, one
offset per sequence), and the two views go through the encoder and the RSSM as one batch of 2B
sequences whose states feed only the prototype losses, a SwAV-style clustering:

- projections: the embedding through `obs_proj` (embed -> 32), the latent feature through
  `feat_proj` (feat -> 32), both L2-normalised; scores are dot products with 2,500 prototypes of
  unit length (drawn from a standard normal, re-normalised after every update), over the
  temperature 0.1, a softmax over the prototypes;
- targets: an EMA copy of the encoder and `obs_proj` (fraction 0.05 every update) scores each
  view, and Sinkhorn-Knopp (epsilon 0.05, 3 iterations) turns those scores into assignments;
- `swav`: each view's observation logits predict the other view's assignments; `temp`: the latent
  feature's logits predict the assignments of its own step and view; `norm`: the squared deviation
  of both projections' norms from 1, over every step. Scale 1 each; the first step of every
  sequence is left out of `swav` and `temp` (warm-up 1); the prototypes are frozen for the first
  10,000 updates.

`train_on_views=True` trains as DreamerPro's own code does instead: no clean pass, every
world-model loss on the two views, imagination and the replay context from the first view.
The KL weights are the shared core's, DreamerV3's (docs/algorithm.md §2 says why).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from wm.model.augment import sequence_shift
from wm.objectives.base import ModelDims, Objective, ObjectiveInputs
from wm.model.ema import ema_update_, frozen_copy


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp assignments (N, K) of N samples to K prototypes from their scores (N, K):
    an equal share of the samples for every prototype, each sample's assignments summing to 1."""
    scores = scores.float()
    q = torch.exp((scores - scores.max()) / epsilon).T  # (K, N)
    q = q / q.sum()
    prototypes, samples = q.shape
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / prototypes
        q = q / q.sum(0, keepdim=True) / samples
    return (q * samples).T


def cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-sum_k targets log softmax(logits), averaged over the samples (rows)."""
    return -(targets * F.log_softmax(logits.float(), -1)).sum(-1).mean()


class DreamerPro(Objective):
    """Prototypical representations with two augmented views (see the module's docstring)."""

    def __init__(
        self,
        num_prototypes: int = 2500,
        dim: int = 32,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        target_rate: float = 0.05,
        freeze_prototypes: int = 10_000,
        max_shift: int = 3,
        warmup: int = 1,
        swav_scale: float = 1.0,
        temp_scale: float = 1.0,
        norm_scale: float = 1.0,
        train_on_views: bool = False,
        probe_decoder: bool = False,
    ):
        super().__init__(augment=False, probe_decoder=probe_decoder)  # it augments its own two views
        self.num_prototypes, self.dim, self.temperature = num_prototypes, dim, temperature
        self.sinkhorn_epsilon, self.sinkhorn_iterations = sinkhorn_epsilon, sinkhorn_iterations
        self.target_rate, self.freeze_prototypes, self.max_shift, self.warmup = target_rate, freeze_prototypes, max_shift, warmup
        self.swav_scale, self.temp_scale, self.norm_scale = swav_scale, temp_scale, norm_scale
        self.train_on_views = train_on_views
        self.scales = {"swav": swav_scale, "temp": temp_scale, "norm": norm_scale}

    def build(self, dims: ModelDims) -> None:
        if self.online_encoder is None:
            raise ValueError("DreamerPro keeps an EMA copy of the world model's encoder: attach it with the encoder")
        self.obs_proj = nn.Linear(dims.embed_dim, self.dim)  # PyTorch's default initialisation, as the official code
        self.feat_proj = nn.Linear(dims.feat_dim, self.dim)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(self.num_prototypes, self.dim), dim=-1))  # (K, dim)
        self.target_encoder = frozen_copy(self.online_encoder)
        self.target_obs_proj = frozen_copy(self.obs_proj)
        self.register_buffer("updates", torch.zeros((), dtype=torch.float32))  # taken updates, for the freeze

    def shifted_views(self, obs: Mapping[str, torch.Tensor], image_keys: list[str]) -> dict[str, torch.Tensor]:
        """Two views of every sequence, each with its own shift: (2B, T, ...); vectors repeated."""
        views = [{k: sequence_shift(v, self.max_shift) if k in image_keys else v for k, v in obs.items()} for _ in range(2)]
        return {k: torch.cat([views[0][k], views[1][k]]) for k in obs}

    def encoder_input(self, obs: Mapping[str, torch.Tensor], image_keys: list[str]) -> Mapping[str, torch.Tensor]:
        return self.shifted_views(obs, image_keys) if self.train_on_views else obs

    def views(self, obs: Mapping[str, torch.Tensor], image_keys: list[str]) -> Mapping[str, torch.Tensor] | None:
        return None if self.train_on_views else self.shifted_views(obs, image_keys)

    def unit_prototypes(self) -> torch.Tensor:
        """The L2-normalised prototypes (K, dim); no gradient reaches them while they are frozen,
        decided on the device: they train from the `freeze_prototypes`-th taken update on (the
        official code's count, which includes the update being made)."""
        weight = self.prototypes
        trainable = (self.updates + 1 >= self.freeze_prototypes).to(weight.dtype)
        return F.normalize(weight.detach() + trainable * (weight - weight.detach()), dim=-1)

    def forward(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        views, start = inputs.views, self.warmup
        prototypes = self.unit_prototypes().float()
        obs_raw = self.obs_proj(views.embed).float()  # (2B, T, dim)
        feat_raw = self.feat_proj(views.posterior.feat).float()
        obs_logits = F.normalize(obs_raw[:, start:], dim=-1) @ prototypes.T / self.temperature
        feat_logits = F.normalize(feat_raw[:, start:], dim=-1) @ prototypes.T / self.temperature
        with torch.no_grad():
            target = self.target_obs_proj(self.target_encoder(views.obs)[:, start:])
            target_scores = F.normalize(target.float(), dim=-1) @ prototypes.T
        half = views.embed.shape[0] // 2
        assign = [sinkhorn(target_scores[i * half:(i + 1) * half].reshape(-1, self.num_prototypes),
                           self.sinkhorn_epsilon, self.sinkhorn_iterations) for i in range(2)]
        obs_views = [obs_logits[i * half:(i + 1) * half].reshape(-1, self.num_prototypes) for i in range(2)]
        feat_views = [feat_logits[i * half:(i + 1) * half].reshape(-1, self.num_prototypes) for i in range(2)]
        swav = 0.5 * (cross_entropy(assign[1], obs_views[0]) + cross_entropy(assign[0], obs_views[1]))
        temp = 0.5 * (cross_entropy(assign[0], feat_views[0]) + cross_entropy(assign[1], feat_views[1]))
        norm = (obs_raw.norm(dim=-1) - 1).square().mean() + (feat_raw.norm(dim=-1) - 1).square().mean()
        return {"swav": swav, "temp": temp, "norm": norm}

    def after_update(self, taken: torch.Tensor) -> None:
        """The EMA teachers follow (on taken updates), and the prototypes return to unit length."""
        ema_update_(self.target_encoder, self.online_encoder, self.target_rate, taken)
        ema_update_(self.target_obs_proj, self.obs_proj, self.target_rate, taken)
        self.updates += taken.to(self.updates.dtype)
        with torch.no_grad():
            self.prototypes.copy_(torch.where(taken, F.normalize(self.prototypes, dim=-1), self.prototypes))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the prototypes were a plain parameter kept them as a Linear's weight."""
        old = state_dict.pop(prefix + "prototypes.weight", None)
        if old is not None:
            state_dict[prefix + "prototypes"] = old
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

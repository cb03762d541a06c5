"""MuDreamer: no reconstruction; value and previous-action prediction shape the representation."""

from __future__ import annotations

import torch

from wm.model.distributions import POLICY_UNIMIX, TwoHot, continuous_policy, discrete_policy, symexp_bins
from wm.model.nets import Head
from wm.objectives.base import ModelDims, Objective, ObjectiveInputs
from wm.model.ema import ema_update_, frozen_copy
from wm.model.returns import replay_returns


BATCHNORM_PLACES = ("encoder", "posterior", "both", "none")


def action_nll(raw: torch.Tensor, target: torch.Tensor, discrete: bool, unimix: float = POLICY_UNIMIX) -> torch.Tensor:
    """Negative log-likelihood of `target` under the policy's distribution family.

    Continuous: normal with mean tanh(mu), std 0.9 sigmoid(x + 2) + 0.1, dims summed; targets are
    taken as they are (the buffer's actions were already clipped to [-1, 1] when acting, and the
    normal gives any real target a finite likelihood). Discrete: categorical with `unimix` (the
    policy's) over one-hot targets.
    """
    dist = discrete_policy(raw, unimix) if discrete else continuous_policy(raw)
    return -dist.log_prob(target.float())


class MuDreamer(Objective):
    """MuDreamer's representation objective (docs/algorithm.md §2).

    - value head: predicts the lambda-return of the replayed sequence, computed from the real
      rewards and continues and bootstrapped from an EMA teacher of the head (two-hot
      cross-entropy). It shapes the representation only; acting uses the actor-critic's critic.
    - action head: predicts a_{t-1} from (e_t, s_{t-1}) (inverse dynamics), NLL of the policy's
      distribution family, skipped where an episode starts (no previous action).
    - BatchNorm in the "representation network" instead of RMSNorm. The paper leaves open whether
      that is the image encoder or the posterior (docs/algorithm.md §2): `batchnorm` is "both"
      (the default, chosen by the representation probes), "encoder", "posterior" or "none" (True
      and False, the switch's older values, mean "encoder" and "none").
    - optional decoder on sg(s_t) for visualisation only (`probe_decoder`, as on any objective).
    - KL weights 0.95 / 0.05.
    Head depths, loss scales and the teacher rate are not published: defaults are the critic's
    depth (3 layers), scale 1 and the slow critic's rate 0.02.
    """

    def __init__(
        self,
        value_head: bool = True,
        action_head: bool = True,
        batchnorm: str | bool = "both",
        value_scale: float = 1.0,
        action_scale: float = 1.0,
        head_layers: int = 3,
        teacher_rate: float = 0.02,
        lam: float = 0.95,
        kl_dyn: float = 0.95,
        kl_rep: float = 0.05,
        augment: bool = False,
        probe_decoder: bool = False,
    ):
        super().__init__(augment=augment, probe_decoder=probe_decoder)
        batchnorm = {True: "encoder", False: "none"}.get(batchnorm, batchnorm)
        if batchnorm not in BATCHNORM_PLACES:
            raise ValueError(f"batchnorm={batchnorm!r}: choose one of {', '.join(BATCHNORM_PLACES)}")
        self.value_head, self.action_head, self.batchnorm = value_head, action_head, batchnorm
        self.value_scale, self.action_scale = value_scale, action_scale
        self.head_layers, self.teacher_rate, self.lam = head_layers, teacher_rate, lam
        self.kl_dyn, self.kl_rep = kl_dyn, kl_rep
        self.encoder_norm = "batch" if batchnorm in ("encoder", "both") else "rms"
        self.posterior_norm = "batch" if batchnorm in ("posterior", "both") else "rms"

    def build(self, dims: ModelDims) -> None:
        s = dims.size
        self.discrete, self.policy_unimix = dims.discrete, dims.policy_unimix
        self.scales = {}
        if self.value_head:
            self.two_hot = TwoHot(symexp_bins())
            self.value = Head(dims.feat_dim, len(self.two_hot.bins), s.units, self.head_layers, outscale=0.0)
            self.teacher = frozen_copy(self.value)
            self.scales["value"] = self.value_scale
        if self.action_head:
            out = dims.action_dim * (1 if dims.discrete else 2)
            self.inverse = Head(dims.embed_dim + dims.feat_dim, out, s.units, self.head_layers)
            self.scales["action"] = self.action_scale

    def forward(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        losses = {}
        post = inputs.posterior
        if self.value_head:
            feat = post.feat
            with torch.no_grad():
                boot = self.two_hot.decode(self.teacher(feat))
            ret, weight = replay_returns(inputs.reward, inputs.cont, boot, self.lam, inputs.is_last)
            loss = self.two_hot.loss(self.value(feat[:, :-1]), ret)
            losses["value"] = (weight * loss).mean()
        if self.action_head:
            raw = self.inverse(torch.cat([inputs.embed, inputs.prev_feat], -1))
            nll = action_nll(raw, inputs.action, self.discrete, self.policy_unimix)
            valid = 1.0 - inputs.is_first.float()
            losses["action"] = (valid * nll).sum() / valid.sum().clamp(min=1.0)
        return losses

    def after_update(self, taken: torch.Tensor) -> None:
        if self.value_head:
            ema_update_(self.teacher, self.value, self.teacher_rate, taken)

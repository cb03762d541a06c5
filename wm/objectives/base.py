"""The interface of a representation objective: the single point where the three methods differ.

An objective is built after the shared core (it needs the core's sizes), receives everything the
world model computed on a replayed batch, and returns its named loss terms. It may also ask the
core for a different encoder norm or KL weights and augment the encoder's input; nothing else
of the core knows which objective is in use.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from wm.model.augment import sequence_shift
from wm.model.decoder import MultiDecoder
from wm.model.distributions import POLICY_UNIMIX
from wm.model.nets import Linear
from wm.model.rssm import State
from wm.model.sizes import ModelSize


@dataclass(frozen=True)
class ModelDims:
    """Sizes of the shared core that an objective's networks are built for."""

    size: ModelSize
    observation_shapes: Mapping[str, tuple[int, ...]]
    embed_dim: int
    action_dim: int
    discrete: bool
    policy_unimix: float = POLICY_UNIMIX  # the discrete policy's uniform mix

    @property
    def feat_dim(self) -> int:
        return self.size.feat_dim


@dataclass
class ObservedViews:
    """Augmented views of the batch's sequences, V per sequence, observed through the encoder and
    the RSSM: what an objective that compares views (DreamerPro) reads."""

    obs: Mapping[str, torch.Tensor]  # what the encoder saw, (V B, T, ...): view v is rows v B .. (v + 1) B
    embed: torch.Tensor  # (V B, T, E)
    posterior: State  # (V B, T)


@dataclass
class ObjectiveInputs:
    """What the world model computed on a (B, T) batch, handed to the objective."""

    obs: Mapping[str, torch.Tensor]  # raw observations, images uint8 (B, T, H, W, C)
    embed: torch.Tensor  # encoder output e_t, (B, T, E)
    posterior: State  # posterior states s_t, (B, T)
    prev_feat: torch.Tensor  # feat of s_{t-1} (the initial state at t = 0), (B, T, F)
    action: torch.Tensor  # a_{t-1}: the action that led to o_t, (B, T, A)
    reward: torch.Tensor  # (B, T)
    cont: torch.Tensor  # discounted continue target (1 - 1/H)(1 - terminal), (B, T)
    is_first: torch.Tensor  # (B, T)
    is_last: torch.Tensor  # (B, T)
    views: ObservedViews | None = None  # the augmented views the objective asked for (`views`), observed


class Objective(nn.Module):
    """Base class. Subclasses set `scales`, build their networks in `build` and return unscaled
    loss terms from `forward`; the world model adds sum(scales[k] * terms[k]) to its loss.

    `augment` turns on random-shift augmentation of the encoder's input images (the R2-Dreamer
    paper's ablation), for any objective. `probe_decoder` adds a decoder that learns to
    reconstruct the observations from sg(s_t), as MuDreamer's optional decoder does: its
    gradient reaches only itself, so it changes nothing else, and it lets a person see what a
    decoder-free latent holds (open-loop predictions). Its terms are `probe_<key>`.
    """

    scales: dict[str, float] = {}
    encoder_norm: str = "rms"  # "batch" puts BatchNorm in the encoder (MuDreamer)
    posterior_norm: str = "rms"  # "batch" puts BatchNorm in the posterior's hidden layer (MuDreamer)
    kl_dyn: float | None = None  # KL weights that replace the core's defaults when set
    kl_rep: float | None = None

    def __init__(self, augment: bool = False, probe_decoder: bool = False):
        super().__init__()
        self.augment, self.probe_decoder = augment, probe_decoder

    def attach(self, dims: ModelDims, encoder: nn.Module | None = None) -> None:
        """Build the objective's networks for the core's sizes, and the probe decoder if asked.
        `encoder` is the world model's, for objectives that keep a target copy of it (it is not
        registered here: its parameters belong to the world model)."""
        self.__dict__["online_encoder"] = encoder
        self.build(dims)
        if self.probe_decoder:
            s = dims.size
            self.probe = MultiDecoder(dims.observation_shapes, s.deter, s.stoch * s.classes, s.depth, s.units)
            self.scales = {**self.scales, **{f"probe_{k}": 1.0 for k in dims.observation_shapes}}

    def build(self, dims: ModelDims) -> None:
        """Create the objective's networks for the core's sizes."""

    def losses(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        """The objective's terms (`forward`) and the probe decoder's, on the detached posterior."""
        terms = self(inputs)
        if self.probe_decoder:
            post = inputs.posterior
            probe = self.probe.losses(post.deter.detach(), post.stoch.flatten(-2).detach(), inputs.obs)
            terms.update({f"probe_{k}": v for k, v in probe.items()})
        return terms

    def image_decoder(self) -> MultiDecoder | None:
        """The decoder that turns latent states back into observations, for inspection; None
        without one."""
        return self.probe if self.probe_decoder else None

    def encoder_input(self, obs: Mapping[str, torch.Tensor], image_keys: list[str]) -> Mapping[str, torch.Tensor]:
        """The observations the world model's own losses are taken on: (B, T, ...), shifted when
        `augment` is on, or V views of every sequence as (V B, T, ...), which the world model then
        observes and scores all (DreamerPro's own code does that)."""
        if not self.augment:
            return obs
        return {k: sequence_shift(v) if k in image_keys else v for k, v in obs.items()}

    def views(self, obs: Mapping[str, torch.Tensor], image_keys: list[str]) -> Mapping[str, torch.Tensor] | None:
        """Augmented views (V B, T, ...) that the world model observes in a second pass for this
        objective alone (`ObjectiveInputs.views`): the official R2-Dreamer code's DreamerPro. None:
        no second pass."""
        return None

    def forward(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        """Unscaled scalar loss terms, by name."""
        return {}

    def after_update(self, taken: torch.Tensor) -> None:
        """Called after every optimiser step (EMA teachers); `taken` (a 0-d bool tensor) is
        false when the update was skipped, and the teachers must then keep their values."""

    def describe(self) -> dict:
        """{'class_path', 'init_args'}: how to rebuild this objective (saved in checkpoints)."""
        params = inspect.signature(type(self).__init__).parameters
        init_args = {name: getattr(self, name) for name in params if name != "self"}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}


class ProjectedLatent(Objective):
    """An objective that compares k_t = W s_t, a bias-free projection of the latent feature to the
    embedding size, with the detached embedding sg(e_t) (Barlow, InfoNCE): the encoder learns only
    through the posterior."""

    def build(self, dims: ModelDims) -> None:
        self.projector = Linear(dims.feat_dim, dims.embed_dim, bias=False)

    def projected_and_target(self, inputs: ObjectiveInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, sg(e)), each flattened to B*T rows."""
        feat = inputs.posterior.feat
        projected = self.projector(feat.reshape(-1, feat.shape[-1]))
        return projected, inputs.embed.reshape(-1, inputs.embed.shape[-1]).detach()

"""The world model: encoder, RSSM, reward and continue heads, plus the representation objective."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import lightning as L
import torch

from wm.model.distributions import POLICY_UNIMIX, TwoHot, categorical_kl, continue_loss, symexp_bins
from wm.model.encoder import MultiEncoder
from wm.model.nets import Head
from wm.objectives import ModelDims, Objective, ObjectiveInputs, ObservedViews
from wm.model.phases import phase
from wm.model.rssm import RSSM, State
from wm.model.sizes import ModelSize, trainable_counts


@dataclass(frozen=True)
class WorldModelConfig:
    """Loss weights of docs/algorithm.md §1 (DreamerV3 2024 values). An objective may replace the KL weights."""

    kl_dyn: float = 1.0
    kl_rep: float = 0.1
    free_nats: float = 1.0
    pred_scale: float = 1.0  # beta_pred, on the reward and continue losses
    discount_horizon: float = 333.0  # continue target (1 - 1/H)(1 - terminal)
    unimix: float = 0.01


@dataclass
class WorldModelOutput:
    loss: torch.Tensor  # scalar, weighted sum of all terms
    terms: dict[str, torch.Tensor]  # unscaled scalar terms, for logging
    posterior: State  # (B, T) posterior states
    cont: torch.Tensor  # (B, T) continue targets


def kl_losses(post_logits: torch.Tensor, prior_logits: torch.Tensor, free_nats: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL balancing with free bits: (dyn, rep), each (...) and clipped below at `free_nats`.

    dyn = max(free, KL[sg(q) || p]) trains the prior; rep = max(free, KL[q || sg(p)]) trains the
    posterior. KL is summed over the latents.
    """
    dyn = categorical_kl(post_logits.detach(), prior_logits)
    rep = categorical_kl(post_logits, prior_logits.detach())
    return dyn.clamp(min=free_nats), rep.clamp(min=free_nats)


def repeat_views(batch: Mapping[str, torch.Tensor], initial: State | None,
                 views: int) -> tuple[Mapping[str, torch.Tensor], State | None]:
    """The batch's actions, rewards and flags and the initial state, repeated for V views of
    every sequence (view v is rows v B .. (v + 1) B)."""
    if views == 1:
        return batch, initial
    batch = {k: torch.cat([batch[k]] * views) for k in ("action", "reward", "is_first", "is_last", "is_terminal")}
    return batch, initial.map(lambda x: torch.cat([x] * views)) if initial is not None else None


class WorldModel(L.LightningModule):
    """Learns the latent dynamics from replayed (B, T) sequences."""

    def __init__(
        self,
        observation_shapes: Mapping[str, tuple[int, ...]],
        action_dim: int,
        discrete: bool,
        size: ModelSize,
        objective: Objective,
        config: WorldModelConfig | None = None,
        policy_unimix: float = POLICY_UNIMIX,
    ):
        """`policy_unimix` is the actor's, for objectives that model actions like the policy."""
        super().__init__()
        self.config = config = config or WorldModelConfig()
        self.size = size
        self.encoder = MultiEncoder(observation_shapes, size.depth, size.units, norm=objective.encoder_norm)
        self.rssm = RSSM(size, self.encoder.out_dim, action_dim, config.unimix, objective.posterior_norm)
        self.two_hot = TwoHot(symexp_bins())
        self.reward = Head(size.feat_dim, len(self.two_hot.bins), size.units, 1, outscale=0.0)
        self.cont = Head(size.feat_dim, 1, size.units, 1)
        self.objective = objective
        objective.attach(ModelDims(size, dict(observation_shapes), self.encoder.out_dim, action_dim, discrete, policy_unimix),
                         self.encoder)
        self.kl_dyn = objective.kl_dyn if objective.kl_dyn is not None else config.kl_dyn
        self.kl_rep = objective.kl_rep if objective.kl_rep is not None else config.kl_rep

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per module: the core's and each of the objective's own (its heads,
        a parameter of its own such as DreamerPro's prototypes; EMA teachers are not trained)."""
        modules = {"encoder": self.encoder, "rssm": self.rssm, "reward": self.reward, "continue": self.cont}
        modules.update(dict(self.objective.named_children()))
        modules.update(self.objective.named_parameters(recurse=False))
        return trainable_counts(modules)

    def compile_regions(self, options: Mapping) -> None:
        """Compile the blocks an update repeats or calls whole: the filtering step, the encoder
        and the objective's forward (the agent adds its imagined step; the loops stay eager)."""
        self.rssm.compiled_step = torch.compile(self.rssm.observe_step, **options)
        objective = [self.objective] if any(True for _ in self.objective.parameters()) else []  # `none`: nothing to compile
        for module in (self.encoder, *objective):
            module.compile(**options)

    def drop_compiled(self) -> None:
        """Forget every compiled region, so what runs next is eager."""
        self.rssm.compiled_step = None
        for module in self.modules():
            module._compiled_call_impl = None  # what `nn.Module.compile` set

    def continue_target(self, is_terminal: torch.Tensor) -> torch.Tensor:
        return (1.0 - 1.0 / self.config.discount_horizon) * (1.0 - is_terminal.float())

    def predict_reward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.two_hot.decode(self.reward(feat))

    def predict_continue(self, feat: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.cont(feat).squeeze(-1).float())

    def observe(self, obs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                initial: State | None) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
        """The encoder and the RSSM over (N, T) observations whose N is a multiple of the batch's
        B (V views of every sequence): embed, posterior, and the posterior and prior logits."""
        batch, initial = repeat_views(batch, initial, next(iter(obs.values())).shape[0] // batch["reward"].shape[0])
        with phase("encode"):
            embed = self.encoder(obs)
        with phase("observe"):
            post, post_logits, prior_logits = self.rssm.observe(embed, batch["action"], batch["is_first"], initial)
        return embed, post, post_logits, prior_logits

    def loss(self, batch: Mapping[str, torch.Tensor], initial: State | None = None) -> WorldModelOutput:
        """World-model loss of docs/algorithm.md §1 on a batch of (B, T) tensors.

        The batch holds the observation keys, `action` (B, T, A) aligned so that action[t] led to
        observation t, `reward`, `is_first`, `is_last` and `is_terminal`. `initial` is the latent
        state before the first step (replay context); zeros when None. The losses are taken on
        what the objective's `encoder_input` gives: the batch, or V views of every sequence (V B
        sequences, all observed and scored; the posterior returned is the first view's (B, T)).
        An objective that asks for `views` gets them observed in a second pass of their own.
        """
        obs = self.encoder.select(batch)
        seen = self.objective.encoder_input(obs, self.encoder.image_keys)
        batch_size = batch["reward"].shape[0]
        views = next(iter(seen.values())).shape[0] // batch_size
        if views > 1:  # the world model trains on several views of every sequence (DreamerPro's own code)
            batch, initial = repeat_views(batch, initial, views)
            obs = {k: torch.cat([v] * views) for k, v in obs.items()}
        embed, post, post_logits, prior_logits = self.observe(seen, batch, initial)
        dyn, rep = kl_losses(post_logits, prior_logits, self.config.free_nats)
        feat = post.feat
        cont = self.continue_target(batch["is_terminal"])
        terms = {
            "dyn": dyn.mean(),
            "rep": rep.mean(),
            "reward": self.two_hot.loss(self.reward(feat), batch["reward"]).mean(),
            "continue": continue_loss(self.cont(feat).squeeze(-1), cont).mean(),
        }
        loss = self.kl_dyn * terms["dyn"] + self.kl_rep * terms["rep"]
        loss = loss + self.config.pred_scale * (terms["reward"] + terms["continue"])
        extra = self.objective.views(obs, self.encoder.image_keys)
        if extra is not None:  # a second pass over augmented views, for the objective alone
            extra_embed, extra_post, _, _ = self.observe(extra, batch, initial)
            observed_views = ObservedViews(extra, extra_embed, extra_post)
        else:
            observed_views = ObservedViews(seen, embed, post) if views > 1 else None
        initial = initial if initial is not None else self.rssm.initial(feat.shape[0], feat.device)
        prev_feat = torch.cat([initial.feat[:, None].to(feat.dtype), feat[:, :-1]], 1)
        inputs = ObjectiveInputs(
            obs, embed, post, prev_feat, batch["action"], batch["reward"].float(), cont, batch["is_first"], batch["is_last"],
            observed_views,
        )
        with phase("objective"):
            objective_terms = self.objective.losses(inputs)
        for name, value in objective_terms.items():
            loss = loss + self.objective.scales[name] * value
        terms.update(objective_terms)
        terms["prior_entropy"] = -(prior_logits.exp() * prior_logits).sum(-1).mean().detach()
        terms["post_entropy"] = -(post_logits.exp() * post_logits).sum(-1).mean().detach()
        # Imagination and the replay context go on from the first view: the batch's own sequences.
        return WorldModelOutput(loss, terms, post.map(lambda x: x[:batch_size]), cont[:batch_size])

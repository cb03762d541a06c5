"""The agent: a world model and an actor-critic trained together by one optimiser (docs/algorithm.md §1).

One update, read top to bottom in `losses` and `training_step`:
  1. world-model loss on a replayed (B, T) batch, with the objective's terms;
  2. imagination from every posterior state (B * T starts, horizon 15), no gradient;
  3. actor (REINFORCE) and critic losses on the imagined rollouts;
  4. replay-value loss: the critic on the real sequence, its gradient reaching the world model;
  5. one backward over the sum, one LaProp step (AGC + warm-up inside), then the state updates:
     return normaliser, slow critic, the objective's EMA teachers. `losses` itself changes no
     state but BatchNorm's running statistics in training mode.
An update whose loss or gradients are not finite is skipped: nothing of the model or the optimiser
changes (see `training_step`). Nothing in an update reads a value back to the host, so that a GPU
never waits and the update can be compiled whole (`compile`, `loss_function`).
"""

from __future__ import annotations

import importlib
import os
import inspect
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from wm.agent.actor_critic import ActorCritic, ActorCriticConfig
from wm.model.distributions import policy_mode, sample_policy
from wm.objectives import DEFAULT_OBJECTIVE, Objective, make_objective
from wm.model.optim import OptimizerConfig, guarded_step
from wm.model.phases import phase
from wm.model.rssm import State
from wm.model.sizes import model_size, parameter_table, trainable_counts
from wm.agent.update_stats import UpdateStats
from wm.agent.world_model import WorldModel, WorldModelConfig


COMPILE_CACHE = Path.home() / ".cache" / "wm" / "torch_compile"


def set_compile_cache() -> None:
    """Keep torch.compile's caches (inductor's kernels, AOTAutograd's graphs) in a folder that
    outlives a reboot, COMPILE_CACHE, instead of inductor's default under /tmp; a folder the user
    chose with TORCHINDUCTOR_CACHE_DIR is kept. A warm cache saves most of the compile time."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):  # inductor writes its default in
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)


def compile_options(device: torch.device) -> dict:
    """torch.compile's options for the update's graphs: fullgraph (a graph break is an error),
    static shapes, CUDA graphs ("reduce-overhead") on a GPU and inductor's C++ kernels on a CPU."""
    return {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead" if device.type == "cuda" else None}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a loss or gradients that were not finite."""


def module_of(parameter: str) -> str:
    """The module a parameter belongs to, as `parameter_counts` splits the agent:
    world_model.rssm, world_model.objective.projector, actor_critic.critic."""
    parts = parameter.split(".")[:-1]
    return ".".join(parts[: 3 if parts[:2] == ["world_model", "objective"] else 2])


COMPILE_SCOPES = ("regions", "update")
CONFIGS = {"world_model": WorldModelConfig, "actor_critic": ActorCriticConfig, "optimizer": OptimizerConfig}


def save_plain_hyperparameters(module: L.LightningModule, observation_shapes: Mapping[str, tuple[int, ...]],
                               objective: Objective, **configs) -> None:
    """The caller's (`module.__init__`'s) arguments as plain data in `module.hparams`: the
    objective by its class path, each config dataclass as a dict. What `rebuild` reads back."""
    module.save_hyperparameters(ignore=["objective", *configs], frame=inspect.currentframe().f_back)
    module.hparams.update(observation_shapes={k: list(v) for k, v in observation_shapes.items()},
                          objective=objective.describe(), **{name: asdict(config) for name, config in configs.items()})


def rebuild(cls: type[L.LightningModule], checkpoint: dict) -> L.LightningModule:
    """The module a checkpoint holds, built from its saved hyperparameters (the objective by its
    class path, the settings as their dataclasses), with its weights and state restored."""
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}  # not LightningCLI's
    saved = hparams.pop("objective")
    module, name = saved["class_path"].rsplit(".", 1)
    hparams["objective"] = getattr(importlib.import_module(module), name)(**saved["init_args"])
    hparams["observation_shapes"] = {key: tuple(shape) for key, shape in hparams["observation_shapes"].items()}
    hparams.update({key: config(**hparams[key]) for key, config in CONFIGS.items() if key in hparams})
    built = cls(**hparams)
    built.load_state_dict(checkpoint["state_dict"])
    built.on_load_checkpoint(checkpoint)
    return built


class ActState(NamedTuple):
    """Recurrent state of one or more environments: latent state and previous action."""

    latent: State
    action: torch.Tensor


class Agent(L.LightningModule):
    """DreamerV3 core with a replaceable representation objective.

    Args:
        observation_shapes: observation key -> shape; (H, W, C) images, (D,) vectors.
        action_dim: action dimensions (continuous) or number of actions (discrete).
        discrete: categorical policy over one-hot actions instead of a bounded normal.
        objective: the representation objective; `DEFAULT_OBJECTIVE` (R2-Dreamer's Barlow Twins)
            when None.
        size: model size preset, size1M ... size200M.
        repval_scale: weight of the replay-value loss.
        max_consecutive_skips: consecutive updates with a non-finite loss or gradient that are
            skipped before training stops with `NonFiniteLossError` (checked every log interval).
        compile: compile the update's loss and backward with `torch.compile` (see `loss_function`).
        compile_scope: what is compiled: "regions" (the repeated blocks) or "update" (one graph).
    """

    def __init__(
        self,
        observation_shapes: Mapping[str, tuple[int, ...]],
        action_dim: int,
        discrete: bool = False,
        objective: Objective | None = None,
        size: str = "size12M",
        world_model: WorldModelConfig = WorldModelConfig(),
        actor_critic: ActorCriticConfig = ActorCriticConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        repval_scale: float = 0.3,
        max_consecutive_skips: int = 10,
        compile: bool = False,
        compile_scope: str = "regions",
    ):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope={compile_scope!r}: choose one of {', '.join(COMPILE_SCOPES)}")
        super().__init__()
        self.automatic_optimization = False
        objective = objective if objective is not None else make_objective(DEFAULT_OBJECTIVE)
        self.optimizer_config = optimizer
        save_plain_hyperparameters(self, observation_shapes, objective, world_model=world_model,
                                   actor_critic=actor_critic, optimizer=optimizer)
        sizes = model_size(size)
        self.action_dim, self.discrete = action_dim, discrete
        self.world_model = WorldModel(
            observation_shapes, action_dim, discrete, sizes, objective, world_model, actor_critic.policy_unimix
        )
        self.actor_critic = ActorCritic(sizes.feat_dim, action_dim, discrete, sizes, actor_critic)
        # Updates skipped for a non-finite loss or gradient, in all (checkpointed) and in a row, as
        # of the last log interval; the live counts are on the device in `stats`.
        self.skipped_updates = self.consecutive_skips = 0
        self.stats = UpdateStats()
        self.gradient_names: list[str] = []  # of the last update, for naming non-finite gradients
        self.unlogged: dict[str, float] = {}  # the last log interval's means, for the loggers
        self._compiled_losses = None
        self._compiled_imagine_step = None  # `imagine_step` compiled (compile_scope "regions")
        self.compiled_once = False  # an update has run compiled: later errors are not the compiler's
        self.compile_failed = False  # the compile failed and the updates run eagerly
        self._batchnorms: list[nn.Module] | None = None  # found on the first `act` of a fit

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Agent:
        """The agent a `wm` checkpoint holds, rebuilt from its saved hyperparameters (no config
        needed) with its weights, ready for `act()`."""
        return rebuild(cls, torch.load(path, map_location=map_location, weights_only=True)).to(map_location)

    # ----------------------------------------------------------------------------- training
    def configure_optimizers(self):
        return self.optimizer_config.build([p for p in self.parameters() if p.requires_grad])

    def imagine_step(self, deter: torch.Tensor, stoch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One imagined step on tensors (the repeated block a compile of regions compiles): the
        policy's sampled action and the prior's next state."""
        state = State(deter, stoch)
        action = sample_policy(self.actor_critic.policy(state.feat)).to(deter.dtype)
        state = self.world_model.rssm.img_step(state, action)
        return state.deter, state.stoch, action

    @torch.no_grad()
    def imagine(self, start: State) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the policy out in the prior: features (N, H + 1, F) and actions (N, H, A)."""
        step = self._compiled_imagine_step or self.imagine_step
        feats, actions = [start.feat], []
        state = start
        for _ in range(self.actor_critic.config.horizon):
            deter, stoch, action = step(state.deter, state.stoch)
            state = State(deter, stoch)
            feats.append(state.feat)
            actions.append(action)
        return torch.stack(feats, 1), torch.stack(actions, 1)

    def losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], State]:
        """Total loss of one update, its logged terms and the posterior states (B, T)."""
        batch_size, length = batch["reward"].shape
        initial = State(batch["deter"], batch["stoch"]) if "deter" in batch else None
        wm = self.world_model.loss(batch, initial)
        start = wm.posterior.map(lambda x: x.detach().reshape(batch_size * length, *x.shape[2:]))
        with phase("imagine"):
            feat, action = self.imagine(start)
            with torch.no_grad():
                reward = self.world_model.predict_reward(feat)
                cont = self.world_model.predict_continue(feat)
            ac, returns = self.actor_critic.imagination_loss(feat, action, reward, cont)
            boot = returns[:, 0].reshape(batch_size, length)
            repval = self.actor_critic.replay_value_loss(
                wm.posterior.feat, batch["reward"].float(), wm.cont, batch["is_last"], boot
            )
        total = wm.loss + ac["policy"] + ac["critic"] + self.hparams.repval_scale * repval
        metrics = {f"world_model/{k}": v for k, v in wm.terms.items()}
        metrics.update({f"actor_critic/{k}": v for k, v in ac.items()})
        metrics.update({"actor_critic/repval": repval, "world_model/loss": wm.loss, "loss": total})
        return total, metrics, wm.posterior

    def loss_function(self):
        """`losses`, compiled on first use when `compile` is set, each piece as one graph
        (fullgraph, so a graph break is an error) with its backward through AOTAutograd; CUDA
        graphs ("reduce-overhead") on a GPU, inductor's C++ kernels on a CPU.

        `compile_scope` "regions" (the default) compiles the repeated blocks: the filtering step
        and the imagined step (policy and prior) that the update loops over, the encoder and the
        objective's forward; the loops, the heads' few calls and the loss arithmetic stay eager,
        so a cold compile is short and a change recompiles only its block. "update" compiles the
        whole update, its loops unrolled, into one graph (README "Speed" compares the two)."""
        if not self.hparams.compile or self.compile_failed:
            return self.losses
        if self._compiled_losses is None:
            set_compile_cache()
            options = compile_options(self.device)
            if self.hparams.compile_scope == "update":
                self._compiled_losses = torch.compile(self.losses, **options)
            else:
                self.world_model.compile_regions(options)
                self._compiled_imagine_step = torch.compile(self.imagine_step, **options)
                self._compiled_losses = self.losses
        return self._compiled_losses

    def drop_compiled(self) -> None:
        """Forget every compiled graph and region, so what runs next is eager."""
        self._compiled_losses = self._compiled_imagine_step = None
        self.world_model.drop_compiled()

    def forward_backward(self, batch: Mapping[str, torch.Tensor], buffers: list[torch.Tensor]):
        """The losses, their backward and the guarded optimiser step (see `training_step`)."""
        torch.compiler.cudagraph_mark_step_begin()  # the last update's graph outputs are consumed
        total, metrics, posterior = self.loss_function()(batch)
        optimizer = self.optimizers()
        metrics["optimizer/lr"] = optimizer.optimizer.current_lr(optimizer.param_groups[0])
        taken, finite, self.gradient_names = guarded_step(self, total, buffers)
        return total, metrics, posterior, taken, finite

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict:
        """One update, without a host sync. If its loss or a gradient is not finite, the update
        is a no-op decided on the device: parameters, optimiser state (warm-up included),
        buffers (BatchNorm statistics, return normaliser), slow critic and objective teachers keep
        their values, and the output's `taken` is false (the replay keeps its old latents).
        Metrics are summed on the device and logged, with the skip count, once per log interval.
        A compiled update whose first compile fails runs eagerly, with a warning naming the error."""
        log_now = (self.global_step + 1) % self.trainer.log_every_n_steps == 0  # Lightning logs this batch
        buffers = [b.clone() for b in self.buffers()]  # kept if the update is skipped
        try:
            total, metrics, posterior, taken, finite = self.forward_backward(batch, buffers)
        except Exception as error:  # noqa: BLE001 - see below: only a first compiled update falls back
            if not self.hparams.compile or self.compiled_once or self.compile_failed:
                raise
            # The compile failed (a C++ compiler error, an unsupported op): nothing has been stepped
            # yet, so train eagerly from here instead of losing the run.
            self.compile_failed = True
            self.drop_compiled()
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            rank_zero_warn(f"model.compile: compiling the update failed ({type(error).__name__}: {first_line}); "
                           "training eagerly")
            for buffer, saved in zip(self.buffers(), buffers):
                buffer.copy_(saved)
            total, metrics, posterior, taken, finite = self.forward_backward(batch, buffers)
        self.compiled_once = True
        with phase("optimizer"):
            # The return normaliser keeps the EMAs this update's advantages were scaled with.
            low_high = torch.stack([metrics["actor_critic/return_low"], metrics["actor_critic/return_high"]])
            self.actor_critic.retnorm.store_(low_high, taken)
            self.actor_critic.update_slow_critic(taken)
            self.world_model.objective.after_update(taken)
        self.stats.add(metrics, taken, finite[:-1])
        if log_now:
            self.log_stats()
        # The posterior latents go back to the replay buffer (replay context) where `taken`.
        return {"loss": total.detach(), "deter": posterior.deter.detach(), "stoch": posterior.stoch.detach(), "taken": taken}

    def log_stats(self) -> None:
        """Log the means of the updates taken since the last call and the skip count, warn about
        skipped updates (naming what was not finite) and stop after too many in a row. The one
        place an update's values reach the host."""
        report = self.stats.read()
        if report is None:
            return
        self.skipped_updates, self.consecutive_skips = report.skipped_total, report.consecutive
        logged = {f"train/{k}": v for k, v in report.means.items()}
        logged["train/skipped_updates"] = float(report.skipped_total)
        # Lightning's loggers would log the last logged values once more when the fit stops, at
        # whatever step the run is then: the loggers get them once, in on_train_batch_end.
        self.log_dict(logged, logger=False)
        self.unlogged = logged
        if not report.skipped:
            return
        modules = list(dict.fromkeys(module_of(self.gradient_names[i]) for i in report.bad_gradients))
        found = [f"non-finite {', '.join(report.bad_metrics)}"] if report.bad_metrics else []
        found += [f"non-finite gradients in {', '.join(modules)}"] if modules else []
        what = "; ".join(found)
        rank_zero_warn(
            f"{report.skipped} of the last {report.updates} updates skipped, up to global step {self.global_step} "
            f"({report.consecutive} in a row, {report.skipped_total} in all); the last one: {what}"
        )
        limit = self.hparams.max_consecutive_skips
        if report.consecutive >= limit:
            raise NonFiniteLossError(
                f"{report.consecutive} consecutive updates were skipped (max_consecutive_skips={limit}, checked every "
                f"log interval) because their loss or gradients were not finite; the last: {what}. No skipped update "
                "changed the model, and the last good checkpoint is kept in the run's checkpoints folder (last.ckpt). "
                "Try a lower learning rate (model.optimizer.lr), check the environment's rewards and observations for "
                "NaN, inf or huge values, or train in full precision (trainer.precision: 32-true)."
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The interval's means go to the loggers after the callbacks' hooks, so at the env frames
        the env-interaction callback has reached with this update."""
        if self.unlogged:
            for logger in self.loggers:
                logger.log_metrics(self.unlogged, step=self.global_step)
            self.unlogged = {}

    def on_fit_start(self) -> None:
        self._batchnorms = None  # a strategy may have replaced them (SyncBatchNorm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_updates"] = self.stats.skipped_so_far()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with the differences spelled out, a checkpoint of another model; restore the
        skipped-update count (0 for a checkpoint written before it was kept)."""
        saved = checkpoint.get("hyper_parameters", {})
        keys = ("observation_shapes", "action_dim", "discrete", "size")
        differences = [f"{k}: checkpoint {saved.get(k)!r}, config {self.hparams[k]!r}" for k in keys if saved.get(k) != self.hparams[k]]
        saved_objective = (saved.get("objective") or {}).get("class_path")
        if saved_objective != self.hparams["objective"]["class_path"]:
            differences.append(f"objective: checkpoint {saved_objective!r}, config {self.hparams['objective']['class_path']!r}")
        if differences:
            raise ValueError(
                "the checkpoint belongs to another model (" + "; ".join(differences) + "). Use the config "
                "of the run that wrote it, or start a new run with another --run.name."
            )
        self.skipped_updates = checkpoint.get("skipped_updates", 0)
        self.consecutive_skips = 0
        self.stats = UpdateStats(self.skipped_updates)

    # ------------------------------------------------------------------------------ testing
    def test_step(self, episode, batch_idx: int) -> None:
        """One greedy evaluation episode of `python -m wm test`, played by the environment callback:
        the test loop averages its return, length and success over the episodes."""
        values = {"return": episode.ret, "length": episode.length, "success": episode.success}
        for name, value in values.items():
            if value is not None:  # success: only for a task that has it
                self.log(f"test/{name}", float(value), on_epoch=True, batch_size=1)

    def predict_step(self, episode, batch_idx: int):
        """One greedy episode of `python -m wm predict`, returned whole (return, frames, actions)."""
        return episode

    # ------------------------------------------------------------------------------- acting
    def initial_state(self, batch: int) -> ActState:
        return ActState(self.world_model.rssm.initial(batch, self.device), torch.zeros(batch, self.action_dim, device=self.device))

    @torch.no_grad()
    def act(self, obs: Mapping[str, torch.Tensor], state: ActState | None = None, mode: str = "sample") -> tuple[torch.Tensor, ActState]:
        """One action per environment.

        `obs` holds the observation keys with a leading env axis and `is_first` (N,): where it is
        set the recurrent state restarts from zeros. `mode` is "sample" (training) or "greedy"
        (evaluation). Continuous actions are clipped to [-1, 1]; discrete ones are one-hot.
        """
        if mode not in ("sample", "greedy"):
            raise ValueError(f"act mode must be 'sample' or 'greedy', got {mode!r}")
        is_first = obs["is_first"].to(self.device)
        state = state if state is not None else self.initial_state(is_first.shape[0])
        # BatchNorm (MuDreamer) uses its running statistics when acting: only those modules are
        # switched, not the whole agent on every call.
        if self._batchnorms is None:
            self._batchnorms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        modes = [m.training for m in self._batchnorms]
        for m in self._batchnorms:
            m.training = False
        try:  # eager: acting's batches have other shapes than the update's, which compiled regions are for
            with torch.compiler.set_stance("force_eager"):
                embed = self.world_model.encoder({k: v.to(self.device) for k, v in self.world_model.encoder.select(obs).items()})
                latent = self.world_model.rssm.obs_step(state.latent, state.action, embed, is_first)
                dist = self.actor_critic.policy(latent.feat)
                action = sample_policy(dist) if mode == "sample" else policy_mode(dist)
        finally:
            for m, mode_was in zip(self._batchnorms, modes):
                m.training = mode_was
        if not self.discrete:
            action = action.clamp(-1.0, 1.0)
        return action, ActState(latent, action)

    # --------------------------------------------------------------------------- inspection
    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per module (the slow critic and EMA teachers are not trained)."""
        ac = self.actor_critic
        return {**self.world_model.parameter_counts(), **trainable_counts({"actor": ac.actor, "critic": ac.critic})}

    def parameter_table(self) -> str:
        return parameter_table(self.parameter_counts())

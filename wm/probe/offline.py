"""`python -m wm.probe train`: the world model of any objective, trained alone on a probe dataset.

The same `WorldModel.loss` and LaProp optimiser as in a fit, with no actor-critic, imagination,
replay value or environment, on the train split of a dataset collected once
(`wm.probe.dataset`): every objective and seed sees exactly the same data, at a fraction of an RL
run's cost. The held-out split gives the validation loss. Runs, their MLflow runs, checkpoints and
resumes work as a fit's (wm.run.command):

    python -m wm.probe train --config configs/probe/train.yaml --config configs/objective/mudreamer.yaml \\
        --data.dataset data/probe/dmc-cartpole_swingup --seed_everything 1

Deliberate difference from a fit: sequences start from the zero state (no replay context), as
the latents a fit writes back come from its own, changing, model.
"""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch.utils.data import DataLoader, IterableDataset

from wm.agent.agent import compile_options, rebuild, save_plain_hyperparameters, set_compile_cache
from wm.model.distributions import POLICY_UNIMIX
from wm.run.durations import format_duration
from wm.objectives import DEFAULT_OBJECTIVE, Objective, make_objective, objective_name
from wm.model.optim import OptimizerConfig, guarded_step
from wm.probe.dataset import STATE_PREFIX, ProbeDataset
from wm.run.command import RunCLI, RunConfig
from wm.run.identity import RESUMABLE, run_name
from wm.model.sizes import model_size, parameter_table
from wm.agent.world_model import WorldModel, WorldModelConfig


class OfflineWorldModel(L.LightningModule):
    """A world model with its objective, and the optimiser a fit gives it (docs/algorithm.md §1).

    Args: as `wm.agent.Agent`'s world-model arguments; `size` defaults to size1M, the CPU studies'.
    `blind`: every image replaced by a constant, in training and when probed, so the RSSM learns from
    the actions and rewards alone: the anchor of what a world model holds without seeing.
    `compile`: compile the update's regions as a fit does (`WorldModel.compile_regions`); a probe
    of the checkpoint runs eagerly.
    """

    def __init__(
        self,
        observation_shapes: Mapping[str, tuple[int, ...]],
        action_dim: int,
        discrete: bool = False,
        objective: Objective | None = None,
        size: str = "size1M",
        world_model: WorldModelConfig = WorldModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        policy_unimix: float = POLICY_UNIMIX,
        blind: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.blind_keys = [k for k, shape in observation_shapes.items() if len(shape) == 3] if blind else []
        objective = objective if objective is not None else make_objective(DEFAULT_OBJECTIVE)
        self.optimizer_config = optimizer
        save_plain_hyperparameters(self, observation_shapes, objective, world_model=world_model, optimizer=optimizer)
        self.world_model = WorldModel(observation_shapes, action_dim, discrete, model_size(size), objective, world_model,
                                      policy_unimix)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> OfflineWorldModel:
        return rebuild(cls, torch.load(path, map_location="cpu", weights_only=True))

    def parameter_table(self) -> str:
        """Per-module parameter counts, as `Agent.parameter_table` (no actor or critic here)."""
        return parameter_table(self.world_model.parameter_counts())

    def on_fit_start(self) -> None:
        if self.hparams.compile:
            set_compile_cache()
            self.world_model.compile_regions(compile_options(self.device))

    def configure_optimizers(self):
        return self.optimizer_config.build([p for p in self.parameters() if p.requires_grad])

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """One world-model update; skipped on the device if its loss or a gradient is not finite."""
        buffers = [b.clone() for b in self.buffers()]
        out = self.world_model.loss(blinded(batch, self.blind_keys))
        taken, _, _ = guarded_step(self, out.loss, buffers)
        self.world_model.objective.after_update(taken)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in {"loss": out.loss, **out.terms}.items()},
                      on_step=True, on_epoch=False)
        self.log("train/skipped_updates", (~taken).float(), on_step=True, on_epoch=False, reduce_fx="sum")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """The loss on held-out episodes, averaged over the validation batches."""
        out = self.world_model.loss(blinded(batch, self.blind_keys))
        self.log_dict({f"heldout/{k}": v.float() for k, v in {"loss": out.loss, **out.terms}.items()},
                      on_step=False, on_epoch=True, batch_size=batch["reward"].shape[0])


class Sequences(IterableDataset):
    """Endless (B, T) batches of a split, sampled uniformly with the data module's generator."""

    def __init__(self, datamodule: ProbeDataModule):
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dm = self.datamodule
        buffer = dm.dataset.split("train")
        while True:
            batch, _ = buffer.sample(dm.batch_size, dm.sequence_length, dm.generator)
            yield model_inputs(batch)


BLIND_VALUE = 128  # the grey every image of a blind model shows


def blinded(batch: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """The batch with the images under `keys` one constant grey (none: the batch as it is)."""
    return {k: torch.full_like(v, BLIND_VALUE) if k in keys else v for k, v in batch.items()}


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch without the true state, which no model may see."""
    return {k: v for k, v in batch.items() if not k.startswith(STATE_PREFIX)}


class ProbeDataModule(L.LightningDataModule):
    """(B, T) sequences of a probe dataset's train split; fixed ones of its held-out split for the
    validation loss.

    Args:
        dataset: folder of a dataset made by `python -m wm.probe collect`.
        batch_size, sequence_length: B and T.
        validation_batches: held-out batches per validation, the same ones every time.
        seed: sampling seed; None: `python -m wm.probe train` derives it from the run's seed.
    """

    def __init__(self, dataset: str, batch_size: int = 16, sequence_length: int = 32, validation_batches: int = 8,
                 seed: int | None = None):
        super().__init__()
        self.dataset = ProbeDataset(dataset)
        self.batch_size, self.sequence_length, self.validation_batches = batch_size, sequence_length, validation_batches
        self.seed = 0 if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def spec(self) -> dict:
        info = self.dataset.info
        return {"observation_shapes": self.dataset.observation_shapes, "action_dim": info["action_dim"],
                "discrete": info["discrete"]}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Sequences(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        held_out = self.dataset.split("heldout")
        fixed = torch.Generator().manual_seed(self.seed + 1)
        batches = [model_inputs(held_out.sample(self.batch_size, self.sequence_length, fixed)[0])
                   for _ in range(self.validation_batches)]
        return DataLoader(batches, batch_size=None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# The checkpoints are meant to hold the state after each update, which is what Lightning warns about.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# A resumed run draws its batches from the data module's generator, which the checkpoint restores;
# Lightning cannot see that and warns that the endless loader is not resumable.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class UpdateProgressBar(TQDMProgressBar):
    """The bar a fit shows, for an offline world model: updates towards `trainer.max_steps` with
    the ETA, updates/s and the last training and held-out losses (no `v_num`, no validation bar)."""

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="Training", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0.05,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} updates [{elapsed}<{remaining}, "
                               "{rate_fmt}{postfix}]")

    def on_train_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_start(trainer)
        self.count_updates(trainer)  # a run resumed within its epoch starts no epoch

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self.count_updates(trainer)

    def count_updates(self, trainer: L.Trainer) -> None:
        """The bar in updates, from where a resumed or extended run starts."""
        bar = self.train_progress_bar
        bar.total, bar.initial, bar.n = trainer.max_steps, trainer.global_step, trainer.global_step
        bar.set_description_str("Training")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def init_validation_tqdm(self) -> Tqdm:
        bar = super().init_validation_tqdm()
        bar.disable = True  # a few fixed held-out batches: their loss shows on the training bar
        return bar

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        logged = trainer.callback_metrics
        return {name: f"{float(logged[key]):.3f}" for name, key in (("loss", "train/loss"), ("heldout", "heldout/loss"))
                if key in logged}


class TrainingSummary(L.Callback):
    """What a finished or stopped offline training did, where its checkpoints are, and the next
    commands: probe it, and open its MLflow run."""

    def __init__(self, run_dir: Path, tracking_uri: str, dataset: str):
        self.run_dir, self.tracking_uri, self.dataset = Path(run_dir), tracking_uri, dataset
        self.started = time.monotonic()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print("\n" + "\n".join(self.lines(trainer)), flush=True)

    def lines(self, trainer: L.Trainer) -> list[str]:
        done = trainer.global_step >= trainer.max_steps
        logged = trainer.callback_metrics
        last = self.run_dir / "checkpoints" / "last.ckpt"
        lines = [f"{'World model trained' if done else 'Training stopped (resume it with --ckpt_path last)'}: "
                 f"{self.run_dir.name}",
                 f"  updates: {trainer.global_step:,} of {trainer.max_steps:,}"
                 + (f", held-out loss {float(logged['heldout/loss']):.3f}" if "heldout/loss" in logged else ""),
                 f"  wall time: {format_duration(time.monotonic() - self.started)} (this session)",
                 f"  checkpoint: {last.resolve()}",
                 f"  probe it: python -m wm.probe eval --ckpt {shlex.quote(str(last))} --data {shlex.quote(self.dataset)}",
                 f"  open it: mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"]
        return lines


class TrainingClock(L.Callback):
    """The run's training wall time over all its sessions, kept in its checkpoints and logged as
    `train/minutes` when training ends: a resumed or extended run's end minus its start would count
    the time it lay stopped. A run resumed from a checkpoint that kept no clock (an older wm) has no
    known total, and logs none."""

    def __init__(self):
        self.seconds: float | None = 0.0  # up to the start of this session
        self.restored = False
        self.started = time.monotonic()

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.restored = state["seconds"], True

    def state_dict(self) -> dict:
        return {"seconds": self.total()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and not self.restored:
            self.seconds = None
        self.started = time.monotonic()

    def total(self) -> float | None:
        return None if self.seconds is None else self.seconds + time.monotonic() - self.started

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.total() is not None and trainer.logger is not None:
            trainer.logger.log_metrics({"train/minutes": self.total() / 60}, step=trainer.global_step)


TRAIN_DEFAULTS = {"trainer.max_steps": 2000, "trainer.log_every_n_steps": 25, "trainer.val_check_interval": 250,
                  "run.checkpoint_every": 500, "model.size": "size1M"}


# Why a resume may change the number of updates (and the epoch settings derived from it).
UPDATES_MAY_CHANGE = ("extends (or shortens) the training; every update is drawn and taken as before (nothing depends "
                      "on the total: the learning rate's warmup is a fixed number of updates)")


class ProbeCLI(RunCLI):
    """The run machinery of `python -m wm fit` for an offline world model: one run folder and MLflow
    run per `<dataset>-<objective>-s<seed>`, checkpoints every `run.checkpoint_every` updates, and a
    resume that refuses a changed config. `trainer.max_steps` is the number of updates, one epoch
    of them (so the bar has a total and an ETA), with the held-out loss every `val_check_interval`;
    a resume may raise it, which extends a finished run from its last checkpoint."""

    resumable = {**RESUMABLE, **dict.fromkeys(("trainer.max_steps", "trainer.limit_train_batches", "trainer.max_epochs"),
                                              UPDATES_MAY_CHANGE)}

    def __init__(self, **kwargs):
        kwargs.setdefault("parser_kwargs", {"prog": "python -m wm.probe train"})
        super().__init__(OfflineWorldModel, ProbeDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        for field in ("observation_shapes", "action_dim", "discrete"):
            parser.link_arguments("data", f"model.{field}", compute_fn=lambda data, f=field: data.spec[f],
                                  apply_on="instantiate")
        parser.set_defaults(TRAIN_DEFAULTS)

    def default_run_name(self, config) -> str:
        objective = config.model.objective
        short = objective_name(objective.class_path if objective else None, config.run.variant)
        return run_name(Path(config.data.dataset).name, short, config.seed_everything)

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer
        # The updates as one epoch, which max_steps ends; a run extended after its end (a larger
        # max_steps) trains them in a second epoch.
        trainer.max_epochs, trainer.limit_train_batches = -1, trainer.max_steps
        super().before_instantiate_classes()

    def fit_callbacks(self, config, run_dir: Path, uri: str) -> list:
        checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="updates={step}", save_last=True,
                                      auto_insert_metric_name=False, save_top_k=-1,
                                      every_n_train_steps=config.run.checkpoint_every)
        bar = [UpdateProgressBar()] if config.trainer.enable_progress_bar is not False else []
        return [checkpoints, *bar, TrainingClock(), TrainingSummary(run_dir, uri, config.data.dataset)]


def main(args: list[str]) -> None:
    """`python -m wm.probe train ARGS`: a fit of ProbeCLI (its only subcommand)."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads `args` only (and says so when argv has more)
    try:
        ProbeCLI(args=["fit", *args])
    finally:
        sys.argv = argv

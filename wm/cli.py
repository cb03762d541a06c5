"""`python -m wm fit|test|predict`: LightningCLI with the run folder, MLflow and checkpoints wired in.

A run lives in `<run.root>/<run.name>/` (root `runs/<experiment>` unless set, as a sweep's):
`checkpoints/` (`last.ckpt`, one checkpoint every `run.checkpoint_every` env frames, and
`replay/`, the buffer beside them) and `mlflow_run_id`. Its MLflow run is in the root's store,
`<run.root>/mlflow.db`, shared by every run under the root, with its artifacts in
`<run.root>/artifacts/` (wm.logger says how to choose another store).

What a run name means is kept exact (wm.runs): the run's seed derives every other seed, every
checkpoint records the resolved config and the MLflow run, a resume refuses a changed config, and
`test` and `predict` rebuild the run's config from the checkpoint alone.
The environment's spaces reach the model by argument linking: nobody types shapes.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from mlflow import MlflowClient

from callbacks.checkpoint import LAST, AtomicCheckpointIO, EnvStepCheckpoint
from callbacks.env_loop import EnvLoop
from callbacks.interrupt import Interrupt, interrupt_signal
from callbacks.progress import EnvProgressBar, RunSummary
from callbacks.run_record import RunRecord
from datamodules import ReplayDataModule, ReplayFileError, ReplayStore
from datamodules.replay_buffer import buffer_config
from wm.agent import Agent
from wm.envs.base import MissingSimulator
from wm.files import atomic_write
from wm.logger import EnvStepMLFlowLogger, artifact_location, create_store, sqlite_file, tracking_uri
from wm.objectives import objective_name
from wm.runs import (RECORD_KEY, RESUMABLE, changed_keys, derived_seed, describe_changes, fixed_for_evaluation,
                     flatten, run_name)
from wm.validation import ConfigError, check_config, precision_fallback
from wm.video import side_by_side, write_mp4

# MLflow 3's experiment tag that picks the UI's view: "custom_model_development" is the training-runs one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EVALUATING = ("test", "predict")  # subcommands that play a trained agent and take its run from the checkpoint
RUN_ID_FILE = "mlflow_run_id"


@dataclass
class RunConfig:
    """Where a run is stored and tracked.

    name: run folder and MLflow run name; empty: "<task>-<variant or objective>-s<seed>".
    variant: an ablation's name (e.g. barlow_augment, set by its config in configs/objective/): it
        stands for the objective in the run name and in reports, so the ablation and the plain
        objective are separate cells; empty: the objective's name.
    root: parent folder of run folders; empty: runs/<experiment>, as a sweep's.
    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else `<root>/mlflow.db`, one
        store shared by every run under the root.
    checkpoint_every: environment frames between kept checkpoints (last.ckpt is always updated).
    """

    name: str = ""
    variant: str = ""
    root: str = ""
    experiment: str = "wm"
    tracking_uri: str = ""
    checkpoint_every: int = 100_000


def default_run_name(config) -> str:
    """"<task>-<variant or objective>-s<seed>": the task names the suite (benchmark) too."""
    objective = config.model.objective
    short = objective_name(objective.class_path if objective else None, config.run.variant)
    return run_name(config.env.task, short, config.seed_everything)


def run_root(config) -> Path:
    return Path(config.run.root or Path("runs", config.run.experiment))


def run_dir_of(config) -> Path:
    return run_root(config) / (config.run.name or default_run_name(config))


def derive_seeds(config) -> None:
    """`env.seed` and `data.seed` from the run's seed (`seed_everything`) where they are not set;
    a run that is not seeded (`seed_everything: false`) draws them, and its config records them."""
    seed = config.seed_everything
    if seed is False:
        seed = secrets.randbits(31)
    if config.env.seed is None:
        config.env.seed = derived_seed(int(seed), "env")
    if config.data.seed is None:
        config.data.seed = derived_seed(int(seed), "data")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here: missing, damaged, or of another model or replay."""


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, memory-mapped (the weights are not read), or a clear refusal."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; nothing was changed")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or unreadable ({type(e).__name__}: {str(e)[:200]}); nothing was "
            f"changed. Resume from another checkpoint in {path.parent} or start a new run (--run.name)."
        ) from e


class WMCLI(LightningCLI):
    def __init__(self, **kwargs):
        self.record: dict | None = None  # the run record of the checkpoint resumed or evaluated (wm.runs)
        self.resolved: dict | None = None  # the resolved config, as checkpoints record it
        kwargs.setdefault("parser_kwargs", {"prog": "python -m wm"})
        users_store = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            super().__init__(Agent, ReplayDataModule, save_config_callback=None, auto_configure_optimizers=False,
                             **kwargs)
        finally:
            # MLflow exports the store it last used as MLFLOW_TRACKING_URI; a later run in this
            # process (a notebook, a benchmark, a test) must see the user's own setting instead.
            if users_store is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = users_store

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, test and predict: `validate` has nothing to validate (no validation data in RL)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "validate"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EnvLoop, "env")
        parser.add_class_arguments(RunConfig, "run")
        for field in ("observation_shapes", "action_dim", "discrete"):
            parser.link_arguments("env", f"model.{field}", compute_fn=lambda env, f=field: getattr(env.spec, f),
                                  apply_on="instantiate")
        parser.set_defaults({"trainer.max_steps": -1, "trainer.max_epochs": -1, "trainer.log_every_n_steps": 10})

    def run_dir(self) -> Path:
        return run_dir_of(self.config[self.subcommand])

    # ------------------------------------------------------------------------------ parsing
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in EVALUATING:
            self.config_from_checkpoint(parser, args, subcommand)

    def _parse_ckpt_path(self) -> None:
        """Lightning would copy the checkpoint's hyperparameters over the model's config, silently
        replacing what the command says; wm compares the config the checkpoint records instead
        (`check_unchanged`, `config_from_checkpoint`)."""

    def config_from_checkpoint(self, parser: LightningArgumentParser, args, subcommand: str) -> None:
        """`test` and `predict` evaluate a checkpoint as the run that wrote it: its recorded config
        comes first and the command's `--config` files and overrides go over it, which may change
        how the evaluation is done but not what is evaluated (`wm.runs.fixed_for_evaluation`)."""
        config = self.config[subcommand]
        if config.ckpt_path == "last":
            config.ckpt_path = str(run_dir_of(config) / "checkpoints" / LAST)
        if not config.ckpt_path:
            raise CheckpointError(
                f"ckpt_path is not set: {subcommand} plays a trained agent; pass --ckpt_path with a checkpoint's path "
                "(its task, model and run come with it), or --ckpt_path last with the run's --config (its "
                f"{run_dir_of(config) / 'checkpoints' / LAST}); nothing was changed")
        path = config.ckpt_path
        self.record = read_checkpoint(Path(path)).get(RECORD_KEY)
        if self.record is not None:  # else written before checkpoints recorded their run: --config says what it is
            argv = list(sys.argv[1:] if args is None else args)
            at = argv.index(subcommand) + 1
            self.config = parser.parse_args([*argv[:at], "--config", json.dumps(self.record["config"]), *argv[at:]])
            config = self.config[subcommand]
            config.ckpt_path = path
            contradicted = [change for change in changed_keys(self.record["config"], self.resolved_config(subcommand))
                            if fixed_for_evaluation(change[0])]
            if contradicted:
                raise CheckpointError(
                    f"{subcommand} --ckpt_path {path}: the command contradicts the checkpoint's task, model or run:\n"
                    f"{describe_changes(contradicted)}\n{subcommand} takes these from the checkpoint: drop the --config "
                    "file or the overrides that set them. Only how the evaluation is done may change (episodes, "
                    "videos, parallel envs, seeds, devices). Nothing was changed.")
        own = Path(path).resolve().parent.parent
        if (own / RUN_ID_FILE).exists():  # the run is the folder the checkpoint lies in, wherever it was moved
            config.run.root, config.run.name = str(own.parent), own.name

    def resolved_config(self, subcommand: str | None = None) -> dict:
        """The subcommand's full config, every default filled in, as plain values (what a checkpoint
        records and MLflow logs as params); the checkpoint path is not part of it."""
        subcommand = subcommand or self.subcommand
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))[subcommand]
        resolved.pop("ckpt_path", None)
        return resolved

    # ------------------------------------------------------------------------ before classes
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        check_config(config, self.subcommand)
        fallback = precision_fallback(config)
        if fallback is not None:  # the configs recommend bf16-mixed; float32 where it is not native
            rank_zero_warn(f"trainer.precision={config.trainer.precision}: this device has no native "
                           f"bfloat16 and would emulate it slower than float32; training in {fallback} instead")
            config.trainer.precision = fallback
        if self.record is None:  # a recorded config has them already
            derive_seeds(config)
            config.run.tracking_uri = tracking_uri(config.run.tracking_uri, run_root(config), self.run_dir())
            config.run.root = str(run_root(config).resolve())
        if self.subcommand == "fit":
            self.prepare_fit(config)
        self.resolved = self.resolved_config()

    def prepare_fit(self, config) -> None:
        """Resolve `--ckpt_path last`, and refuse a resume with another config, or a new run over an
        old one, before anything exists."""
        checkpoints = self.run_dir() / "checkpoints"
        if config.ckpt_path == "last":
            # As in Lightning, "last" with no checkpoint yet starts the run: a requeued job can
            # always pass it, and a run killed before its first checkpoint starts over.
            last = checkpoints / LAST
            config.ckpt_path = str(last) if last.exists() else None
            if not last.exists():
                rank_zero_warn(f"--ckpt_path last: {last} does not exist yet; starting {self.run_dir()} from the beginning")
        if config.ckpt_path:
            self.record = read_checkpoint(Path(config.ckpt_path)).get(RECORD_KEY)
            self.check_unchanged(config.ckpt_path)
        elif checkpoints.exists() and any(checkpoints.glob("*.ckpt")):
            raise FileExistsError(
                f"run folder {self.run_dir()} already holds checkpoints; resume it with --ckpt_path last, "
                "or start a new run with another --run.name (nothing was changed)"
            )

    def check_unchanged(self, path: str) -> None:
        """A resume continues a run under its name and MLflow run: it must train what the run trained."""
        if self.record is None:
            rank_zero_warn(f"checkpoint {path} was written by an older wm and records no config: this resume cannot "
                           "check that the config is the run's own")
            return
        changes = [change for change in changed_keys(self.record["config"], self.resolved_config())
                   if change[0] not in RESUMABLE]
        if changes:
            raise CheckpointError(
                f"--ckpt_path {path}: a resume continues run {self.run_dir().name} under its name and MLflow run, so it "
                f"must train what the run trained, but these settings differ from the checkpoint's:\n"
                f"{describe_changes(changes)}\nTo train with the new settings, start a new run: give it another "
                "--run.name and no --ckpt_path. To resume, give the checkpoint's values. A resume may change only "
                f"{', '.join(RESUMABLE)}. Nothing was changed.")

    def check_resume(self, path: Path) -> None:
        """Everything a resume needs, checked before the run is touched: a checkpoint of this
        model, and every rank's replay files for it, complete and of this configuration."""
        checkpoint = read_checkpoint(path)
        try:
            self.model.on_load_checkpoint(checkpoint)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        env, data = self.config_init[self.subcommand]["env"], self.datamodule.hparams
        reference = checkpoint.get("replay")
        if reference is None:
            raise CheckpointError(f"checkpoint {path} names no replay buffer: it was written by an older version of wm")
        size = self.model.world_model.size
        expected = buffer_config(data.capacity, env.num_envs, env.spec.observation_shapes, env.spec.action_dim,
                                 (size.deter, size.stoch, size.classes))
        replay = self.run_dir() / "checkpoints" / "replay"
        for rank_dir in sorted({replay / "rank0", *replay.glob("rank*")}):  # every rank that saved one
            try:
                ReplayStore(rank_dir).verify(reference["manifest"], expected)
            except ReplayFileError as e:
                raise CheckpointError(f"{e}. Nothing was changed: resume from another checkpoint in {path.parent}, "
                                      "or start a new run with another --run.name.") from None

    # ------------------------------------------------------------------------------ trainer
    def mlflow_run_id(self, run_dir: Path) -> str | None:
        """The run's MLflow run: the evaluated checkpoint's, else the one the run folder recorded."""
        if self.subcommand in EVALUATING and self.record is not None:
            return self.record["run_id"]
        recorded = run_dir / RUN_ID_FILE
        return recorded.read_text().strip() if recorded.exists() else None

    def check_tracked(self, uri: str, run_id: str, run_dir: Path) -> None:
        """Refuse, before anything is created, to log into a store that lacks the run's MLflow run
        (a sqlite store is not made by looking into it)."""
        db = sqlite_file(uri)
        try:
            if db is not None and not db.exists():
                raise FileNotFoundError(f"{db} does not exist")
            MlflowClient(uri).get_run(run_id)
        except Exception as e:
            raise CheckpointError(
                f"the MLflow run {run_id} of {run_dir} is not in the tracking store {uri} ({str(e).splitlines()[0][:200]}). "
                "Give the store it was made in with --run.tracking_uri (or MLFLOW_TRACKING_URI); nothing was changed."
            ) from None

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand]
        run_dir = self.run_dir()
        fitting = self.subcommand == "fit"
        if fitting and config.ckpt_path:
            self.check_resume(Path(config.ckpt_path))
        uri, run_id = config.run.tracking_uri, self.mlflow_run_id(run_dir)
        if run_id is not None and rank_zero_only.rank == 0:
            self.check_tracked(uri, run_id, run_dir)
        configured = list(self.config_init[self.subcommand].trainer.get("callbacks") or [])
        # the checkpoint callback restores its state with the checkpoint, also when it is only evaluated
        ours = [Interrupt(), EnvStepCheckpoint(str(run_dir / "checkpoints"), config.run.checkpoint_every)]
        if not fitting:
            # test logs into the run (a run that was never started has nothing to log into);
            # predict writes its video and logs nothing.
            logged = run_id is not None and self.subcommand == "test"
            logger = self.mlflow_logger(uri, run_id, run_dir) if logged else False
            return super().instantiate_trainer(logger=logger, callbacks=[*configured, *ours], **kwargs)
        run_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite_file(uri)
        if db is not None and rank_zero_only.rank == 0:
            create_store(db)
        logger = self.mlflow_logger(uri, run_id, run_dir)
        if rank_zero_only.rank == 0:  # other DDP ranks see a dummy experiment and no run id
            atomic_write(run_dir / RUN_ID_FILE, lambda f: f.write(logger.run_id.encode()))
        ours.append(RunRecord(self.resolved))
        if config.trainer.enable_progress_bar is not False:  # the bar first, so that it is closed before the summary prints
            ours.append(EnvProgressBar())
        ours.append(RunSummary(run_dir, uri))
        return super().instantiate_trainer(logger=logger, callbacks=[*configured, *ours],
                                           plugins=[AtomicCheckpointIO()], **kwargs)

    def mlflow_logger(self, uri: str, run_id: str | None, run_dir: Path) -> EnvStepMLFlowLogger:
        """The run's MLflow run (a new one for a new fit) in store `uri`."""
        fitting = self.subcommand == "fit"
        return EnvStepMLFlowLogger(
            experiment_name=self.config[self.subcommand].run.experiment,
            run_name=run_dir.name,
            tracking_uri=uri,
            artifact_location=artifact_location(uri),
            run_id=run_id,  # a resume, a restart before the first checkpoint and a test use the run's own
            log_model=fitting,  # checkpoints become run artifacts at the end of training
            synchronous=False,  # metric writes to the store do not hold up training
            keep_status=not fitting,  # reading a run never changes its status
        )

    # ---------------------------------------------------------------------------- subcommands
    def before_fit(self) -> None:
        """The full resolved config, as MLflow params and as a run artifact. MLflow params cannot
        change, so a resumed run keeps the first values and logs its own config beside them."""
        logger = self.trainer.logger
        if rank_zero_only.rank != 0:  # other DDP ranks see a dummy experiment
            return
        # MLflow 3's UI opens an experiment on its GenAI overview unless it is marked as model
        # training; so marked, it opens on the runs table and their charts.
        logger.experiment.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        logged = logger.experiment.get_run(logger.run_id).data.params
        if logged:  # a resumed run: running again, and the replayed stretch is not logged twice
            logger.experiment.update_run(logger.run_id, status="RUNNING")
            logger.skip_logged_steps()
        resumes = sum(k.startswith("resumed") for k in logged)
        name = f"config_resumed_{resumes}.yaml" if logged else "config.yaml"
        logger.experiment.log_text(logger.run_id, yaml.safe_dump(self.resolved, sort_keys=False), name)
        params = {k: v for k, v in flatten(self.resolved).items() if k not in logged}
        if logged:
            params[f"resumed{resumes}"] = name
        logger.log_hyperparams(params)

    def predict(self, model: Agent, datamodule: ReplayDataModule, ckpt_path: str | None = None, **kwargs) -> None:
        """Play `env.eval_episodes` greedy episodes of the checkpoint's policy, print their returns
        and write `env.eval_videos` of them side by side to `<run folder>/predictions/`; the run's
        MLflow run is not touched."""
        episodes = self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        if not episodes:
            return
        loop = next(c for c in self.trainer.callbacks if isinstance(c, EnvLoop))
        returns = np.array([e.ret for e in episodes])
        print(f"{len(returns)} greedy episode{'s' * (len(returns) != 1)} of {ckpt_path} ({loop.task}, at "
              f"{loop.env_steps:,} env frames): return {returns.mean():.1f} ± {returns.std():.1f}, "
              f"each: {', '.join(f'{r:.1f}' for r in returns)}")
        recorded = [e.frames for e in episodes if e.frames]
        if recorded:
            video = self.run_dir() / "predictions" / f"{Path(ckpt_path).stem}_{loop.env_steps:09d}.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(video, side_by_side(recorded), fps=max(1, round(50 / loop.action_repeat)))
            print(f"video of {len(recorded)} episode{'s' * (len(recorded) != 1)}: {video}")


REFUSALS = (ConfigError, CheckpointError, FileExistsError, MissingSimulator)  # refused before anything changed


def main(args: list[str] | None = None) -> None:
    cli = WMCLI(args=args)
    signum = interrupt_signal(cli.trainer)
    if signum is not None:  # interrupted: saved and stopped cleanly, but not finished
        sys.exit(128 + signum)

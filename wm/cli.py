"""`python -m wm fit|validate|test --config ...`: LightningCLI with the run folder, MLflow and
checkpoints wired in.

A run lives in `<run.root>/<run.name>/`: `mlflow.db` (the tracking store, unless
`run.tracking_uri` names another), `artifacts/`, and `checkpoints/` (`last.ckpt`, one checkpoint
every `run.checkpoint_every` env frames, and `replay/`, the buffer beside them).
The environment's spaces reach the model by argument linking: nobody types shapes.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.checkpoint import LAST, AtomicCheckpointIO, EnvStepCheckpoint
from callbacks.env_loop import EnvLoop
from callbacks.interrupt import Interrupt, interrupt_signal
from callbacks.progress import EnvProgressBar, RunSummary
from datamodules import ReplayDataModule, ReplayFileError, ReplayStore
from datamodules.replay_buffer import buffer_config
from wm.agent import Agent
from wm.files import atomic_write
from wm.logger import EnvStepMLFlowLogger, create_store
from wm.objectives import objective_name
from wm.validation import ConfigError, check_config, precision_fallback

# MLflow 3's experiment tag that picks the UI's view: "custom_model_development" is the training-runs one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


@dataclass
class RunConfig:
    """Where a run is stored and tracked.

    name: run folder and MLflow run name; empty: "<task>-<variant or objective>-s<seed>".
    variant: an ablation's name (e.g. barlow_augment, set by its config in configs/objective/): it
        stands for the objective in the run name and in reports, so the ablation and the plain
        objective are separate cells; empty: the objective's name.
    root: parent folder of run folders.
    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI; empty: sqlite store inside the run folder.
    checkpoint_every: environment frames between kept checkpoints (last.ckpt is always updated).
    """

    name: str = ""
    variant: str = ""
    root: str = "runs"
    experiment: str = "wm"
    tracking_uri: str = ""
    checkpoint_every: int = 100_000


def default_run_name(config) -> str:
    """"<task>-<variant or objective>-s<seed>": the task names the suite (benchmark) too."""
    objective = config.model.objective
    short = objective_name(objective.class_path if objective else None, config.run.variant)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.env.task}-{short}-s{config.seed_everything}")


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
        super().__init__(Agent, ReplayDataModule, save_config_callback=None, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EnvLoop, "env")
        parser.add_class_arguments(RunConfig, "run")
        for field in ("observation_shapes", "action_dim", "discrete"):
            parser.link_arguments("env", f"model.{field}", compute_fn=lambda env, f=field: getattr(env.spec, f),
                                  apply_on="instantiate")
        parser.set_defaults({"trainer.max_steps": -1, "trainer.max_epochs": -1, "trainer.log_every_n_steps": 10})

    def run_dir(self) -> Path:
        config = self.config[self.subcommand]
        return Path(config.run.root) / (config.run.name or default_run_name(config))

    def before_instantiate_classes(self) -> None:
        check_config(self.config[self.subcommand], self.subcommand)
        fallback = precision_fallback(self.config[self.subcommand])
        if fallback is not None:  # the configs recommend bf16-mixed; float32 where it is not native
            rank_zero_warn(f"trainer.precision={self.config[self.subcommand].trainer.precision}: this device has no native "
                           f"bfloat16 and would emulate it slower than float32; training in {fallback} instead")
            self.config[self.subcommand].trainer.precision = fallback
        if self.subcommand == "test":
            self.resolve_test_checkpoint()
        if self.subcommand != "fit":
            return
        config = self.config[self.subcommand]
        checkpoints = self.run_dir() / "checkpoints"
        if config.ckpt_path == "last":
            # As in Lightning, "last" with no checkpoint yet starts the run: a requeued job can
            # always pass it, and a run killed before its first checkpoint starts over.
            last = checkpoints / LAST
            config.ckpt_path = str(last) if last.exists() else None
            if not last.exists():
                rank_zero_warn(f"--ckpt_path last: {last} does not exist yet; starting {self.run_dir()} from the beginning")
        if not config.ckpt_path and checkpoints.exists() and any(checkpoints.glob("*.ckpt")):
            raise FileExistsError(
                f"run folder {self.run_dir()} already holds checkpoints; resume it with --ckpt_path last, "
                "or start a new run with another --run.name (nothing was changed)"
            )

    def resolve_test_checkpoint(self) -> None:
        """`test` evaluates a trained agent: it needs a readable checkpoint (`last`: the run's
        last.ckpt), refused before anything is touched; without one it would log an untrained
        agent's episodes into the run."""
        config = self.config["test"]
        last = self.run_dir() / "checkpoints" / LAST
        if config.ckpt_path == "last":
            config.ckpt_path = str(last)
        if not config.ckpt_path:
            raise CheckpointError(f"ckpt_path is not set: test evaluates a trained agent; pass --ckpt_path last "
                                  f"(this run's {last}) or the path of a checkpoint; nothing was changed")
        read_checkpoint(Path(config.ckpt_path))

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

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand]
        run_dir = self.run_dir()
        run_id_file = run_dir / "mlflow_run_id"
        fitting = self.subcommand == "fit"
        if fitting and config.ckpt_path:
            self.check_resume(Path(config.ckpt_path))
        if not fitting and not run_id_file.exists():
            # validate/test/predict only read a run: without one there is nothing to log into.
            return super().instantiate_trainer(logger=False, **kwargs)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.run.tracking_uri and rank_zero_only.rank == 0:
            create_store(run_dir / "mlflow.db")
        # One MLflow run per run folder: a resume, a restart before the first checkpoint and a
        # read-only command all use the run recorded in the folder.
        resuming = run_id_file.exists()
        tracking_uri = config.run.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        logger = EnvStepMLFlowLogger(
            experiment_name=config.run.experiment,
            run_name=run_dir.name,
            tracking_uri=tracking_uri,
            # A store shared by several runs (a sweep) keeps their artifacts beside it, under the root.
            artifact_location=((run_dir.parent if config.run.tracking_uri else run_dir) / "artifacts").resolve().as_uri(),
            run_id=run_id_file.read_text().strip() if resuming else None,
            log_model=fitting,  # checkpoints become run artifacts at the end of training
            synchronous=False,  # metric writes to the store do not hold up training
            keep_status=not fitting,  # reading a run never changes its status
        )
        if fitting and rank_zero_only.rank == 0:  # other DDP ranks see a dummy experiment and no run id
            atomic_write(run_id_file, lambda f: f.write(logger.run_id.encode()))
        checkpoint = EnvStepCheckpoint(str(run_dir / "checkpoints"), config.run.checkpoint_every)
        configured = (self.config_init[self.subcommand].trainer.get("callbacks") or [])
        ours = [Interrupt(), checkpoint]
        if fitting:  # the bar first, so that it is closed before the summary prints
            if config.trainer.enable_progress_bar is not False:
                ours.append(EnvProgressBar())
            ours.append(RunSummary(run_dir, tracking_uri))
        return super().instantiate_trainer(logger=logger, callbacks=[*configured, *ours],
                                           plugins=[AtomicCheckpointIO()], **kwargs)

    def before_fit(self) -> None:
        """The full resolved config, as MLflow params and as a run artifact. MLflow params cannot
        change, so a resumed run keeps the first values and logs its own config beside them."""
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))[self.subcommand]
        text = yaml.safe_dump(resolved, sort_keys=False)
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
        logger.experiment.log_text(logger.run_id, text, name)
        params = {k: v for k, v in flatten(resolved).items() if k != "ckpt_path" and k not in logged}
        if logged:
            params[f"resumed{resumes}"] = name
        logger.log_hyperparams(params)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


REFUSALS = (ConfigError, CheckpointError, FileExistsError)  # a start refused before anything changed


def main(args: list[str] | None = None) -> None:
    cli = WMCLI(args=args)
    signum = interrupt_signal(cli.trainer)
    if signum is not None:  # interrupted: saved and stopped cleanly, but not finished
        sys.exit(128 + signum)

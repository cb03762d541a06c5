"""The run machinery every training command of wm shares (`python -m wm fit`, `python -m wm.probe
train`): LightningCLI with a run folder, one MLflow run per run folder, and a resume that must
train what the run trained.

A run lives in `<run.root>/<run.name>/` (root `runs/<experiment>` unless set, as a sweep's):
`checkpoints/` and `mlflow_run_id`. Its MLflow run is in the root's store, `<run.root>/mlflow.db`,
shared by every run under the root, with its artifacts in `<run.root>/artifacts/` (wm.run.tracking says
how to choose another store). What a run name means is kept exact (wm.run.identity): every checkpoint
records the resolved config and the MLflow run, and a resume refuses a changed config.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from mlflow import MlflowClient

from callbacks.checkpoint import LAST, AtomicCheckpointIO
from callbacks.run_record import RunRecord
from wm.run.files import atomic_write
from wm.run.tracking import EnvStepMLFlowLogger, artifact_location, create_store, ensure_experiment, sqlite_file, tracking_uri
from wm.run.lock import RunLock, check_free
from wm.run.machine import apply_threads
from wm.run.identity import RECORD_KEY, RESUMABLE, changed_keys, derived_seed, describe_changes, flatten
from wm.run.validation import ConfigError, check_config, closest, precision_choice

# MLflow 3's experiment tag that picks the UI's view: "custom_model_development" is the training-runs one.
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
    checkpoint_every: environment frames (updates, for an offline world model) between kept
        checkpoints (last.ckpt is always updated).
    threads: torch's CPU threads for the update; 0: OMP_NUM_THREADS where it is set, else half of
        this process's cores (at least 1), so that other work on the machine does not stall every
        parallel step of the update (README "Speed"). Env workers and other child processes get one.
    """

    name: str = ""
    variant: str = ""
    root: str = ""
    experiment: str = "wm"
    tracking_uri: str = ""
    checkpoint_every: int = 100_000
    threads: int = 0


class RunArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line: what is wrong, the closest valid key, and
    where every option is listed (its usage runs to a hundred lines)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        keys = [action.dest for action in parser._actions if action.dest and action.dest != "help"]
        hints = [closest(key, keys) for key in re.findall(r"--([A-Za-z0-9_.]+)", message)] if keys else []
        prog = parser.prog.replace(" [options]", "")
        suggested = "".join(hint.replace(" Did you mean ", " Did you mean --") for hint in hints)
        sys.stderr.write(f"error: {' '.join(message.split()).rstrip('.')}.{suggested} Every option: {prog} --help\n")
        self.exit(2)


def run_root(config) -> Path:
    return Path(config.run.root or Path("runs", config.run.experiment))


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


def run_seed(config) -> int:
    """The run's seed; a run that is not seeded (`seed_everything: false`) draws one for the seeds
    derived from it, which its config then records."""
    return secrets.randbits(31) if config.seed_everything is False else int(config.seed_everything)


class RunCLI(LightningCLI):
    """LightningCLI whose fit is a run: subclasses name the run (`default_run_name`), derive its
    seeds (`derive_seeds`), check a checkpoint before a resume (`check_resume`) and add their
    callbacks (`fit_callbacks`). `resumable`: the settings a resume may change, each with why it
    does not change what the run trains."""

    resumable: dict[str, str] = RESUMABLE

    def __init__(self, model_class, datamodule_class, **kwargs):
        self.record: dict | None = None  # the run record of the checkpoint resumed or evaluated (wm.run.identity)
        self.resolved: dict | None = None  # the resolved config, as checkpoints record it
        self.lock: RunLock | None = None  # a fit's hold on its run folder
        users_store = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            super().__init__(model_class, datamodule_class, save_config_callback=None, auto_configure_optimizers=False,
                             parser_class=RunArgumentParser, **kwargs)
        finally:
            if self.lock is not None:  # the fit ended (or failed): another process may take the run
                self.lock.release()
            # MLflow exports the store it last used as MLFLOW_TRACKING_URI; a later run in this
            # process (a notebook, a benchmark, a test) must see the user's own setting instead.
            if users_store is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = users_store

    # ------------------------------------------------------------------------ for subclasses
    def default_run_name(self, config) -> str:
        raise NotImplementedError

    def derive_seeds(self, config) -> None:
        """The data module's seed from the run's seed, where it is not set."""
        if config.data.seed is None:
            config.data.seed = derived_seed(run_seed(config), "data")

    def check_resume(self, path: Path) -> None:
        """What a resume needs besides an unchanged config, checked before the run is touched."""

    def fit_callbacks(self, config, run_dir: Path, uri: str) -> list:
        return []

    # ---------------------------------------------------------------------------- the run
    def run_dir_of(self, config) -> Path:
        return run_root(config) / (config.run.name or self.default_run_name(config))

    def run_dir(self) -> Path:
        return self.run_dir_of(self.config[self.subcommand])

    def _parse_ckpt_path(self) -> None:
        """Lightning would copy the checkpoint's hyperparameters over the model's config, silently
        replacing what the command says; wm compares the config the checkpoint records instead
        (`check_unchanged`)."""

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
        apply_threads(config.run.threads)
        choice = precision_choice(config)  # the configs recommend bf16-mixed; float32 where it is not faster
        if choice is not None and rank_zero_only.rank == 0:
            print(f"trainer.{choice}", flush=True)
        if self.record is None:  # a recorded config has them already
            self.derive_seeds(config)
            config.run.tracking_uri = tracking_uri(config.run.tracking_uri, run_root(config), self.run_dir())
            config.run.root = str(run_root(config).resolve())
        if self.subcommand == "fit":
            self.prepare_fit(config)
        self.resolved = self.resolved_config()

    def prepare_fit(self, config) -> None:
        """Resolve `--ckpt_path last`, and refuse a resume with another config, or a new run over an
        old one, before anything exists."""
        if rank_zero_only.rank == 0:  # first: a live run's files are being written, nothing else is checked
            check_free(self.run_dir())
        checkpoints = self.run_dir() / "checkpoints"
        if config.ckpt_path == "last":
            # As in Lightning, "last" with no checkpoint yet starts the run: a requeued job can
            # always pass it, and a run killed before its first checkpoint starts over.
            chosen = self.resumable_checkpoint(checkpoints)
            config.ckpt_path = str(chosen) if chosen is not None else None
            if chosen is None:
                rank_zero_warn(f"--ckpt_path last: {checkpoints / LAST} does not exist yet; starting {self.run_dir()} "
                               "from the beginning")
        if config.ckpt_path:
            self.record = read_checkpoint(Path(config.ckpt_path)).get(RECORD_KEY)
            self.check_unchanged(config.ckpt_path)
        elif checkpoints.exists() and any(checkpoints.glob("*.ckpt")):
            raise FileExistsError(
                f"run folder {self.run_dir()} already holds checkpoints; resume it with --ckpt_path last, "
                "or start a new run with another --run.name (nothing was changed)"
            )

    def resumable_checkpoint(self, checkpoints: Path) -> Path | None:
        """What `--ckpt_path last` resumes: last.ckpt, or, where it cannot be resumed (cut short by
        a quota or a copy, or its replay damaged), the newest `envstep=` checkpoint that loads and
        whose replay is whole, said once; None with no checkpoint at all."""
        def frames(path: Path) -> int:
            return int(path.stem.partition("=")[2]) if path.stem.partition("=")[2].isdigit() else -1

        candidates = [checkpoints / LAST, *sorted(checkpoints.glob("envstep=*.ckpt"), key=frames, reverse=True)]
        problems = []
        for path in (p for p in candidates if p.exists()):
            try:
                problem = self.replay_problem(path, read_checkpoint(path))
            except CheckpointError as error:
                problem = str(error).split("; nothing was changed")[0]
            if problem is None:
                if problems:
                    rank_zero_warn(f"--ckpt_path last: {problems[0]}; resuming from {path.name} instead, the newest "
                                   "checkpoint that loads and whose replay is whole")
                return path
            problems.append(problem)
        if problems:
            raise CheckpointError(f"--ckpt_path last: no checkpoint in {checkpoints} can be resumed: {'; '.join(problems)}. "
                                  "Nothing was changed: start a new run with another --run.name")
        return None

    def replay_problem(self, path: Path, checkpoint: dict) -> str | None:
        """What keeps a checkpoint that loads from resuming besides its weights (a subclass's
        replay files); None when nothing does."""
        return None

    def check_unchanged(self, path: str) -> None:
        """A resume continues a run under its name and MLflow run: it must train what the run trained."""
        if self.record is None:
            rank_zero_warn(f"checkpoint {path} was written by an older wm and records no config: this resume cannot "
                           "check that the config is the run's own")
            return
        changes = [change for change in changed_keys(self.record["config"], self.resolved_config())
                   if change[0] not in self.resumable]
        if changes:
            raise CheckpointError(
                f"--ckpt_path {path}: a resume continues run {self.run_dir().name} under its name and MLflow run, so it "
                f"must train what the run trained, but these settings differ from the checkpoint's:\n"
                f"{describe_changes(changes)}\nTo train with the new settings, start a new run: give it another "
                "--run.name and no --ckpt_path. To resume, give the checkpoint's values. A resume may change only "
                f"{', '.join(self.resumable)}. Nothing was changed.")

    # ------------------------------------------------------------------------------ trainer
    def mlflow_run_id(self, run_dir: Path) -> str | None:
        """The MLflow run the run folder recorded (None before the run started)."""
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
        """A fit's trainer: the run folder, its store and MLflow run, the run record in every
        checkpoint, atomic checkpoint writes, then the subclass's callbacks."""
        config = self.config[self.subcommand]
        run_dir = self.run_dir()
        if config.ckpt_path:
            self.check_resume(Path(config.ckpt_path))
        uri, run_id = config.run.tracking_uri, self.mlflow_run_id(run_dir)
        if run_id is not None and rank_zero_only.rank == 0:
            self.check_tracked(uri, run_id, run_dir)
        if rank_zero_only.rank == 0:  # the first change to the run folder
            self.lock = RunLock(run_dir)
            left = self.lock.acquire()
            if left is not None:
                rank_zero_warn(f"{self.lock.path}: the last process on this run, {left}, ended without releasing it "
                               "(killed); this one takes the run over")
        run_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite_file(uri)
        if rank_zero_only.rank == 0:
            if db is not None:
                create_store(db)
            ensure_experiment(uri, config.run.experiment)
        logger = self.mlflow_logger(uri, run_id, run_dir)
        if rank_zero_only.rank == 0:  # other DDP ranks see a dummy experiment and no run id
            atomic_write(run_dir / RUN_ID_FILE, lambda f: f.write(logger.run_id.encode()))
        configured = list(self.config_init[self.subcommand].trainer.get("callbacks") or [])
        callbacks = [*configured, RunRecord(self.resolved), *self.fit_callbacks(config, run_dir, uri)]
        return super().instantiate_trainer(logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()], **kwargs)

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
            synchronous=True,  # params, once at the start; metrics go through the logger's own writer thread
            keep_status=not fitting,  # reading a run never changes its status
            run_dir=run_dir,
        )

    # ---------------------------------------------------------------------------- subcommands
    def before_fit(self) -> None:
        """The full resolved config, as MLflow params and as a run artifact. MLflow params cannot
        change, so a resumed run keeps the first values and logs its own config beside them."""
        logger = self.trainer.logger
        if rank_zero_only.rank != 0:  # other DDP ranks see a dummy experiment
            return
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


REFUSALS = (ConfigError, CheckpointError, FileExistsError)  # a command refused before anything changed

"""`python -m wm fit|validate|test --config ...`: LightningCLI with the run folder, MLflow and
checkpoints wired in.

A run lives in `<run.root>/<run.name>/`: `mlflow.db` (the tracking store, unless
`run.tracking_uri` names another), `artifacts/`, and `checkpoints/` (`last.ckpt`, one checkpoint
every `run.checkpoint_every` env frames, and `replay/`, the buffer beside them).
The environment's spaces reach the model by argument linking: nobody types shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.env_loop import EnvLoop
from datamodules import ReplayDataModule
from wm.agent import Agent
from wm.logger import EnvStepMLFlowLogger
from wm.objectives import OBJECTIVES
from wm.validation import check_config


@dataclass
class RunConfig:
    """Where a run is stored and tracked.

    name: run folder and MLflow run name; empty: "<task>-<objective>-s<seed>".
    root: parent folder of run folders.
    experiment: MLflow experiment name.
    tracking_uri: MLflow tracking URI; empty: sqlite store inside the run folder.
    checkpoint_every: environment frames between kept checkpoints (last.ckpt is always updated).
    """

    name: str = ""
    root: str = "runs"
    experiment: str = "wm"
    tracking_uri: str = ""
    checkpoint_every: int = 100_000


class EnvStepCheckpoint(ModelCheckpoint):
    """Keeps a checkpoint every `every` environment frames and refreshes `last.ckpt` each time."""

    def __init__(self, dirpath: str, every: int):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=-1,
                         every_n_train_steps=0, save_on_train_epoch_end=False)
        self.every = every
        self.saved_at = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = env_loop_of(trainer).env_steps
        if self.every and steps // self.every > self.saved_at // self.every:
            self.saved_at = steps
            self._save_checkpoint(trainer, f"{self.dirpath}/envstep={steps}.ckpt")
            self._save_last_checkpoint(trainer, {})

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last_checkpoint(trainer, {})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "saved_at": self.saved_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_at = state_dict.pop("saved_at", 0)
        super().load_state_dict(state_dict)


def env_loop_of(trainer) -> EnvLoop:
    loops = [c for c in trainer.callbacks if isinstance(c, EnvLoop)]
    if len(loops) != 1:
        raise RuntimeError(f"expected one EnvLoop callback, found {len(loops)}")
    return loops[0]


def default_run_name(config) -> str:
    """"<task>-<objective>-s<seed>": the task names the suite (benchmark) too."""
    objective = config.model.objective
    class_name = objective.class_path.rsplit(".", 1)[-1] if objective else "Barlow"
    short = {cls.__name__: name for name, cls in OBJECTIVES.items()}.get(class_name, class_name.lower())
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.env.task}-{short}-s{config.seed_everything}")


def check_checkpoint(path: Path) -> None:
    """Refuse an unreadable checkpoint before anything of the run is touched."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
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
        if self.subcommand != "fit":
            return
        config = self.config[self.subcommand]
        checkpoints = self.run_dir() / "checkpoints"
        if config.ckpt_path:
            if config.ckpt_path == "last":
                check_checkpoint(checkpoints / "last.ckpt")
            else:
                check_checkpoint(Path(config.ckpt_path))
        elif checkpoints.exists() and any(checkpoints.glob("*.ckpt")):
            raise FileExistsError(
                f"run folder {self.run_dir()} already holds checkpoints; resume it with --ckpt_path last, "
                "or start a new run with another --run.name (nothing was changed)"
            )

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand]
        run_dir = self.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id_file = run_dir / "mlflow_run_id"
        resuming = bool(config.get("ckpt_path")) and run_id_file.exists()
        logger = EnvStepMLFlowLogger(
            experiment_name=config.run.experiment,
            run_name=run_dir.name,
            tracking_uri=config.run.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}",
            # A store shared by several runs (a sweep) keeps their artifacts beside it, under the root.
            artifact_location=((run_dir.parent if config.run.tracking_uri else run_dir) / "artifacts").resolve().as_uri(),
            run_id=run_id_file.read_text().strip() if resuming else None,
            log_model=True,  # checkpoints become run artifacts at the end of training
            synchronous=False,  # metric writes to the store do not hold up training
        )
        if rank_zero_only.rank == 0:  # other DDP ranks see a dummy experiment and no run id
            run_id_file.write_text(logger.run_id)
        checkpoint = EnvStepCheckpoint(str(run_dir / "checkpoints"), config.run.checkpoint_every)
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        return super().instantiate_trainer(logger=logger, callbacks=[*configured, checkpoint], **kwargs)

    def before_fit(self) -> None:
        """The full resolved config, as MLflow params and as a run artifact. MLflow params cannot
        change, so a resumed run keeps the first values and logs its own config beside them."""
        config = self.config[self.subcommand]
        text = self._parser(self.subcommand).dump(config, skip_none=False)
        logger = self.trainer.logger
        if logger.run_id is None:  # not rank zero
            return
        logged = logger.experiment.get_run(logger.run_id).data.params
        resumes = sum(k.startswith("resumed") for k in logged)
        name = f"config_resumed_{resumes}.yaml" if logged else "config.yaml"
        logger.experiment.log_text(logger.run_id, text, name)
        params = {k: v for k, v in flatten(yaml.safe_load(text)).items() if k != "ckpt_path" and k not in logged}
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


def main(args: list[str] | None = None) -> None:
    WMCLI(args=args)

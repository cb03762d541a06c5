"""`python -m wm fit|test|predict`: the run machinery of wm.run.command for the agent, its env loop
and replay, and the evaluation of a checkpoint.

What a run name means is kept exact (wm.run.identity): the run's seed derives every other seed, every
checkpoint records the resolved config and the MLflow run, a resume refuses a changed config, and
`test` and `predict` rebuild the run's config from the checkpoint alone.
The environment's spaces reach the model by argument linking: nobody types shapes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.checkpoint import LAST, EnvStepCheckpoint
from callbacks.env_loop import EnvLoop
from callbacks.interrupt import Interrupt, interrupt_signal
from callbacks.progress import EnvProgressBar, RunSummary
from datamodules import ReplayDataModule, ReplayFileError, ReplayStore
from datamodules.replay_buffer import buffer_config
from wm.agent.agent import Agent
from wm.run.machine import retain_freed_memory
from wm.envs.base import MissingSimulator
from wm.run.tracking import EnvStepMLFlowLogger, sqlite_file, sqlite_uri
from wm.objectives import objective_name
from wm.run.command import (REFUSALS as RUN_REFUSALS, RUN_ID_FILE, CheckpointError, RunCLI, RunConfig, read_checkpoint,
                        run_seed)
from wm.run.identity import RECORD_KEY, changed_keys, derived_seed, describe_changes, fixed_for_evaluation, run_name
from wm.run.video import side_by_side, write_mp4

EVALUATING = ("test", "predict")  # subcommands that play a trained agent and take its run from the checkpoint

__all__ = ["CheckpointError", "REFUSALS", "RunConfig", "WMCLI", "default_run_name", "main"]


def default_run_name(config) -> str:
    """"<task>-<variant or objective>-s<seed>": the task names the suite (benchmark) too."""
    objective = config.model.objective
    short = objective_name(objective.class_path if objective else None, config.run.variant)
    return run_name(config.env.task, short, config.seed_everything)


class WMCLI(RunCLI):
    def __init__(self, **kwargs):
        kwargs.setdefault("parser_kwargs", {"prog": "python -m wm"})
        self.replay_verified: str | None = None  # the manifest whose chunks `replay_problem` read whole
        super().__init__(Agent, ReplayDataModule, **kwargs)

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

    def default_run_name(self, config) -> str:
        return default_run_name(config)

    def derive_seeds(self, config) -> None:
        """`env.seed` (env resets, random prefill, evaluation envs) and `data.seed` (replay sampling)
        from the run's seed, where they are not set."""
        if config.env.seed is None:
            config.env.seed = derived_seed(run_seed(config), "env")
        super().derive_seeds(config)

    # ------------------------------------------------------------------------------ parsing
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in EVALUATING:
            self.config_from_checkpoint(parser, args, subcommand)

    def config_from_checkpoint(self, parser: LightningArgumentParser, args, subcommand: str) -> None:
        """`test` and `predict` evaluate a checkpoint as the run that wrote it: its recorded config
        comes first and the command's `--config` files and overrides go over it, which may change
        how the evaluation is done but not what is evaluated (`wm.run.identity.fixed_for_evaluation`)."""
        config = self.config[subcommand]
        if config.ckpt_path == "last":
            config.ckpt_path = str(self.run_dir_of(config) / "checkpoints" / LAST)
        if not config.ckpt_path:
            raise CheckpointError(
                f"ckpt_path is not set: {subcommand} plays a trained agent; pass --ckpt_path with a checkpoint's path "
                "(its task, model and run come with it), or --ckpt_path last with the run's --config (its "
                f"{self.run_dir_of(config) / 'checkpoints' / LAST}); nothing was changed")
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
            if subcommand == "test" and self.record is not None:
                self.check_store_beside(own, config.run.tracking_uri, self.record["config"]["run"]["tracking_uri"], path)

    @staticmethod
    def check_store_beside(run_dir: Path, uri: str, recorded: str, path: str) -> None:
        """A run folder that was copied or moved keeps, in its checkpoints, the store it was made
        in; where a store lies beside it and the command names no other, the test's results would
        go to a store that is not this folder's: refused, naming both."""
        beside, recorded_db = run_dir.parent / "mlflow.db", sqlite_file(recorded)
        if uri != recorded or recorded_db is None or not beside.exists():
            return  # a store given on the command line, a tracking server, or no store beside the run
        if beside.resolve() != recorded_db.resolve():
            raise CheckpointError(
                f"test --ckpt_path {path}: the run folder {run_dir} lies beside the store {beside}, but its checkpoint "
                f"was tracked in {recorded_db} (the run was copied or moved). Name the store to log into: "
                f"--run.tracking_uri {sqlite_uri(beside)} for the one beside it (if it holds the run), or "
                f"--run.tracking_uri {recorded} for the original. Nothing was changed.")

    def replay_problem(self, path: Path, checkpoint: dict) -> str | None:
        """Whether every rank's replay files that the checkpoint names are present and whole
        (their configuration is checked later, against the model's, by `check_resume`)."""
        reference = checkpoint.get("replay")
        if reference is None:
            return f"{path.name} names no replay buffer"
        replay = path.parent / "replay"
        for rank_dir in sorted({replay / "rank0", *replay.glob("rank*")}):
            try:
                ReplayStore(rank_dir).verify(reference["manifest"])
            except ReplayFileError as error:
                return f"{path.name}'s replay: {error}"
        self.replay_verified = reference["manifest"]  # its chunks were read whole: check_resume checks the rest
        return None

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
        verified = self.replay_verified == reference["manifest"]
        for rank_dir in sorted({replay / "rank0", *replay.glob("rank*")}):  # every rank that saved one
            try:
                store = ReplayStore(rank_dir)
                if verified:
                    store.read_manifest(reference["manifest"], expected)
                else:
                    store.verify(reference["manifest"], expected)
            except ReplayFileError as e:
                raise CheckpointError(f"{e}. Nothing was changed: resume from another checkpoint in {path.parent}, "
                                      "or start a new run with another --run.name.") from None

    # ------------------------------------------------------------------------------ trainer
    def mlflow_run_id(self, run_dir: Path) -> str | None:
        """The run's MLflow run: the evaluated checkpoint's, else the one the run folder recorded."""
        if self.subcommand in EVALUATING and self.record is not None:
            return self.record["run_id"]
        return super().mlflow_run_id(run_dir)

    def fit_callbacks(self, config, run_dir: Path, uri: str) -> list:
        callbacks = [Interrupt(), EnvStepCheckpoint(str(run_dir / "checkpoints"), config.run.checkpoint_every)]
        if config.trainer.enable_progress_bar is not False:  # the bar first, so that it is closed before the summary prints
            callbacks.append(EnvProgressBar())
        return [*callbacks, RunSummary(run_dir, uri)]

    def instantiate_trainer(self, **kwargs):
        if self.subcommand == "fit":
            return super().instantiate_trainer(**kwargs)
        # test logs into the run (a run that was never started has nothing to log into); predict
        # writes its video and logs nothing. The checkpoint callback restores its state with the
        # checkpoint, also when it is only evaluated.
        config, run_dir = self.config[self.subcommand], self.run_dir()
        uri, run_id = config.run.tracking_uri, self.mlflow_run_id(run_dir)
        logger = False
        if run_id is not None and self.subcommand == "test":
            if rank_zero_only.rank == 0:
                self.check_tracked(uri, run_id, run_dir)
            logger = self.mlflow_logger(uri, run_id, run_dir)
        configured = list(self.config_init[self.subcommand].trainer.get("callbacks") or [])
        ours = [Interrupt(), EnvStepCheckpoint(str(run_dir / "checkpoints"), config.run.checkpoint_every)]
        return LightningCLI.instantiate_trainer(self, logger=logger, callbacks=[*configured, *ours], **kwargs)

    # ---------------------------------------------------------------------------- subcommands
    def test(self, model: Agent, datamodule: ReplayDataModule, ckpt_path: str | None = None, **kwargs) -> None:
        """The trainer's test, then where its results went."""
        self.trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        logger = self.trainer.logger
        if rank_zero_only.rank == 0 and isinstance(logger, EnvStepMLFlowLogger) and logger.run_id:
            uri = self.config[self.subcommand].run.tracking_uri
            print(f"test results logged to MLflow run {logger.run_id} ({self.run_dir().name}) in {uri}", flush=True)

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


REFUSALS = (*RUN_REFUSALS, MissingSimulator)  # a start refused before anything changed


def main(args: list[str] | None = None) -> None:
    retain_freed_memory()
    cli = WMCLI(args=args)
    signum = interrupt_signal(cli.trainer)
    if signum is not None:  # interrupted: saved and stopped cleanly, but not finished
        sys.exit(128 + signum)
    unsaved = getattr(cli.trainer.checkpoint_callback, "unsaved", None) if cli.subcommand == "fit" else None
    if unsaved:  # ran to its end, but that end is not on disk: not finished (MLflow says KILLED)
        print(f"error: the run's last state was not saved: {unsaved}. Free space, then resume it with --ckpt_path last",
              file=sys.stderr)
        sys.exit(1)

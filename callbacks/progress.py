"""What a person watching a fit sees: a bar over environment frames and, at the end, a summary.

The bar counts env frames (the budget every config is written in), with the total and an ETA; its
fields are short numbers: frames/s, updates/s, the last training and eval returns. Prefill has its
own bar (callbacks/env_loop.py). At the end of a fit, finished or interrupted, `RunSummary` prints
the final eval return, the frames, the wall time, the run folder and how to open it in MLflow.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only

from callbacks.env_loop import FRAMES_BAR, EnvLoop
from callbacks.interrupt import interrupt_signal
from wm.run.durations import format_duration
from wm.run.tracking import EnvStepMLFlowLogger, ui_address


def env_loop(trainer: L.Trainer) -> EnvLoop | None:
    return next((c for c in trainer.callbacks if isinstance(c, EnvLoop)), None)


def short(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


class EnvProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting env frames towards `env.total_steps` instead of batches."""

    BAR_FORMAT = FRAMES_BAR

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._last_refresh = 0.0

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="Training", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0.05, unit_scale=True, bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_bar(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """Lightning would reset the bar to count this epoch's batches; a fit is one endless epoch
        measured in frames, so the bar set up in on_train_start stays."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer)  # the final count and fields, not Lightning's list of logged metrics

    def _start_bar(self, trainer: L.Trainer) -> None:
        loop = env_loop(trainer)
        if loop is None:
            return
        bar = self.train_progress_bar
        bar.reset(total=loop.total_steps)
        bar.initial = bar.n = loop.env_steps  # a resumed run: the rate and ETA count from here
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if time.monotonic() - self._last_refresh >= 0.5:  # a terminal needs no more
            self._show(trainer)

    def _show(self, trainer: L.Trainer) -> None:
        loop, bar = env_loop(trainer), self.train_progress_bar
        if loop is None or bar is None or bar.disable:
            return
        self._last_refresh = time.monotonic()
        bar.n = min(loop.env_steps, loop.total_steps)
        bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.fields(loop).items()), refresh=True)

    @staticmethod
    def fields(loop: EnvLoop) -> dict[str, str]:
        return {"fps": short(loop.fps), "upd/s": short(loop.updates_per_second, 2),
                "return": short(loop.last_return), "eval": short(loop.last_eval_return)}


class RunSummary(L.Callback):
    """Prints what a finished or interrupted fit achieved, where it is, and how to look at it."""

    def __init__(self, run_dir: Path, tracking_uri: str):
        self.run_dir, self.tracking_uri = Path(run_dir), tracking_uri
        self.started = time.monotonic()
        self.printed = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.printed = time.monotonic(), False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after every callback's on_train_end: the final evaluation and checkpoint are done
        self.print_summary(trainer, interrupted=interrupt_signal(trainer) is not None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.print_summary(trainer, interrupted=True)

    @rank_zero_only
    def print_summary(self, trainer: L.Trainer, interrupted: bool) -> None:
        if self.printed:
            return
        self.printed = True
        print("\n" + "\n".join(self.lines(trainer, interrupted)), flush=True)

    def lines(self, trainer: L.Trainer, interrupted: bool) -> list[str]:
        loop = env_loop(trainer)
        unsaved = getattr(trainer.checkpoint_callback, "unsaved", None)
        title = ("Run interrupted (resume it with --ckpt_path last)" if interrupted else
                 "Run stopped before its end was saved (resume it with --ckpt_path last)" if unsaved else "Run finished")
        lines = [f"{title}: {self.run_dir.name}"]
        if loop is not None:
            if math.isnan(loop.last_eval_return):
                lines.append("  final eval return: none yet (no evaluation has run)")
            else:
                lines.append(f"  final eval return: {loop.last_eval_return:.1f} ± {loop.last_eval_std:.1f} "
                             f"(std over {loop.eval_episodes} greedy episode{'s' * (loop.eval_episodes != 1)}, "
                             f"at {loop.last_eval_at:,} frames)")
            lines.append(f"  env frames: {loop.env_steps:,} of {loop.total_steps:,}, updates: {trainer.global_step:,}")
        if unsaved:
            lines.append(f"  not saved: {unsaved}")
        lines.append(f"  wall time: {format_duration(time.monotonic() - self.started)} (this session)")
        lines.append(f"  run folder: {self.run_dir.resolve()}")
        logger = next((lg for lg in trainer.loggers if isinstance(lg, EnvStepMLFlowLogger)), None)
        if logger is not None and logger.run_id:
            lines.append(f"  open it: mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}")
            try:
                experiment_id = logger.experiment.get_run(logger.run_id).info.experiment_id
                lines.append(f"    then {ui_address(experiment_id, logger.run_id)}")
            except Exception:  # noqa: BLE001 - the store does not answer now; the summary still prints
                lines.append(f"    (the store does not answer now; the run is {logger.run_id})")
        return lines

"""Interrupts: Ctrl-C, SIGTERM and the scheduler's requeue signal end a fit cleanly.

A signal only raises a flag. The checkpoint callback sees it at the next safe point (the end of an
update, after the environment steps that follow it, or the end of prefill), writes a final
checkpoint and stops the fit; the MLflow run is then marked KILLED. Under SLURM the requeue signal
(Lightning's `SLURMEnvironment.requeue_signal`, SIGUSR1) also requeues the job once everything is
written, as Lightning's own auto-requeue does, but without its checkpoint written from inside the
signal handler, in the middle of an update. A second Ctrl-C stops at once; a kill at any moment
leaves the newest complete checkpoint resumable anyway.
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from wm.run.tracking import EnvStepMLFlowLogger

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupt(L.Callback):
    """Receives the stop signals during a fit; `signal` is the first one received, or None."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        if self.signal is None:
            rank_zero_info(f"\nReceived {signal.Signals(signum).name}: stopping after the current update with a checkpoint.")
        self.signal = self.signal or signum

    def _install(self) -> None:
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.signal = None
            self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its own SIGTERM handler just before training starts; it would end
        # the fit with an exception (a FAILED run) instead of a checkpoint, so ours goes on top.
        self._install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signal is not None:
            _mark_killed(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.signal is not None or isinstance(exception, KeyboardInterrupt):
            _mark_killed(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self.signal == signal.SIGUSR1 and trainer.is_global_zero and SLURMEnvironment.detect():
            requeue()


def _mark_killed(trainer: L.Trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, EnvStepMLFlowLogger):
            logger.interrupted = True


def requeue() -> None:
    """Put this SLURM job (or array task) back in the queue; it resumes from its last checkpoint."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    if result.returncode:
        rank_zero_warn(f"scontrol requeue {job} failed with exit code {result.returncode}")
    else:
        rank_zero_info(f"Requeued SLURM job {job}")


def interrupt_signal(trainer: L.Trainer) -> int | None:
    """The stop signal this fit received, or None."""
    for callback in trainer.callbacks:
        if isinstance(callback, Interrupt) and callback.signal is not None:
            return callback.signal
    return None

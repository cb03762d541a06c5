"""When and how checkpoints are written, so that a kill at any moment leaves a resumable run.

- `last.ckpt` is rewritten every `every` environment frames, at the end of training, and when
  the fit is interrupted (see `callbacks.interrupt`); each periodic one is also kept as
  `envstep=<frames>.ckpt`, a copy (no write to one file can touch the other).
- Each write is atomic (`AtomicCheckpointIO`: temporary file, fsync, rename), so `last.ckpt` is
  always the newest complete checkpoint.
- The replay buffer is saved beside the checkpoints while the checkpoint is being assembled
  (`EnvLoop.on_save_checkpoint`), and the checkpoint names the replay manifest it needs. After
  the checkpoint is on disk, replay files that no kept checkpoint needs are deleted.
- A save that fails for lack of space (a full disk, a quota, a file-size limit) leaves `last.ckpt`
  and its replay as they were: the temporary files are removed, one line says what was not saved
  and which checkpoint still resumes the run, and training goes on, trying again at the next
  save. If the final save fails too, the run ends with its MLflow status KILLED (not finished)
  and `python -m wm fit` exits with code 1: resume it with `--ckpt_path last` once there is space.
"""

from __future__ import annotations

import errno
import weakref
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.env_loop import EnvLoop
from callbacks.interrupt import interrupt_signal
from lightning.pytorch.utilities import rank_zero_warn

from wm.run.files import atomic_write, copy_file, remove_temporaries

LAST = "last.ckpt"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


class _WriteErrors:
    """A file whose first failed write is kept: torch.save reports a failed write (a full disk)
    as a RuntimeError of its zip writer, which hides the OSError and its errno."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, written through a temporary file, fsync and rename; a
    write that fails raises its OSError (ENOSPC, EDQUOT, EFBIG: see `EnvStepCheckpoint.save`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)

        def write(f) -> None:
            recording = _WriteErrors(f)
            try:
                torch.save(checkpoint, recording)
            except RuntimeError:
                if recording.error is not None:
                    raise recording.error from None
                raise

        atomic_write(path, write)


def replay_reference(path: Path) -> dict | None:
    """The replay reference a checkpoint file holds (None if it holds none or cannot be read);
    memory-mapped, so the weights are not read."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("replay")
    except Exception:  # a damaged checkpoint protects no replay files: it cannot be resumed
        return None


def collect_replay_garbage(store, directory: Path) -> None:
    """Delete the replay files that no checkpoint in `directory` needs."""
    kept = (replay_reference(path) for path in directory.glob("*.ckpt"))
    store.collect_garbage({ref["manifest"] for ref in kept if ref})


class EnvStepCheckpoint(ModelCheckpoint):
    """Writes `last.ckpt` every `every` env frames (kept as `envstep=<frames>.ckpt` too), at the
    end of training and on interrupt. Lightning's own saving schedule is off (`save_top_k=0`);
    the MLflow logger still logs `last.ckpt` as an artifact when the run ends."""

    def __init__(self, dirpath: str, every: int):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=0,
                         save_on_train_epoch_end=False)
        self.every = every
        self.saved_at = 0  # env frames of the last periodic checkpoint
        self.written: tuple[int, int] | None = None  # (env frames, updates) of the last write
        self.resumes_at: int | None = None  # env frames of the checkpoint a resume would load (None: none yet)
        self.unsaved: str | None = None  # why the newest state is not on disk; None after a good save

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_requested(trainer):  # interrupted during prefill: keep what was collected
            self.save(trainer)
            trainer.should_stop = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # a resume: its checkpoint resumes the run until a new one is saved
            self.resumes_at = env_loop_of(trainer).env_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = env_loop_of(trainer).env_steps
        periodic = bool(self.every) and steps // self.every > self.saved_at // self.every
        stop = self._stop_requested(trainer)
        if periodic:
            self.saved_at = steps
        if periodic or stop:
            self.save(trainer, keep=f"envstep={steps}.ckpt" if periodic else None)
        if stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.written != (env_loop_of(trainer).env_steps, trainer.global_step):
            self.save(trainer)
        if self.unsaved is not None:  # not finished: the run's last state is not on disk
            for logger in trainer.loggers:
                logger.interrupted = True
    @staticmethod
    def _stop_requested(trainer: L.Trainer) -> bool:
        """Whether any rank received a stop signal; all ranks stop at the same update."""
        return trainer.strategy.reduce_boolean_decision(interrupt_signal(trainer) is not None, all=False)

    def save(self, trainer: L.Trainer, keep: str | None = None) -> None:
        """Write last.ckpt (and its copy `keep`), then delete unneeded replay files. Out of space,
        nothing that was on disk changes and training goes on (the module's docstring)."""
        directory = Path(self.dirpath)
        last = directory / LAST
        frames = env_loop_of(trainer).env_steps
        self.written = (frames, trainer.global_step)
        wrote_last = False
        try:
            trainer.save_checkpoint(last, weights_only=False)
            wrote_last = True
            if trainer.is_global_zero and keep:
                copy_file(last, directory / keep)
        except OSError as error:
            if error.errno not in NO_SPACE:
                raise
            self.written = (frames, trainer.global_step) if wrote_last else None
            self.out_of_space(trainer, error, frames, saved=wrote_last)
            return
        self.resumes_at, self.unsaved = frames, None
        if trainer.is_global_zero:
            remove_temporaries(directory)
        trainer.strategy.barrier("EnvStepCheckpoint.save")
        store = trainer.datamodule.store
        if store is not None:
            collect_replay_garbage(store, directory)
        self.last_model_path = str(last)
        for logger in trainer.loggers:
            logger.after_save_checkpoint(weakref.proxy(self))

    def out_of_space(self, trainer: L.Trainer, error: OSError, frames: int, saved: bool) -> None:
        """Say once, in one line, what was not saved and what still resumes the run."""
        directory = Path(self.dirpath)
        remove_temporaries(directory)
        store = trainer.datamodule.store if trainer.datamodule is not None else None
        if store is not None:  # the replay files this save wrote before its checkpoint failed are no one's
            collect_replay_garbage(store, directory)
        where = error.filename or self.dirpath
        if saved:  # last.ckpt is new and resumes the run; only its kept copy failed
            self.resumes_at = frames
            what = f"the kept copy of {LAST} at {frames:,} env frames was not written"
        else:
            what = f"the checkpoint at {frames:,} env frames was not saved"
        resumes = (f"{LAST} {'resumes' if saved else 'still resumes'} the run at {self.resumes_at:,} frames"
                   if self.resumes_at is not None else "no checkpoint of this run exists yet")
        said = f"{what} ({error.strerror}: {where}); {resumes}"
        self.unsaved = None if saved else said
        next_save = (frames // self.every + 1) * self.every if self.every else None
        rank_zero_warn(f"{said}; training goes on and saves again "
                       f"{f'at {next_save:,} frames' if next_save else 'at the end'}. Free space on that disk, or stop "
                       f"the run and resume it with --ckpt_path last")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "saved_at": self.saved_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_at = state_dict.pop("saved_at", 0)
        super().load_state_dict(state_dict)


def env_loop_of(trainer: L.Trainer) -> EnvLoop:
    loops = [c for c in trainer.callbacks if isinstance(c, EnvLoop)]
    if len(loops) != 1:
        raise RuntimeError(f"expected one EnvLoop callback, found {len(loops)}")
    return loops[0]

"""When and how checkpoints are written, so that a kill at any moment leaves a resumable run.

- `last.ckpt` is rewritten every `every` environment frames, at the end of training, and when
  the fit is interrupted (see `callbacks.interrupt`); each periodic one is also kept as
  `envstep=<frames>.ckpt`, a second name for the same file.
- Each write is atomic (`AtomicCheckpointIO`: temporary file, fsync, rename), so `last.ckpt` is
  always the newest complete checkpoint.
- The replay buffer is saved beside the checkpoints while the checkpoint is being assembled
  (`EnvLoop.on_save_checkpoint`), and the checkpoint names the replay manifest it needs. After
  the checkpoint is on disk, replay files that no kept checkpoint needs are deleted.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.env_loop import EnvLoop
from callbacks.interrupt import interrupt_signal
from wm.files import atomic_write, hard_link, remove_temporaries

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, written through a temporary file, fsync and rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def replay_reference(path: Path) -> dict | None:
    """The replay reference a checkpoint file holds (None if it holds none or cannot be read);
    memory-mapped, so the weights are not read."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("replay")
    except Exception:  # a damaged checkpoint protects no replay files: it cannot be resumed
        return None


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

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_requested(trainer):  # interrupted during prefill: keep what was collected
            self.save(trainer)
            trainer.should_stop = True

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

    @staticmethod
    def _stop_requested(trainer: L.Trainer) -> bool:
        """Whether any rank received a stop signal; all ranks stop at the same update."""
        return trainer.strategy.reduce_boolean_decision(interrupt_signal(trainer) is not None, all=False)

    def save(self, trainer: L.Trainer, keep: str | None = None) -> None:
        """Write last.ckpt (and its second name `keep`), then delete unneeded replay files."""
        directory = Path(self.dirpath)
        last = directory / LAST
        self.written = (env_loop_of(trainer).env_steps, trainer.global_step)
        trainer.save_checkpoint(last, weights_only=False)
        if trainer.is_global_zero:
            if keep:
                hard_link(last, directory / keep)
            remove_temporaries(directory)
        trainer.strategy.barrier("EnvStepCheckpoint.save")
        store = trainer.datamodule.store
        if store is not None:
            kept = (replay_reference(path) for path in directory.glob("*.ckpt"))
            store.collect_garbage({ref["manifest"] for ref in kept if ref})
        self.last_model_path = str(last)
        for logger in trainer.loggers:
            logger.after_save_checkpoint(weakref.proxy(self))

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

"""The replay DataModule: endless (B, T) batches from the replay buffer, latents written back
after each update, and the buffer saved and restored with the checkpoints."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.replay_buffer import ReplayBuffer, ReplayFileError, buffer_config
from datamodules.replay_store import ReplayStore


class ReplaySequences(IterableDataset):
    """Endless batches sampled from the data module's buffer when asked for, so that steps
    added meanwhile are visible.

    Each batch carries its own `replay_index` (where it lives in the ring, and a serial number),
    so its posteriors are written back to its own rows, however far Lightning prefetches. The
    sampler state before each batch not yet trained on waits in `unsettled`, for checkpoints.
    """

    def __init__(self, datamodule: "ReplayDataModule"):
        self.datamodule = datamodule
        self.serial = 0
        self.unsettled: deque[tuple[int, torch.Tensor]] = deque()  # (serial, generator state before it)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.datamodule
        while True:
            state = dm.generator.get_state()
            batch, index = dm.buffer_or_raise().sample(dm.batch_size, dm.sequence_length, dm.generator)
            self.serial += 1
            self.unsettled.append((self.serial, state))
            yield {**batch, "replay_index": index._replace(serial=self.serial)}

    def settle(self, serial: int) -> None:
        """Batch `serial` was trained on: the checkpoint state no longer needs to redraw it."""
        while self.unsettled and self.unsettled[0][0] <= serial:
            self.unsettled.popleft()


class ReplayDataModule(L.LightningDataModule):
    """Replayed (B, T) sequences for the agent. It knows no environment: the environment
    callback calls `create_buffer` once the spaces are known and adds steps to `buffer`, calls
    `write_back` after each update, and `save_replay`/`load_replay` with the checkpoints.

    Args:
        batch_size: sequences per batch (B).
        sequence_length: steps per sequence (T).
        capacity: replay capacity in steps, all envs together.
        storage: "cpu" or "cuda", where the buffer lives.
        memmap_dir: keep the buffer in memory-mapped files in this directory (CPU only).
        seed: sampling seed; the global rank is added under a trainer.
    """

    def __init__(
        self,
        batch_size: int = 16,
        sequence_length: int = 64,
        capacity: int = 1_000_000,
        storage: str = "cpu",
        memmap_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if storage not in ("cpu", "cuda"):
            raise ValueError(f"storage must be 'cpu' or 'cuda', got {storage!r}")
        self.save_hyperparameters()
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.buffer: ReplayBuffer | None = None
        self.sequences: ReplaySequences | None = None
        self.store: ReplayStore | None = None  # the store of the folder last saved to or loaded from
        self.generator = torch.Generator().manual_seed(seed)
        self._rank_seeded = False

    def create_buffer(
        self,
        num_envs: int,
        observation_shapes: Mapping[str, tuple[int, ...]],
        action_dim: int,
        latent_shape: tuple[int, int, int] | None = None,
    ) -> ReplayBuffer:
        """The buffer for these spaces; calling again with the same ones returns the same buffer."""
        hp = self.hparams
        if self.buffer is not None:
            config = buffer_config(hp.capacity, num_envs, observation_shapes, action_dim, latent_shape)
            if config != self.buffer.config:
                raise ValueError(f"replay buffer already created with {self.buffer.config}, not {config}")
            return self.buffer
        self.buffer = ReplayBuffer(hp.capacity, num_envs, observation_shapes, action_dim, latent_shape, hp.storage, hp.memmap_dir)
        return self.buffer

    def buffer_or_raise(self) -> ReplayBuffer:
        if self.buffer is None:
            raise RuntimeError("the replay buffer does not exist yet: the environment callback must call create_buffer first")
        return self.buffer

    def setup(self, stage: str) -> None:
        """Give every rank its own sample stream (once, so a restored state is kept)."""
        if self.trainer is not None and not self._rank_seeded:
            self.generator.manual_seed(self.hparams.seed + self.trainer.global_rank)
            self._rank_seeded = True

    def train_dataloader(self) -> DataLoader:
        self.sequences = ReplaySequences(self)
        return DataLoader(self.sequences, batch_size=None, num_workers=0)

    def write_back(self, batch: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        """Store the posteriors of training_step's `outputs` (keys deter, stoch) at the rows of
        the batch they were computed from. A skipped update returns none: nothing is written."""
        index = batch["replay_index"]
        if "deter" in outputs:
            self.buffer_or_raise().write_latents(index, outputs["deter"], outputs["stoch"])
        if self.sequences is not None:
            self.sequences.settle(int(index.serial))

    # ---------------------------------------------------------------------------- persistence
    def save_replay(self, directory: str | Path, save_id: str) -> dict[str, Any]:
        """Write the buffer's new rows and a manifest to `directory`; returns the reference a
        checkpoint keeps (`rows` covered and the `manifest` name)."""
        buffer = self.buffer_or_raise()
        if self.store is None or self.store.directory != Path(directory):
            self.store = ReplayStore(directory)
        return {"rows": buffer.rows_added, "manifest": self.store.save(buffer, save_id)}

    def load_replay(self, directory: str | Path, reference: Mapping[str, Any]) -> None:
        """Refill the buffer with exactly the rows a checkpoint's reference covers."""
        self.store = ReplayStore(directory)
        self.store.load(self.buffer_or_raise(), reference["manifest"])
        if self.buffer.rows_added != reference["rows"]:
            raise ReplayFileError(f"{directory}: the manifest covers {self.buffer.rows_added} rows, the checkpoint {reference['rows']}")

    def state_dict(self) -> dict[str, Any]:
        """The sampler state before the oldest batch not yet trained on (Lightning's prefetched
        one), so that a resumed run draws it again instead of skipping it."""
        unsettled = self.sequences.unsettled if self.sequences is not None else None
        return {"generator": (unsettled[0][1] if unsettled else self.generator.get_state()).clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self._rank_seeded = True

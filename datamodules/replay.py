"""The replay DataModule: endless (B, T) batches from the replay buffer, latents written back
after each update, and the buffer saved and restored with the checkpoints.

Where the buffer lives (`storage`): training on CUDA, on the model's device by default, so
sampling gathers each batch on the device (no host-to-device copy of batches) and the latents are
written back there, with no host sync; with the buffer on the CPU and the model on CUDA, batches
are gathered into pinned memory and copied with non_blocking=True. On a CPU-only machine the
buffer is on the CPU and nothing is copied.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from datamodules.replay_buffer import ReplayBuffer, ReplayFileError, buffer_config, buffer_nbytes
from datamodules.replay_store import ReplayStore
from wm.model.phases import phase

STORAGE = ("auto", "cpu", "cuda")
# storage=auto keeps the buffer on the model's CUDA device when it takes at most this share of the
# device's free memory (the rest is for training); otherwise in (pinned-batch) CPU memory.
DEVICE_MEMORY_SHARE = 0.5


def resolve_storage(
    storage: str,
    model_device: torch.device | str | None,
    memory_mapped: bool = False,
    nbytes: int = 0,
    free_bytes: int | None = None,
) -> torch.device:
    """Where the replay arrays live.

    Args:
        storage: "auto", "cpu" or "cuda" (`ReplayDataModule`'s option).
        model_device: the device the model trains on (the trainer's root device); None: no trainer.
        memory_mapped: the buffer is kept in memory-mapped files (always on the CPU).
        nbytes: bytes the buffer's arrays take.
        free_bytes: free memory of `model_device` when it is a CUDA device; None: not known.

    auto is the model's CUDA device if the model trains on CUDA, the buffer is not memory-mapped
    and it takes at most DEVICE_MEMORY_SHARE of the free device memory; the CPU otherwise. cuda
    is the model's CUDA device, or the current one when the model is elsewhere.
    """
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {', '.join(STORAGE)}, got {storage!r}")
    model_device = torch.device(model_device) if model_device is not None else None
    on_cuda = model_device is not None and model_device.type == "cuda"
    if storage == "cuda":
        return model_device if on_cuda else torch.device("cuda")
    if storage == "cpu" or not on_cuda or memory_mapped:
        return torch.device("cpu")
    if free_bytes is not None and nbytes > DEVICE_MEMORY_SHARE * free_bytes:
        return torch.device("cpu")
    return model_device


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
            with phase("replay"):
                batch, index = dm.buffer_or_raise().sample(dm.batch_size, dm.sequence_length, dm.generator, dm.pin_memory)
            self.serial += 1
            self.unsettled.append((self.serial, state))
            yield {**batch, "replay_index": index._replace(serial=self.serial)}

    def settle(self, serial: int) -> None:
        """Batch `serial` was trained on: the checkpoint state no longer needs to redraw it."""
        while self.unsettled and self.unsettled[0][0] <= serial:
            self.unsettled.popleft()


class TestEpisodes(IterableDataset):
    """The evaluation episodes of `test`, one per batch, played when the test loop asks for them."""

    def __init__(self, episodes: Callable[[], Iterator[Any]]):
        self.episodes = episodes

    def __iter__(self) -> Iterator[Any]:
        return self.episodes()


class ReplayDataModule(L.LightningDataModule):
    """Replayed (B, T) sequences for the agent. It knows no environment: the environment
    callback calls `create_buffer` once the spaces are known and adds steps to `buffer`, calls
    `write_back` after each update, and `save_replay`/`load_replay` with the checkpoints.

    Args:
        batch_size: sequences per batch (B).
        sequence_length: steps per sequence (T).
        capacity: replay capacity in steps, all envs together.
        storage: where the buffer lives: "auto" (default): on the trainer's accelerator device
            when it is a CUDA device and the buffer takes at most half of its free memory (so
            batches are sampled on the device, and latents written back there, with no copy
            and no host sync), else on the CPU; "cpu"; "cuda": on the trainer's CUDA device. A
            buffer on the CPU for a model on CUDA gives batches in pinned memory, copied to the
            device with non_blocking=True. On a CPU-only machine auto is the CPU.
        memmap_dir: keep the buffer in memory-mapped files in this directory (CPU only; auto
            then keeps it on the CPU).
        seed: replay sampling seed; the global rank is added under a trainer. None: `python -m wm`
            derives it from the run's seed (`seed_everything`, see wm.run.identity.derived_seed); 0 for a
            data module made in code.
    """

    def __init__(
        self,
        batch_size: int = 16,
        sequence_length: int = 64,
        capacity: int = 1_000_000,
        storage: str = "auto",
        memmap_dir: str | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {', '.join(STORAGE)}, got {storage!r}")
        self.save_hyperparameters()
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.buffer: ReplayBuffer | None = None
        self.sequences: ReplaySequences | None = None
        self.store: ReplayStore | None = None  # the store of the folder last saved to or loaded from
        self.seed = 0 if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)
        self._rank_seeded = False
        self.pin_memory = False  # batches gathered into pinned memory: a CPU buffer for a CUDA model
        self.test_episodes: Callable[[], Iterator[Any]] | None = None

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
        model_device = self.trainer.strategy.root_device if self.trainer is not None else None
        config = buffer_config(hp.capacity, num_envs, observation_shapes, action_dim, latent_shape)
        nbytes = buffer_nbytes(config)
        free = None
        if hp.storage == "auto" and model_device is not None and model_device.type == "cuda":
            free = torch.cuda.mem_get_info(model_device)[0]
        device = resolve_storage(hp.storage, model_device, hp.memmap_dir is not None, nbytes, free)
        if hp.storage == "auto" and free is not None and device.type == "cpu" and hp.memmap_dir is None:
            rank_zero_info(f"Replay buffer kept in CPU memory: its {nbytes / 2**30:.1f} GiB are more than "
                           f"{DEVICE_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {model_device}.")
        self.pin_memory = device.type == "cpu" and model_device is not None and model_device.type == "cuda"
        self.buffer = ReplayBuffer(hp.capacity, num_envs, observation_shapes, action_dim, latent_shape, device, hp.memmap_dir)
        return self.buffer

    def buffer_or_raise(self) -> ReplayBuffer:
        if self.buffer is None:
            raise RuntimeError("the replay buffer does not exist yet: the environment callback must call create_buffer first")
        return self.buffer

    def setup(self, stage: str) -> None:
        """Give every rank its own sample stream (once, so a restored state is kept)."""
        if self.trainer is not None and not self._rank_seeded:
            self.generator.manual_seed(self.seed + self.trainer.global_rank)
            self._rank_seeded = True

    def train_dataloader(self) -> DataLoader:
        self.sequences = ReplaySequences(self)
        return DataLoader(self.sequences, batch_size=None, num_workers=0)

    def provide_test_episodes(self, episodes: Callable[[], Iterator[Any]]) -> None:
        """What `test` iterates over: evaluation episodes, which the environment callback plays
        with the agent under test (`episodes()` starts them)."""
        self.test_episodes = episodes

    def test_dataloader(self) -> DataLoader:
        if self.test_episodes is None:
            raise RuntimeError("`test` and `predict` play evaluation episodes: they need the environment callback "
                               "(callbacks.EnvLoop)")
        return DataLoader(TestEpisodes(self.test_episodes), batch_size=None, collate_fn=lambda episode: episode)

    def predict_dataloader(self) -> DataLoader:
        """The same greedy episodes as `test`'s, for `predict`, which keeps them instead of logging them."""
        return self.test_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The batch's tensors to the model's device (nothing to do for a buffer already there;
        non-blocking from pinned memory for a CPU buffer); `replay_index` stays on the buffer's
        device, where the latents are written back. A test episode stays where it is."""
        if not isinstance(batch, Mapping):
            return batch
        with phase("replay"):
            moved = {k: v.to(device, non_blocking=device.type == "cuda") for k, v in batch.items() if k != "replay_index"}
        return {**moved, "replay_index": batch["replay_index"]}

    def write_back(self, batch: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        """Store the posteriors of training_step's `outputs` (keys deter, stoch) at the rows of
        the batch they were computed from, by its `replay_index`, with no host sync (see
        `ReplayBuffer.write_latents`). Where `outputs["taken"]` is false (a skipped update),
        nothing is written; outputs without latents write nothing either."""
        index = batch["replay_index"]
        if "deter" in outputs:
            with phase("replay"):
                self.buffer_or_raise().write_latents(index, outputs["deter"], outputs["stoch"], outputs.get("taken"))
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

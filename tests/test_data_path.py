"""The replay data path: where the buffer lives (`storage`), batches gathered by index, latents
written back by index without a host sync, and the buffer saved and loaded through the host.

The CUDA branches differ only in the device; what a CPU can check is checked here: the choice of
device as a pure function, the pinned-batch flag for a CUDA model, a real fit with the default,
save and load of a buffer whose storage is named explicitly, and, on the "meta" device (tensors
without data, where every data-dependent shape or host read fails), that sampling and the
write-back have no host sync in them.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import ReplayBuffer, ReplayDataModule
from datamodules.replay import DEVICE_MEMORY_SHARE, resolve_storage
from datamodules.replay_buffer import buffer_config, buffer_nbytes
from wm.agent.agent import Agent
from wm.objectives import Barlow
from wm.model.sizes import model_size

SHAPES = {"image": (64, 64, 3), "state": (3,)}
SIZE = model_size("size1M")
LATENT = (SIZE.deter, SIZE.stoch, SIZE.classes)
GiB = 2**30


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step(row: int, num_envs: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(row)
    return {
        "image": rng.integers(0, 256, (num_envs, 64, 64, 3), dtype=np.uint8),
        "state": np.stack([np.full(num_envs, row), np.arange(num_envs), np.zeros(num_envs)], 1).astype(np.float32),
        "action": rng.uniform(-1, 1, (num_envs, 2)).astype(np.float32),
        "reward": rng.standard_normal(num_envs).astype(np.float32),
        "is_first": np.full(num_envs, row % 6 == 0),
        "is_last": np.full(num_envs, row % 6 == 5),
        "is_terminal": np.zeros(num_envs, bool),
    }


# ------------------------------------------------------------------------- where the buffer lives
def test_storage_resolves_to_the_trainers_cuda_device_only_when_it_fits():
    cuda1 = torch.device("cuda:1")
    # No trainer, or a CPU trainer: the CPU, whatever auto could mean elsewhere.
    assert resolve_storage("auto", None) == torch.device("cpu")
    assert resolve_storage("auto", torch.device("cpu"), nbytes=10 * GiB, free_bytes=None) == torch.device("cpu")
    assert resolve_storage("cpu", "cpu") == torch.device("cpu")
    # A CUDA trainer: its own device (that of its rank), if the buffer takes at most half the free memory.
    assert resolve_storage("auto", cuda1, nbytes=10 * GiB, free_bytes=70 * GiB) == cuda1
    assert resolve_storage("auto", cuda1, nbytes=int(DEVICE_MEMORY_SHARE * 20 * GiB), free_bytes=20 * GiB) == cuda1
    assert resolve_storage("auto", cuda1, nbytes=10 * GiB + 1, free_bytes=20 * GiB) == torch.device("cpu")
    assert resolve_storage("auto", "cuda:0", memory_mapped=True, nbytes=1, free_bytes=GiB) == torch.device("cpu")
    assert resolve_storage("cpu", cuda1) == torch.device("cpu")
    # Named: cuda is the trainer's CUDA device, or the current one.
    assert resolve_storage("cuda", cuda1, nbytes=100 * GiB, free_bytes=GiB) == cuda1
    assert resolve_storage("cuda", None) == torch.device("cuda")
    with pytest.raises(ValueError, match="storage must be one of auto, cpu, cuda"):
        resolve_storage("gpu", None)
    with pytest.raises(ValueError, match="storage must be one of auto, cpu, cuda"):
        ReplayDataModule(storage="gpu")


def test_buffer_bytes_are_those_of_its_arrays():
    config = buffer_config(100, 4, SHAPES, 2, LATENT)
    buffer = ReplayBuffer(100, 4, SHAPES, 2, LATENT)
    assert buffer.nbytes == buffer_nbytes(config) == sum(a.numel() * a.element_size() for a in buffer.arrays.values())
    # DMC at size12M: about 16 GiB for 1M steps, which an 80 GB H100 holds beside training.
    size = model_size("size12M")
    dmc = buffer_config(1_000_000, 16, {"image": (64, 64, 3)}, 6, (size.deter, size.stoch, size.classes))
    assert 12 * GiB < buffer_nbytes(dmc) < 20 * GiB


def fake_trainer(device: str) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))


def test_a_cpu_buffer_for_a_cuda_model_gives_pinned_batches():
    dm = ReplayDataModule(batch_size=2, sequence_length=4, capacity=64, storage="cpu")
    dm.trainer = fake_trainer("cuda:0")  # the model on CUDA; the buffer named to the CPU
    buffer = dm.create_buffer(2, SHAPES, 2, LATENT)
    assert buffer.device == torch.device("cpu") and dm.pin_memory
    cpu = ReplayDataModule(batch_size=2, sequence_length=4, capacity=64)
    cpu.trainer = fake_trainer("cpu")
    assert cpu.create_buffer(2, SHAPES, 2, LATENT).device == torch.device("cpu") and not cpu.pin_memory


class FillBuffer(L.Callback):
    """What the env loop does at setup: create the buffer (the trainer now attached) and fill it."""

    def setup(self, trainer, pl_module, stage):
        buffer = trainer.datamodule.create_buffer(2, SHAPES, 2, LATENT)
        for row in range(12):
            buffer.add(step(row))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert batch["replay_index"].time.device == trainer.datamodule.buffer.device
        trainer.datamodule.write_back(batch, outputs)


def test_a_real_fit_with_the_default_storage_trains_from_a_cpu_buffer():
    torch.manual_seed(0)
    agent = Agent(SHAPES, 2, objective=Barlow(), size="size1M")
    dm = ReplayDataModule(batch_size=2, sequence_length=8, capacity=64)
    assert dm.hparams.storage == "auto"
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[FillBuffer()])
    trainer.fit(agent, datamodule=dm)
    assert dm.buffer.device == torch.device("cpu") and not dm.pin_memory
    assert trainer.global_step == 2
    assert dm.buffer.arrays["stoch"].ne(255).any(), "the latents were written back"


# ------------------------------------------------------------------------------- gathering
def test_batches_are_the_rows_of_their_index_and_transfer_keeps_the_index():
    dm = ReplayDataModule(batch_size=3, sequence_length=5, capacity=64, storage="cpu")
    buffer = dm.create_buffer(2, SHAPES, 2, LATENT)
    for row in range(20):
        buffer.add(step(row))
    batch = next(iter(dm.train_dataloader()))
    index = batch["replay_index"]
    for name in ("image", "state", "action", "reward", "is_first", "is_last", "is_terminal"):
        assert torch.equal(batch[name], buffer.arrays[name][index.time, index.env[:, None]]), name
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved["replay_index"] is index
    assert all(torch.equal(moved[k], batch[k]) for k in batch if k != "replay_index")


# ------------------------------------------------------------------------------ write-back
def test_sampling_and_write_back_have_no_host_sync():
    """On the meta device a boolean mask, nonzero or .item() fails: none is in the path a CUDA
    buffer takes for sampling and writing back (only the host-to-device copy is swapped)."""
    buffer = ReplayBuffer(40, 2, SHAPES, 2, LATENT, device="meta")
    buffer._to_storage = lambda value: value.to(buffer.device)  # stands in for the pinned copy
    buffer.steps_added = 2 * 15
    batch, index = buffer.sample(4, 5, torch.Generator().manual_seed(0))
    assert batch["image"].shape == (4, 5, 64, 64, 3) and batch["image"].device.type == "meta"
    assert index.time.device.type == "meta"
    buffer.steps_added += 2 * 3  # rows written since sampling: some of the batch's are overwritten
    deter = torch.zeros(4, 5, SIZE.deter, device="meta")
    stoch = torch.zeros(4, 5, SIZE.stoch, SIZE.classes, device="meta")
    buffer.write_latents(index, deter, stoch)
    with pytest.raises(NotImplementedError):  # what the masked write-back did
        index.time[index.time > 0]


def test_a_staged_write_back_lands_at_the_next_add_and_spares_overwritten_rows():
    """The path of a CUDA model's latents for a CPU buffer, after their non-blocking copy:
    kept until the next add, then written against the rows as they are then."""
    buffer = ReplayBuffer(12, 2, SHAPES, 2, LATENT)
    for row in range(6):
        buffer.add(step(row))
    _, index = buffer.sample(4, 6, torch.Generator().manual_seed(7))  # whole streams
    deter = torch.full((4, 6, SIZE.deter), 2.0, dtype=torch.float16)
    stoch = torch.ones(4, 6, SIZE.stoch, dtype=torch.uint8)
    buffer.stage_latents(index, deter, stoch)
    assert buffer.pending is not None and not buffer.arrays["deter"].any(), "not stored yet"
    buffer.add(step(6))  # ring row 0 now holds step 6: the staged latents must not land there
    assert buffer.pending is None
    assert not buffer.arrays["deter"][0].any() and buffer.arrays["stoch"][0].eq(255).all()
    assert buffer.arrays["deter"][1:].eq(2.0).all() and buffer.arrays["stoch"][1:].eq(1).all()
    buffer.stage_latents(index, deter, stoch)
    buffer.clear()
    assert buffer.pending is None, "a cleared buffer forgets the write-back on its way"


def test_a_skipped_update_writes_no_latents():
    """An update skipped for a non-finite value (taken false, decided on the device) leaves the
    stored latents as they were, on both write-back paths."""
    buffer = ReplayBuffer(12, 2, SHAPES, 2, LATENT)
    for row in range(6):
        buffer.add(step(row))
    _, index = buffer.sample(4, 6, torch.Generator().manual_seed(7))
    deter = torch.full((4, 6, SIZE.deter), float("nan"))
    stoch = torch.zeros(4, 6, SIZE.stoch, SIZE.classes)
    buffer.write_latents(index, deter, stoch, torch.tensor(False))
    assert not buffer.arrays["deter"].any() and buffer.arrays["stoch"].eq(255).all()
    buffer.stage_latents(index, deter.half(), stoch.argmax(-1).byte(), torch.tensor(False))
    buffer.flush_latents()
    assert not buffer.arrays["deter"].any() and buffer.arrays["stoch"].eq(255).all()
    buffer.write_latents(index, deter.nan_to_num(3.0), stoch, torch.tensor(True))
    assert buffer.arrays["deter"][:6].eq(3.0).all()


# ---------------------------------------------------------------------------- persistence
def test_a_buffer_with_named_storage_saves_and_loads_through_the_host(tmp_path):
    dm = ReplayDataModule(batch_size=2, sequence_length=4, capacity=16, storage="cpu")
    buffer = dm.create_buffer(2, SHAPES, 2, LATENT)
    assert buffer.device == torch.device("cpu")
    for row in range(11):  # wraps around the 8 rows of each stream
        buffer.add(step(row))
    batch = next(iter(dm.train_dataloader()))
    dm.write_back(batch, {"deter": torch.ones(2, 4, SIZE.deter), "stoch": torch.ones(2, 4, SIZE.stoch, SIZE.classes)})
    reference = dm.save_replay(tmp_path, "abc")
    resumed = ReplayDataModule(batch_size=2, sequence_length=4, capacity=16, storage="cpu")
    loaded = resumed.create_buffer(2, SHAPES, 2, LATENT)
    resumed.load_replay(tmp_path, reference)
    assert loaded.state_dict() == buffer.state_dict()
    for name in buffer.layout:
        if name in ("deter", "stoch"):  # the replay context is a cache, not saved
            assert not loaded.arrays["deter"].any() and loaded.arrays["stoch"].eq(255).all()
        else:
            assert torch.equal(loaded.arrays[name], buffer.arrays[name]), name

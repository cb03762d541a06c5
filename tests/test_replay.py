"""Replay buffer and data module: layout, FIFO windows, replay context, memory-maps, the
agent training on replayed batches (persistence: tests/test_replay_store.py), and the random
shift that augments replayed images."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import ReplayBuffer, ReplayDataModule
from wm.agent.agent import Agent
from wm.model.augment import sequence_shift
from wm.objectives import Barlow
from wm.model.sizes import model_size

SHAPES = {"image": (4, 4, 3), "state": (2,)}
LATENT = (6, 3, 5)  # deter, stoch, classes


def make_buffer(capacity=12, num_envs=2, latent=LATENT, **kwargs) -> ReplayBuffer:
    return ReplayBuffer(capacity, num_envs, SHAPES, 2, latent, **kwargs)


def step(row: int, num_envs: int = 2) -> dict[str, np.ndarray]:
    """Row `row` of every env: the step number and env id are readable from state, and from
    reward (10 * row + env) except on is_first rows, which store none; an episode starts every 5 rows."""
    env = np.arange(num_envs)
    first = np.full(num_envs, row % 5 == 0)
    return {
        "image": np.full((num_envs, 4, 4, 3), row % 256, np.uint8),
        "state": np.stack([np.full(num_envs, row), env], 1).astype(np.float32),
        "action": np.full((num_envs, 2), row + 1, np.float32),
        "reward": (10 * row + env).astype(np.float32),
        "is_first": first,
        "is_last": np.full(num_envs, row % 5 == 4),
        "is_terminal": np.zeros(num_envs, bool),
    }


def fill(buffer: ReplayBuffer, rows: int, start: int = 0) -> ReplayBuffer:
    for row in range(start, start + rows):
        buffer.add(step(row, buffer.num_envs))
    return buffer


def snapshot(buffer: ReplayBuffer) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    return {k: v.clone() for k, v in buffer.arrays.items()}, buffer.state_dict()


def assert_same(buffer: ReplayBuffer, snap) -> None:
    arrays, state = snap
    assert buffer.state_dict() == state
    assert all(torch.equal(buffer.arrays[k], v) for k, v in arrays.items())


# --------------------------------------------------------------------------- adding, sampling
def test_add_and_sample_shapes_and_dtypes():
    buffer = fill(make_buffer(), 4)
    assert len(buffer) == 8 and buffer.steps_added == 8
    batch, index = buffer.sample(3, 4, torch.Generator().manual_seed(0))
    expected = {
        "image": ((3, 4, 4, 4, 3), torch.uint8),
        "state": ((3, 4, 2), torch.float32),
        "action": ((3, 4, 2), torch.float32),
        "reward": ((3, 4), torch.float32),
        "is_first": ((3, 4), torch.bool),
        "is_last": ((3, 4), torch.bool),
        "is_terminal": ((3, 4), torch.bool),
        "deter": ((3, 6), torch.float32),
        "stoch": ((3, 3, 5), torch.float32),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == expected
    assert index.env.shape == (3,) and index.time.shape == (3, 4)
    assert not batch["action"][batch["is_first"]].any(), "no action leads to an episode's first step"


def test_is_first_rows_store_no_action_and_no_reward_whatever_the_writer_passes():
    buffer = make_buffer(capacity=12, num_envs=2)
    for row in range(3):
        written = step(row)  # row 0 starts an episode in both envs; here env 1 also restarts at row 2
        written["is_first"] = np.array([row == 0, row in (0, 2)])
        written["is_last"] = np.array([False, row == 1])
        buffer.add(written)
    first = buffer.arrays["is_first"][:3]
    assert first.tolist() == [[True, True], [False, False], [False, True]]
    assert not buffer.arrays["action"][:3][first].any() and not buffer.arrays["reward"][:3][first].any()
    # Everywhere else, what was written is stored.
    assert (buffer.arrays["action"][:3][~first] == torch.tensor([[2.0, 2.0], [2.0, 2.0], [3.0, 3.0]])).all()
    assert buffer.arrays["reward"][:3][~first].tolist() == [10.0, 11.0, 20.0]


def test_sequences_are_consecutive_steps_of_one_env():
    buffer = fill(make_buffer(capacity=40, num_envs=4), 9)
    batch, index = buffer.sample(64, 5, torch.Generator().manual_seed(1))
    row, env = batch["state"][..., 0], batch["state"][..., 1]
    assert (row.diff(dim=1) == 1).all()
    assert (env == index.env[:, None].float()).all()
    assert torch.equal(batch["reward"], torch.where(batch["is_first"], 0.0, 10 * row + env))
    assert (batch["image"] == row[..., None, None, None].to(torch.uint8)).all()
    assert set(env[:, 0].tolist()) == {0, 1, 2, 3}


def test_fifo_keeps_the_newest_steps_and_never_crosses_the_write_head():
    buffer = fill(make_buffer(capacity=12, num_envs=2), 15)  # 6 rows per env, 9 overwritten
    assert len(buffer) == 12 and buffer.steps_added == 30 and buffer.position == 15 % 6
    assert sorted(buffer.arrays["state"][:, 0, 0].tolist()) == list(range(9, 15))
    batch, _ = buffer.sample(200, 4, torch.Generator().manual_seed(2))
    starts = batch["state"][:, 0, 0]
    assert (batch["state"][..., 0].diff(dim=1) == 1).all(), "a window crossed the write head"
    assert set(starts.tolist()) == {9.0, 10.0, 11.0}, "every valid window, and only those, is sampled"
    batch, _ = buffer.sample(50, 6, torch.Generator().manual_seed(3))  # the whole stream
    assert (batch["state"][..., 0] == torch.arange(9, 15)).all()


def test_add_refuses_missing_keys_and_wrong_shapes():
    buffer = make_buffer()
    incomplete = step(0)
    del incomplete["is_terminal"]
    with pytest.raises(ValueError, match="is_terminal"):
        buffer.add(incomplete)
    wrong = step(0, num_envs=3)
    with pytest.raises(ValueError, match=r"'image' has shape \(3, 4, 4, 3\), expected \(2, 4, 4, 3\)"):
        buffer.add(wrong)
    assert len(buffer) == 0


def test_sample_needs_enough_steps():
    buffer = fill(make_buffer(), 3)
    with pytest.raises(ValueError, match=r"sequences of 4 steps.*holds 3 steps \(6 in all"):
        buffer.sample(2, 4)
    with pytest.raises(ValueError, match="capacity 6 per env"):
        fill(buffer, 10).sample(2, 7)


def test_memmap_cuda_combination_is_refused(tmp_path):
    with pytest.raises(ValueError, match="CPU"):
        make_buffer(device="cuda", directory=str(tmp_path))


# -------------------------------------------------------------------------- replay context
def step_code(state: torch.Tensor) -> torch.Tensor:
    """10 * row + env of stored steps, read from their `state`."""
    return 10 * state[..., 0] + state[..., 1]


def latents_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Posteriors that encode the step: deter = step_code everywhere, stoch class = row % classes."""
    deter = step_code(batch["state"])[..., None].expand(*batch["reward"].shape, LATENT[0])
    classes = (batch["state"][..., 0].long() % LATENT[2])[..., None].expand(*batch["reward"].shape, LATENT[1])
    return deter, torch.nn.functional.one_hot(classes, LATENT[2]).float()


def test_context_is_the_written_back_latent_of_the_previous_step():
    buffer = fill(make_buffer(capacity=12, num_envs=2), 9)  # rows 3..8 stored
    gen = torch.Generator().manual_seed(4)
    fresh, _ = buffer.sample(20, 2, gen)
    assert not fresh["deter"].any() and not fresh["stoch"].any(), "nothing written back yet: zeros"
    whole, index = buffer.sample(8, 6, gen)
    buffer.write_latents(index, *latents_of(whole))
    batch, _ = buffer.sample(100, 2, gen)
    has_previous = batch["state"][:, 0, 0] > 3
    assert has_previous.any() and (~has_previous).any()
    previous = step_code(batch["state"][:, 0]) - 10
    expected_deter = torch.where(has_previous, previous, 0.0)[:, None].expand(-1, LATENT[0])
    assert torch.equal(batch["deter"], expected_deter)
    prev_class = (batch["state"][:, 0, 0].long() - 1) % LATENT[2]
    expected_stoch = torch.nn.functional.one_hot(prev_class, LATENT[2]).float()[:, None].expand(-1, LATENT[1], -1)
    assert torch.equal(batch["stoch"], expected_stoch * has_previous[:, None, None])


def test_write_back_round_trip():
    buffer = fill(make_buffer(capacity=40, num_envs=4), 10)
    batch, index = buffer.sample(4, 3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    deter = torch.randn(4, 3, LATENT[0], generator=gen)
    stoch = torch.nn.functional.one_hot(torch.randint(0, LATENT[2], (4, 3, LATENT[1]), generator=gen), LATENT[2]).float()
    buffer.write_latents(index, deter, stoch)
    stored = buffer.arrays["deter"][index.time, index.env[:, None]]
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), deter, rtol=1e-3, atol=1e-3)
    classes = buffer.arrays["stoch"][index.time, index.env[:, None]].long()
    assert torch.equal(torch.nn.functional.one_hot(classes, LATENT[2]).float(), stoch)


def test_write_back_skips_steps_overwritten_since_sampling():
    buffer = fill(make_buffer(capacity=12, num_envs=2), 6)
    batch, index = buffer.sample(4, 6, torch.Generator().manual_seed(7))  # whole streams
    fill(buffer, 2, start=6)  # rows 0 and 1 of the ring now hold steps 6 and 7
    buffer.write_latents(index, *latents_of(batch))
    assert not buffer.arrays["deter"][:2].any()
    assert (buffer.arrays["deter"][2:, :, 0] == step_code(buffer.arrays["state"][2:])).all()


def test_memmap_storage(tmp_path):
    buffer = fill(make_buffer(directory=str(tmp_path / "mm")), 9)
    assert sorted(p.name for p in (tmp_path / "mm").iterdir()) == sorted(f"{k}.npy" for k in buffer.arrays)
    on_disk = np.load(tmp_path / "mm" / "reward.npy", mmap_mode="r")
    assert np.array_equal(on_disk, buffer.arrays["reward"].numpy())
    batch, _ = buffer.sample(3, 4, torch.Generator().manual_seed(0))
    assert (batch["state"][..., 0].diff(dim=1) == 1).all()


# ------------------------------------------------------------------------------ data module
AGENT_SHAPES = {"image": (64, 64, 3), "state": (3,)}


def agent_step(row: int, num_envs: int, action_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(row)
    return {
        "image": rng.integers(0, 256, (num_envs, 64, 64, 3), dtype=np.uint8),
        "state": rng.standard_normal((num_envs, 3)).astype(np.float32),
        "action": rng.uniform(-1, 1, (num_envs, action_dim)).astype(np.float32),
        "reward": rng.standard_normal(num_envs).astype(np.float32),
        "is_first": np.full(num_envs, row % 6 == 0),
        "is_last": np.full(num_envs, row % 6 == 5),
        "is_terminal": np.zeros(num_envs, bool),
    }


def agent_and_data(rows=12) -> tuple[Agent, ReplayDataModule]:
    torch.manual_seed(0)
    agent = Agent(AGENT_SHAPES, 2, objective=Barlow(), size="size1M")
    size = model_size("size1M")
    dm = ReplayDataModule(batch_size=2, sequence_length=8, capacity=64, seed=0)
    latent = (size.deter, size.stoch, size.classes)
    buffer = dm.create_buffer(2, AGENT_SHAPES, 2, latent)
    assert dm.create_buffer(2, AGENT_SHAPES, 2, latent) is buffer
    with pytest.raises(ValueError, match="already created"):
        dm.create_buffer(3, AGENT_SHAPES, 2, latent)
    for row in range(rows):
        buffer.add(agent_step(row, 2, 2))
    return agent, dm


def test_dataloader_batches_train_the_agent_and_take_the_latents_back():
    agent, dm = agent_and_data()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 8, 64, 64, 3) and batch["image"].dtype == torch.uint8
    assert batch["deter"].shape == (2, 512) and batch["stoch"].shape == (2, 32, 4)
    total, _, posterior = agent.losses(batch)
    assert torch.isfinite(total)
    index = batch["replay_index"]
    assert len({(e, t) for e, ts in zip(index.env.tolist(), index.time.tolist()) for t in ts}) == 16, "windows overlap"
    dm.write_back(batch, {"deter": posterior.deter.detach(), "stoch": posterior.stoch.detach()})
    stored = dm.buffer.arrays["stoch"][index.time, index.env[:, None]].long()
    assert torch.equal(stored, posterior.stoch.argmax(-1))
    deter = dm.buffer.arrays["deter"][index.time, index.env[:, None]].float()
    torch.testing.assert_close(deter, posterior.deter.detach(), rtol=1e-3, atol=1e-3)
    assert not dm.sequences.unsettled


def test_each_batch_writes_back_to_its_own_rows_however_far_ahead_it_was_drawn():
    _, dm = agent_and_data()
    batches = iter(dm.train_dataloader())
    next(batches), next(batches)
    third = next(batches)  # two earlier batches are never written back
    latents = latents_like(third)
    latents["deter"] += 3.0
    dm.write_back(third, latents)
    index = third["replay_index"]
    rows = torch.zeros(dm.buffer.arrays["deter"].shape[:2], dtype=torch.bool)
    rows[index.time, index.env[:, None]] = True
    assert (dm.buffer.arrays["deter"][rows] == 3.0).all()
    assert not dm.buffer.arrays["deter"][~rows].any()
    assert not dm.sequences.unsettled, "training on the third batch settles the two before it"


def test_skipped_update_writes_nothing_back():
    _, dm = agent_and_data()
    batch = next(iter(dm.train_dataloader()))
    dm.write_back(batch, {"loss": torch.tensor(float("nan")), "skipped": True})
    assert dm.buffer.arrays["stoch"].eq(255).all() and not dm.buffer.arrays["deter"].any()


def test_dataloader_samples_lazily():
    _, dm = agent_and_data(rows=8)
    batches = iter(dm.train_dataloader())
    assert next(batches)["state"].shape == (2, 8, 3)
    new = torch.as_tensor(agent_step(8, 2, 2)["reward"])
    dm.buffer.add(agent_step(8, 2, 2))
    assert any(torch.isin(next(batches)["reward"][:, -1], new).any() for _ in range(30))


class WriteBack(L.Callback):
    """What the environment callback does after each update; checks it pairs the right batch."""

    def __init__(self):
        self.updates = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dm = trainer.datamodule
        index = batch["replay_index"]
        assert torch.equal(dm.buffer.arrays["reward"][index.time, index.env[:, None]], batch["reward"])
        dm.write_back(batch, outputs)
        self.updates += 1


def test_write_back_pairs_with_the_trained_batch_under_a_trainer():
    agent, dm = agent_and_data()
    callback = WriteBack()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(agent, datamodule=dm)
    assert callback.updates == 2
    assert dm.buffer.arrays["stoch"].ne(255).any()


def test_sampler_state_round_trips_through_the_datamodule():
    _, dm = agent_and_data()
    batches = iter(dm.train_dataloader())
    trained = next(batches)
    prefetched = next(batches)  # Lightning draws the next batch before training on the first
    dm.write_back(trained, latents_like(trained))
    state = dm.state_dict()  # checkpoint after the first update
    _, resumed = agent_and_data()
    resumed.load_state_dict(state)
    got = next(iter(resumed.train_dataloader()))
    assert all(torch.equal(got[k], prefetched[k]) for k in prefetched if k != "replay_index")


def latents_like(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b, t = batch["reward"].shape
    return {"deter": torch.zeros(b, t, *batch["deter"].shape[1:]), "stoch": torch.zeros(b, t, *batch["stoch"].shape[1:])}


# ----------------------------------------------------------------------------- augmentation
def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(*, H, W, C) images moved by (dy, dx): output pixel (i, j) is input pixel (i + dy, j + dx),
    clamped to the image (the border replicates the edge)."""
    height, width = images.shape[-3:-1]
    rows = (torch.arange(height) + dy).clamp(0, height - 1)
    cols = (torch.arange(width) + dx).clamp(0, width - 1)
    return images[..., rows[:, None], cols[None, :], :]


def test_sequence_shift_moves_each_sequence_by_its_own_offset_with_replicated_edges():
    pad = 3
    images = torch.randint(0, 256, (60, 4, 12, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = sequence_shift(images, pad, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, sequence_shift(images, pad, generator=torch.Generator().manual_seed(1)))
    offsets = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)]
    candidates = torch.stack([shifted(images, dy, dx) for dy, dx in offsets])  # (49, 60, 4, H, W, C)
    matches = (candidates == out).flatten(3).all(-1)  # (49, 60, 4): which offsets give each output
    assert (matches.sum(0) == 1).all(), "every output is its input shifted by exactly one offset"
    drawn = matches.int().argmax(0)  # (60, 4)
    assert (drawn == drawn[:, :1]).all(), "one offset for every step of a sequence"
    drawn = [offsets[k] for k in drawn[:, 0].tolist()]
    assert {dy for dy, _ in drawn} == {dx for _, dx in drawn} == set(range(-pad, pad + 1))
    assert len(set(drawn)) > 25, "offsets are drawn per sequence, over the whole square"
    floats = sequence_shift(images.float() / 255, pad, generator=torch.Generator().manual_seed(1))
    assert floats.dtype == torch.float32 and torch.equal(floats, out / 255), "the same shift for any dtype"
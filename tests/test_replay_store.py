"""Replay persistence: chunk files and manifests, written incrementally, loaded exactly, checked
for damage, and cleaned up so the disk holds what the kept checkpoints need."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from datamodules import ReplayBuffer, ReplayFileError, ReplayStore
from tests.test_replay import LATENT, fill, latents_of, make_buffer


def stored_rows(buffer: ReplayBuffer) -> dict[str, torch.Tensor]:
    """The step arrays of the rows the buffer holds, oldest first (latents excluded)."""
    rows = torch.arange(buffer.rows_added - buffer.filled, buffer.rows_added) % buffer.capacity_per_env
    return {k: v[rows].clone() for k, v in buffer.arrays.items() if k not in ("deter", "stoch")}


def assert_rows_equal(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert a.steps_added == b.steps_added
    left, right = stored_rows(a), stored_rows(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def chunk_files(store: ReplayStore) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in store.chunk_dir.glob("*.chunk")}


def test_round_trip_of_a_wrapped_buffer(tmp_path):
    source = fill(make_buffer(capacity=12, num_envs=2), 9)  # 6 rows per env: rows 3..8 kept
    batch, index = source.sample(4, 5, torch.Generator().manual_seed(8))
    source.write_latents(index, *latents_of(batch))
    store = ReplayStore(tmp_path, chunk_rows=4)
    name = store.save(source, "a")
    target = make_buffer(capacity=12, num_envs=2)
    ReplayStore(tmp_path, chunk_rows=4).load(target, name)
    assert_rows_equal(target, source)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert target.sample(3, 4, gen())[0]["reward"].equal(source.sample(3, 4, gen())[0]["reward"])
    # The latents are a cache the agent rewrites: a loaded buffer starts without them.
    assert not target.arrays["deter"].any() and target.arrays["stoch"].eq(255).all()
    # Only the rows a resume needs were written: the newest 6 of 9.
    rows = sorted((int(n.split("-")[0]), int(n.split("-")[1])) for n in chunk_files(store))
    assert rows == [(3, 4), (4, 8), (8, 9)]


def test_a_save_writes_only_what_is_new_and_never_rewrites_a_sealed_chunk(tmp_path):
    buffer = fill(make_buffer(capacity=100, num_envs=2), 10)
    store = ReplayStore(tmp_path, chunk_rows=4)
    store.save(buffer, "a")
    before = chunk_files(store)
    assert sorted(before) == sorted(before) and len(before) == 3  # [0,4) [4,8) sealed, [8,10) tail
    fill(buffer, 3, start=10)
    store.save(buffer, "b")
    after = chunk_files(store)
    new = {n: s for n, s in after.items() if n not in before}
    assert sorted((n.split("-")[0], n.split("-")[1]) for n in new) == [("000000000008", "000000000012"),
                                                                          ("000000000012", "000000000013")]
    for name, stat in before.items():  # sealed chunks untouched: same file, same inode
        if not name.startswith("000000000008-000000000010"):
            assert after[name].st_ino == stat.st_ino and after[name].st_mtime_ns == stat.st_mtime_ns
    manifest = max(store.manifest_dir.glob("*.json"), key=lambda p: p.name)
    assert store.bytes_written == sum(s.st_size for s in new.values()) + manifest.stat().st_size


def test_a_checkpoint_at_100k_rows_writes_only_the_new_rows(tmp_path):
    """At 100k rows, a save after 1000 new rows writes those rows plus at most one chunk's tail."""
    rows, shape = 100_000, (8, 8, 3)
    buffer = ReplayBuffer(200_000, 1, {"image": shape}, 2, LATENT)
    rng = np.random.default_rng(0)
    buffer.arrays["image"][:rows] = torch.from_numpy(rng.integers(0, 256, (rows, 1, *shape), dtype=np.uint8))
    buffer.arrays["reward"][:rows] = torch.from_numpy(rng.standard_normal((rows, 1), dtype=np.float32))
    buffer.steps_added = rows
    store = ReplayStore(tmp_path)  # 1024-row chunks
    store.save(buffer, "first")
    full = store.bytes_written
    on_disk = chunk_files(store)
    fill_rows = 1000
    for row in range(fill_rows):
        buffer.add({"image": np.full((1, *shape), row % 256, np.uint8), "action": np.zeros((1, 2), np.float32),
                    "reward": np.zeros(1, np.float32), "is_first": np.zeros(1, bool), "is_last": np.zeros(1, bool),
                    "is_terminal": np.zeros(1, bool)})
    store.save(buffer, "second")
    new = {n: s for n, s in chunk_files(store).items() if n not in on_disk}
    new_rows = sum(int(n.split("-")[1]) - int(n.split("-")[0]) for n in new)
    per_row = full / rows  # bytes of one row, all arrays (the manifest is negligible at this size)
    tail = rows % 1024  # rows after the last sealed chunk, which the first save left as its tail
    assert new_rows == fill_rows + tail
    assert sum(s.st_size for s in new.values()) < (fill_rows + 1024) * per_row * 1.05
    assert store.bytes_written < full / 40, f"{store.bytes_written} bytes for {fill_rows} new rows; a full save is {full}"
    target = ReplayBuffer(200_000, 1, {"image": shape}, 2, LATENT)
    ReplayStore(tmp_path).load(target, max(p.name for p in store.manifest_dir.glob("*.json")))
    assert_rows_equal(target, buffer)


def test_a_resume_takes_exactly_the_rows_its_checkpoint_covers(tmp_path):
    buffer = fill(make_buffer(capacity=100, num_envs=2), 6)
    store = ReplayStore(tmp_path, chunk_rows=4)
    early = store.save(buffer, "early")
    snapshot = stored_rows(buffer), buffer.steps_added
    fill(buffer, 7, start=6)
    late = store.save(buffer, "late")
    for name, expected_rows in ((early, 6), (late, 13)):
        target = make_buffer(capacity=100, num_envs=2)
        ReplayStore(tmp_path, chunk_rows=4).load(target, name)
        assert target.rows_added == expected_rows
    target = make_buffer(capacity=100, num_envs=2)
    resumed = ReplayStore(tmp_path, chunk_rows=4)
    resumed.load(target, early)
    rows, steps = snapshot
    assert target.steps_added == steps and all(torch.equal(stored_rows(target)[k], v) for k, v in rows.items())
    # Resumed from the early save, the run's history diverges: its new rows get new files.
    fill(target, 3, start=50)
    diverged = resumed.save(target, "diverged")
    check = make_buffer(capacity=100, num_envs=2)
    ReplayStore(tmp_path, chunk_rows=4).load(check, late)
    assert check.rows_added == 13 and check.arrays["reward"][8, 0] == 80  # the late save is intact
    ReplayStore(tmp_path, chunk_rows=4).load(check, diverged)
    assert check.rows_added == 9 and check.arrays["reward"][8, 0] == 520


def test_fifo_capacity_holds_on_disk(tmp_path):
    buffer = make_buffer(capacity=16, num_envs=2)  # 8 rows per env
    store = ReplayStore(tmp_path, chunk_rows=4)
    for row in range(40):
        fill(buffer, 1, start=row)
        if row % 3 == 2:
            store.collect_garbage({store.save(buffer, f"s{row}")})
    spans = sorted((int(n.split("-")[0]), int(n.split("-")[1])) for n in chunk_files(store))
    assert spans[0][0] >= 39 - 8 - 4 and spans[-1][1] == 39, spans
    assert len(list(store.manifest_dir.glob("*.json"))) == 1


def test_garbage_collection_keeps_what_kept_checkpoints_need(tmp_path):
    buffer = fill(make_buffer(capacity=100, num_envs=2), 6)
    store = ReplayStore(tmp_path, chunk_rows=4)
    first = store.save(buffer, "first")
    fill(buffer, 5, start=6)
    second = store.save(buffer, "second")
    fill(buffer, 5, start=11)
    third = store.save(buffer, "third")
    store.collect_garbage({first, third})
    assert sorted(p.name for p in store.manifest_dir.glob("*.json")) == sorted([first, third])
    for name in (first, third):
        ReplayStore(tmp_path, chunk_rows=4).verify(name)
    with pytest.raises(ReplayFileError, match="missing"):
        ReplayStore(tmp_path, chunk_rows=4).verify(second)
    needed = {c["file"] for n in (first, third) for c in store.read_manifest(n)["chunks"]}
    assert set(chunk_files(store)) == needed


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("damage, message", [(corrupt, "corrupted"), (truncate, "corrupted or truncated"),
                                             (os.remove, "missing")])
def test_damaged_chunks_are_refused_and_the_buffer_left_empty(tmp_path, damage, message):
    store = ReplayStore(tmp_path, chunk_rows=4)
    name = store.save(fill(make_buffer(), 9), "a")
    damage(sorted(store.chunk_dir.glob("*.chunk"))[1])
    with pytest.raises(ReplayFileError, match=message):
        ReplayStore(tmp_path).verify(name)
    target = fill(make_buffer(), 4, start=50)
    with pytest.raises(ReplayFileError, match=message):
        ReplayStore(tmp_path, chunk_rows=4).load(target, name)
    assert len(target) == 0


def test_other_configuration_and_missing_manifest_are_refused(tmp_path):
    store = ReplayStore(tmp_path)
    name = store.save(fill(make_buffer(), 9), "a")
    other = ReplayBuffer(12, 2, {"image": (4, 4, 3), "state": (3,)}, 2, LATENT)
    with pytest.raises(ReplayFileError, match="saved with another configuration: observation_shapes"):
        ReplayStore(tmp_path).load(other, name)
    with pytest.raises(ReplayFileError, match="num_envs is 2 in the file but 3"):
        ReplayStore(tmp_path).load(make_buffer(capacity=18, num_envs=3), name)
    with pytest.raises(ReplayFileError, match="missing"):
        ReplayStore(tmp_path).load(make_buffer(), "000000000009-nothing.json")


def test_a_save_that_fails_midway_leaves_earlier_saves_loadable(tmp_path, monkeypatch):
    buffer = fill(make_buffer(capacity=100, num_envs=2), 6)
    store = ReplayStore(tmp_path, chunk_rows=4)
    saved = store.save(buffer, "a")
    fill(buffer, 5, start=6)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save(buffer, "b")
    monkeypatch.setattr(os, "replace", real_replace)
    target = make_buffer(capacity=100, num_envs=2)
    ReplayStore(tmp_path, chunk_rows=4).load(target, saved)
    assert target.rows_added == 6
    store.collect_garbage({saved})
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp-" in p.name]
    assert not leftovers


def test_memory_mapped_buffers_save_and_load(tmp_path):
    source = fill(make_buffer(directory=str(tmp_path / "mm")), 9)
    name = ReplayStore(tmp_path / "saved").save(source, "a")
    target = make_buffer(directory=str(tmp_path / "mm2"))
    ReplayStore(tmp_path / "saved").load(target, name)
    assert_rows_equal(target, source)

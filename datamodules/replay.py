"""Replay buffer and Lightning data module (SPEC §1 "Data").

Steps of `num_envs` parallel environment streams live in ring arrays of shape
(capacity_per_env, num_envs, ...), written one vector-env step (one row) at a time, so every env
stream is stored consecutively along the first axis and the oldest row is overwritten first.
Sequences are sampled uniformly over every window of consecutive steps of one stream; the
posterior latents the agent computes are written back so that a later sequence starts from the
stored latent of the step before it (the "replay context").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

STEP_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal")
LATENT_KEYS = ("deter", "stoch")
NO_LATENT = 255  # stoch class index meaning "nothing written back yet": decodes to all zeros
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK_BYTES = 64 << 20  # copy and hash large arrays in pieces, so memory-mapped buffers fit in RAM


class ReplayFileError(ValueError):
    """A saved replay buffer that cannot be loaded: missing, corrupted or of another configuration."""


class ReplayIndex(NamedTuple):
    """Where a sampled batch lives in the ring, for writing the posteriors back.

    `rows_added` is the buffer's row counter at sampling time: rows overwritten since then hold
    new steps, which must not receive the stale latents.
    """

    env: torch.Tensor  # (B,)
    time: torch.Tensor  # (B, T)
    rows_added: int


def buffer_config(
    capacity: int,
    num_envs: int,
    observation_shapes: Mapping[str, tuple[int, ...]],
    action_dim: int,
    latent_shape: tuple[int, int, int] | None,
) -> dict[str, Any]:
    """The configuration that decides a buffer's array shapes, as plain JSON values."""
    return {
        "capacity_per_env": math.ceil(capacity / num_envs),
        "num_envs": num_envs,
        "observation_shapes": {k: [int(n) for n in v] for k, v in observation_shapes.items()},
        "action_dim": action_dim,
        "latent_shape": [int(n) for n in latent_shape] if latent_shape is not None else None,
    }


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.parent / f".{directory.name}.{suffix}"


def _recover(directory: Path) -> None:
    """Finish a save that crashed between moving the old copy aside and moving the new one in:
    the previous copy is put back, and a leftover one next to a complete save is deleted."""
    previous = _sibling(directory, "previous")
    if previous.exists():
        if directory.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, directory)


class ReplayBuffer:
    """FIFO replay of `num_envs` parallel environment streams.

    Args:
        capacity: total steps kept (all envs); each env keeps ceil(capacity / num_envs).
        num_envs: parallel streams; `add` takes one step of each.
        observation_shapes: observation key -> shape; rank-3 (H, W, C) shapes are uint8 images,
            the others float32 vectors.
        action_dim: action width (one-hot width for discrete actions).
        latent_shape: (deter, stoch, classes) of the agent's posterior, to store the replay
            context; None stores none.
        device: "cpu" or "cuda": where the arrays live and sampling happens.
        directory: keep the arrays as .npy memory-maps in this directory (CPU only), for
            capacities larger than RAM.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        observation_shapes: Mapping[str, tuple[int, ...]],
        action_dim: int,
        latent_shape: tuple[int, int, int] | None = None,
        device: str = "cpu",
        directory: str | None = None,
    ):
        if capacity < 1 or num_envs < 1 or action_dim < 1:
            raise ValueError(f"capacity, num_envs and action_dim must be positive, got {capacity}, {num_envs}, {action_dim}")
        self.device = torch.device(device)
        if directory is not None and self.device.type != "cpu":
            raise ValueError(f"memory-mapped replay (directory={directory!r}) lives on the CPU, not on {device!r}")
        self.num_envs = num_envs
        self.capacity_per_env = math.ceil(capacity / num_envs)
        self.observation_shapes = {k: tuple(int(n) for n in v) for k, v in observation_shapes.items()}
        self.action_dim = action_dim
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.directory = Path(directory) if directory is not None else None
        self._check_keys()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = self._layout()
        self.arrays = {name: self._allocate(name, shape, dtype) for name, (shape, dtype) in self.layout.items()}
        self.steps_added = 0

    # ------------------------------------------------------------------------ configuration
    def _check_keys(self) -> None:
        """Observation keys become file names and batch keys: they must not clash with either."""
        for key in self.observation_shapes:
            if key in STEP_KEYS or key in LATENT_KEYS or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", key):
                raise ValueError(f"observation key {key!r} is reserved or not a plain file name")
        if self.latent_shape is not None and self.latent_shape[2] >= NO_LATENT:
            raise ValueError(f"at most {NO_LATENT - 1} latent classes fit the uint8 store, got {self.latent_shape[2]}")

    def _layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-step shape and storage dtype of every array."""
        layout = {k: (s, torch.uint8 if len(s) == 3 else torch.float32) for k, s in self.observation_shapes.items()}
        layout["action"] = ((self.action_dim,), torch.float32)
        layout["reward"] = ((), torch.float32)
        layout.update({k: ((), torch.bool) for k in ("is_first", "is_last", "is_terminal")})
        if self.latent_shape is not None:
            deter, stoch, _ = self.latent_shape
            layout["deter"] = ((deter,), torch.float16)  # half precision: the largest per-step array
            layout["stoch"] = ((stoch,), torch.uint8)  # class indices instead of one-hot
        return layout

    @property
    def config(self) -> dict[str, Any]:
        """What a saved buffer must share with this one to be loaded into it."""
        return buffer_config(
            self.capacity_per_env * self.num_envs, self.num_envs, self.observation_shapes, self.action_dim, self.latent_shape
        )

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        full = (self.capacity_per_env, self.num_envs, *shape)
        fill = NO_LATENT if name == "stoch" else 0
        if self.directory is None:
            return torch.full(full, fill, dtype=dtype, device=self.device)
        array = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=_numpy_dtype(dtype), shape=full)
        if fill:  # a new memory-map is already zeros
            array[...] = fill
        return torch.from_numpy(array)

    # -------------------------------------------------------------------------------- state
    @property
    def rows_added(self) -> int:
        return self.steps_added // self.num_envs

    @property
    def position(self) -> int:
        """Ring row the next step is written to."""
        return self.rows_added % self.capacity_per_env

    @property
    def filled(self) -> int:
        """Steps stored per env."""
        return min(self.rows_added, self.capacity_per_env)

    def __len__(self) -> int:
        return self.filled * self.num_envs

    def state_dict(self) -> dict[str, int]:
        return {"steps_added": self.steps_added, "position": self.position, "filled": self.filled}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.steps_added = self._checked_steps(state)

    def _checked_steps(self, state: Mapping[str, int]) -> int:
        """`steps_added` of a state; position and fill level follow from it and are checked."""
        steps = int(state["steps_added"])
        if steps < 0 or steps % self.num_envs:
            raise ValueError(f"steps_added {steps} is not a whole number of {self.num_envs}-env steps")
        rows = steps // self.num_envs
        expected = {"position": rows % self.capacity_per_env, "filled": min(rows, self.capacity_per_env)}
        wrong = {k: state[k] for k, v in expected.items() if k in state and int(state[k]) != v}
        if wrong:
            raise ValueError(f"replay state {wrong} disagrees with steps_added {steps} (expected {expected})")
        return steps

    # ------------------------------------------------------------------------------- adding
    def add(self, step: Mapping[str, Any]) -> None:
        """Store one vector-env step: every key with a leading num_envs axis. `action` is the
        action that led to this observation; it is zeroed where `is_first`."""
        row = {}
        for name, (shape, dtype) in self.layout.items():
            if name in LATENT_KEYS:
                continue
            if name not in step:
                raise ValueError(f"replay step is missing key {name!r} (expected shape {(self.num_envs, *shape)})")
            value = torch.as_tensor(step[name])
            if tuple(value.shape) != (self.num_envs, *shape):
                raise ValueError(
                    f"replay step key {name!r} has shape {tuple(value.shape)}, expected {(self.num_envs, *shape)}"
                )
            row[name] = value.to(self.device, dtype)
        row["action"] = row["action"] * ~row["is_first"][:, None]
        pos = self.position
        for name, value in row.items():
            self.arrays[name][pos] = value
        if self.latent_shape is not None:  # the slot's old latent belonged to the overwritten step
            self.arrays["deter"][pos] = 0
            self.arrays["stoch"][pos] = NO_LATENT
        self.steps_added += self.num_envs

    # ----------------------------------------------------------------------------- sampling
    def sample(
        self, batch: int, length: int, generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], ReplayIndex]:
        """A (batch, length) batch, uniform over every window of `length` consecutive stored
        steps of one env stream (never across the write head; across episodes is fine), with
        the stored latent of the step before each window as `deter`/`stoch`."""
        windows = self.filled - length + 1
        if length < 1 or windows < 1:
            raise ValueError(
                f"cannot sample sequences of {length} steps: each of the {self.num_envs} env streams holds "
                f"{self.filled} steps ({len(self)} in all, capacity {self.capacity_per_env} per env)"
            )
        pick = torch.randint(0, windows * self.num_envs, (batch,), generator=generator).to(self.device)
        env, offset = pick % self.num_envs, pick // self.num_envs
        oldest = (self.position - self.filled) % self.capacity_per_env
        start = oldest + offset
        time = (start[:, None] + torch.arange(length, device=self.device)) % self.capacity_per_env
        out = {name: self.arrays[name][time, env[:, None]] for name in self.layout if name not in LATENT_KEYS}
        if self.latent_shape is not None:
            out.update(self._context(env, (start - 1) % self.capacity_per_env, has_previous=offset > 0))
        return out, ReplayIndex(env, time, self.rows_added)

    def _context(self, env: torch.Tensor, time: torch.Tensor, has_previous: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent of the step before each window: zeros where that step is no longer stored
        (its slot holds the newest step) or has no latent written back yet."""
        classes = self.latent_shape[2]
        deter = self.arrays["deter"][time, env].float() * has_previous[:, None]
        index = torch.where(has_previous[:, None], self.arrays["stoch"][time, env].long(), NO_LATENT)
        stoch = F.one_hot(index.clamp(max=classes), classes + 1)[..., :classes].float()
        return {"deter": deter, "stoch": stoch}

    def write_latents(self, index: ReplayIndex, deter: torch.Tensor, stoch: torch.Tensor) -> None:
        """Store the posteriors (B, T, D) and one-hot (B, T, S, C) of a sampled batch, except in
        rows that were overwritten by newer steps since it was sampled."""
        if self.latent_shape is None:
            raise ValueError("this replay buffer stores no latents (latent_shape=None)")
        deter_dim, stoch_dim, classes = self.latent_shape
        b, t = index.time.shape
        if tuple(deter.shape) != (b, t, deter_dim) or tuple(stoch.shape) != (b, t, stoch_dim, classes):
            raise ValueError(
                f"latents of shape deter {tuple(deter.shape)}, stoch {tuple(stoch.shape)} do not fit the sampled "
                f"index ({b}, {t}) and latent shape {self.latent_shape}"
            )
        age = (self.position - 1 - index.time) % self.capacity_per_env  # rows written after each slot
        keep = age >= min(self.rows_added - index.rows_added, self.capacity_per_env)
        time, env = index.time[keep], index.env[:, None].expand(b, t)[keep]
        keep = keep.to(deter.device)
        self.arrays["deter"][time, env] = deter.detach()[keep].to(self.device, torch.float16)
        self.arrays["stoch"][time, env] = stoch.detach()[keep].argmax(-1).to(self.device, torch.uint8)

    # ----------------------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike) -> None:
        """Write the filled rows of every array as .npy plus `manifest.json` (shapes, dtypes,
        counters, sha256): a 1M-step buffer holding 5k steps writes 5k rows.

        Atomic: everything goes to a temporary sibling directory that then replaces the old
        save, so a crash at any point leaves the previous save loadable.
        """
        directory = Path(directory).absolute()
        if self.directory is not None and self.directory.absolute() == directory:
            raise ValueError(f"cannot save a memory-mapped buffer over its own directory {directory}")
        directory.parent.mkdir(parents=True, exist_ok=True)
        _recover(directory)
        if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
            raise ValueError(f"{directory} is not a saved replay buffer; refusing to replace it")
        temporary = _sibling(directory, "saving")
        if temporary.exists():
            shutil.rmtree(temporary)  # the remains of a save that crashed while writing
        temporary.mkdir()
        entries = {name: self._save_array(temporary, name, array[: self.filled]) for name, array in self.arrays.items()}
        manifest = {"format": FORMAT_VERSION, "config": self.config, "state": self.state_dict(), "arrays": entries}
        with open(temporary / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(temporary)
        previous = _sibling(directory, "previous")
        if directory.exists():
            os.replace(directory, previous)
        os.replace(temporary, directory)
        _fsync_dir(directory.parent)
        if previous.exists():
            shutil.rmtree(previous)

    @staticmethod
    def _save_array(directory: Path, name: str, array: torch.Tensor) -> dict[str, Any]:
        path = directory / f"{name}.npy"
        data = array.cpu().numpy()  # no copy for CPU and memory-mapped arrays
        with open(path, "wb") as f:
            np.save(f, data)
            f.flush()
            os.fsync(f.fileno())
        return {"file": path.name, "shape": list(data.shape), "dtype": data.dtype.str, "sha256": _sha256(path)}

    def load(self, directory: str | os.PathLike) -> None:
        """Load a save of a buffer with the same configuration, after verifying every file;
        on any problem raise ReplayFileError and leave this buffer as it was."""
        directory = Path(directory).absolute()
        _recover(directory)
        manifest = self._read_manifest(directory)
        try:
            steps = self._checked_steps(manifest["state"])
        except (KeyError, TypeError, ValueError) as error:
            raise ReplayFileError(f"{directory / MANIFEST}: bad counters {manifest.get('state')!r}: {error}") from None
        rows = min(steps // self.num_envs, self.capacity_per_env)  # the filled rows that were saved
        sources = {name: self._verified(directory, name, manifest["arrays"].get(name), rows) for name in self.arrays}
        for name, source in sources.items():
            self._copy_into(self.arrays[name], source)
        self.steps_added = steps

    def _read_manifest(self, directory: Path) -> dict[str, Any]:
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise ReplayFileError(f"{path}: missing, {directory} holds no saved replay buffer") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ReplayFileError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "arrays" not in manifest:
            raise ReplayFileError(f"{path}: not a replay manifest of format {FORMAT_VERSION}")
        saved = manifest.get("config")
        saved = saved if isinstance(saved, dict) else {}
        different = {k: (saved.get(k), v) for k, v in self.config.items() if saved.get(k) != v}
        if different:
            details = ", ".join(f"{k} is {old} in the file but {new} in this buffer" for k, (old, new) in different.items())
            raise ReplayFileError(f"{path}: saved with another configuration: {details}")
        return manifest

    def _verified(self, directory: Path, name: str, entry: Mapping[str, Any] | None, rows: int) -> np.ndarray:
        """The saved array `name` (its first `rows` rows), read-only and memory-mapped, once its
        file matches the manifest (checksum) and the manifest matches this buffer (shape, dtype)."""
        array = self.arrays[name]
        shape, dtype = [rows, *array.shape[1:]], _numpy_dtype(array.dtype).str
        if entry is None:
            raise ReplayFileError(f"{directory / MANIFEST}: lists no array {name!r}")
        path = directory / str(entry.get("file", ""))
        if entry.get("shape") != shape or entry.get("dtype") != dtype:
            raise ReplayFileError(
                f"{path}: shape {entry.get('shape')} {entry.get('dtype')} does not fit this buffer's {shape} {dtype}"
            )
        if not path.is_file():
            raise ReplayFileError(f"{path}: missing")
        if _sha256(path) != entry.get("sha256"):
            raise ReplayFileError(f"{path}: corrupted or truncated (sha256 differs from the manifest)")
        try:
            data = np.load(path, mmap_mode="r")
        except ValueError as error:
            raise ReplayFileError(f"{path}: unreadable .npy ({error})") from None
        if list(data.shape) != shape or data.dtype.str != dtype:
            raise ReplayFileError(f"{path}: holds {list(data.shape)} {data.dtype.str}, the manifest says {shape} {dtype}")
        return data

    @staticmethod
    def _copy_into(target: torch.Tensor, source: np.ndarray) -> None:
        rows = max(1, _CHUNK_BYTES // max(1, source[:1].nbytes))
        for i in range(0, source.shape[0], rows):
            end = min(i + rows, source.shape[0])  # the source may hold fewer rows than the target
            target[i:end] = torch.from_numpy(np.array(source[i:end])).to(target.device)


class ReplaySequences(IterableDataset):
    """Endless batches sampled from the data module's buffer when asked for, so that steps
    added meanwhile are visible.

    Lightning fetches one batch ahead of the one being trained on, so handed-out batches wait
    in order in `pending` (their index, and the generator state they were drawn from) until
    `ReplayDataModule.write_back` takes the oldest.
    """

    def __init__(self, datamodule: "ReplayDataModule", max_pending: int = 8):
        self.datamodule = datamodule
        self.pending: deque[tuple[ReplayIndex, torch.Tensor]] = deque(maxlen=max_pending)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dm = self.datamodule
        while True:
            state = dm.generator.get_state()
            batch, index = dm.buffer_or_raise().sample(dm.batch_size, dm.sequence_length, dm.generator)
            self.pending.append((index, state))
            yield batch


class ReplayDataModule(L.LightningDataModule):
    """Replayed (B, T) sequences for the agent. It knows no environment: the environment
    callback calls `create_buffer` once the spaces are known and adds steps to `buffer`, and
    calls `write_back` with each training_step's outputs.

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

    def write_back(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """Store the posteriors of training_step's `outputs` (keys deter, stoch) at the
        positions of the batch they were computed from (the oldest pending one)."""
        if self.sequences is None or not self.sequences.pending:
            raise RuntimeError("write_back without a sampled batch to write to")
        index, _ = self.sequences.pending.popleft()
        self.buffer_or_raise().write_latents(index, outputs["deter"], outputs["stoch"])

    def state_dict(self) -> dict[str, Any]:
        """The sampler state before the oldest batch not yet trained on (Lightning's prefetched
        one), so that a resumed run draws it again instead of skipping it."""
        pending = self.sequences.pending if self.sequences is not None else None
        return {"generator": (pending[0][1] if pending else self.generator.get_state()).clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self._rank_seeded = True

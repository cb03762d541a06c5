"""The replay buffer: FIFO storage of environment steps and uniform sequence sampling (docs/algorithm.md §1 "Data").

Steps of `num_envs` parallel environment streams live in ring arrays of shape
(capacity_per_env, num_envs, ...), written one vector-env step (one row) at a time, so every env
stream is stored consecutively along the first axis and the oldest row is overwritten first.
Sequences are sampled uniformly over every window of consecutive steps of one stream; the
posterior latents the agent computes are written back so that a later sequence starts from the
stored latent of the step before it (the "replay context").

The arrays live on the CPU or on a CUDA device. On CUDA, sampling gathers the batch on the device
and the latents are written back there, without a host sync; on the CPU, a batch for a CUDA
model is gathered into pinned memory (`sample(pin_memory=True)`) and latents coming from a CUDA
device are copied back without blocking and stored at the next `add` or write-back
(`write_latents`). Only the device differs: the code is the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

STEP_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal")
LATENT_KEYS = ("deter", "stoch")
NO_LATENT = 255  # stoch class index meaning "nothing written back yet": decodes to all zeros


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
    serial: int = 0  # the batch's number in its sample stream


def array_layout(
    observation_shapes: Mapping[str, tuple[int, ...]], action_dim: int, latent_shape: tuple[int, int, int] | None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-step shape and storage dtype of every array: rank-3 (H, W, C) observations are uint8
    images, the other observations float32 vectors."""
    layout = {k: (tuple(s), torch.uint8 if len(s) == 3 else torch.float32) for k, s in observation_shapes.items()}
    layout["action"] = ((action_dim,), torch.float32)
    layout["reward"] = ((), torch.float32)
    layout.update({k: ((), torch.bool) for k in ("is_first", "is_last", "is_terminal")})
    if latent_shape is not None:
        deter, stoch, _ = latent_shape
        layout["deter"] = ((deter,), torch.float16)  # half precision: the largest per-step array
        layout["stoch"] = ((stoch,), torch.uint8)  # class indices instead of one-hot
    return layout


def buffer_nbytes(config: Mapping[str, Any]) -> int:
    """Bytes the arrays of a buffer of this `buffer_config` take."""
    layout = array_layout(config["observation_shapes"], config["action_dim"], config["latent_shape"])
    per_step = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    return per_step * config["capacity_per_env"] * config["num_envs"]


def per_env_capacity(capacity: int, num_envs: int) -> int:
    """Steps each env stream keeps of a buffer of `capacity` steps in all."""
    return math.ceil(capacity / num_envs)


def buffer_config(
    capacity: int,
    num_envs: int,
    observation_shapes: Mapping[str, tuple[int, ...]],
    action_dim: int,
    latent_shape: tuple[int, int, int] | None,
) -> dict[str, Any]:
    """The configuration that decides a buffer's array shapes, as plain JSON values."""
    return {
        "capacity_per_env": per_env_capacity(capacity, num_envs),
        "num_envs": num_envs,
        "observation_shapes": {k: [int(n) for n in v] for k, v in observation_shapes.items()},
        "action_dim": action_dim,
        "latent_shape": [int(n) for n in latent_shape] if latent_shape is not None else None,
    }


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
        device: where the arrays live and sampling happens: "cpu", "cuda" or "cuda:<i>".
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
        if self.device.type == "cuda" and self.device.index is None:  # compared with the latents' device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_envs = num_envs
        self.capacity_per_env = per_env_capacity(capacity, num_envs)
        self.observation_shapes = {k: tuple(int(n) for n in v) for k, v in observation_shapes.items()}
        self.action_dim = action_dim
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.directory = Path(directory) if directory is not None else None
        self._check_keys()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = array_layout(self.observation_shapes, self.action_dim, self.latent_shape)
        self.arrays = {name: self._allocate(name, shape, dtype) for name, (shape, dtype) in self.layout.items()}
        self.steps_added = 0
        # A write-back of latents from another device, on its way to host memory: (index, deter
        # float16, stoch class indices, CUDA event recorded after the copy, or None).
        self.pending: tuple[ReplayIndex, torch.Tensor, torch.Tensor, Any] | None = None

    # ------------------------------------------------------------------------ configuration
    def _check_keys(self) -> None:
        """Observation keys become file names and batch keys: they must not clash with either."""
        for key in self.observation_shapes:
            if key in STEP_KEYS or key in LATENT_KEYS or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", key):
                raise ValueError(f"observation key {key!r} is reserved or not a plain file name")
        if self.latent_shape is not None and self.latent_shape[2] >= NO_LATENT:
            raise ValueError(f"at most {NO_LATENT - 1} latent classes fit the uint8 store, got {self.latent_shape[2]}")

    @property
    def nbytes(self) -> int:
        """Bytes the arrays take."""
        return buffer_nbytes(self.config)

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
        numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
        array = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=numpy_dtype, shape=full)
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

    def clear(self) -> None:
        """Forget every step (the arrays keep their contents until overwritten, latents excepted)."""
        self.steps_added = 0
        self.pending = None
        if self.latent_shape is not None:
            self.arrays["deter"].zero_()
            self.arrays["stoch"].fill_(NO_LATENT)

    # ------------------------------------------------------------------------------- adding
    def add(self, step: Mapping[str, Any]) -> None:
        """Store one vector-env step: every key with a leading num_envs axis. `action` is the
        action that led to this observation and `reward` what it earned; both are stored as zero
        where `is_first`, as no step leads to an episode's first observation (the writer's values
        there, e.g. the action a NEXT_STEP autoreset ignored, are dropped)."""
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
            row[name] = self._to_storage(value.to(dtype))
        self.flush_latents()  # a pending write-back must see the rows as they were before this one
        first = row["is_first"]
        row["action"] = torch.where(first[:, None], 0.0, row["action"])
        row["reward"] = torch.where(first, 0.0, row["reward"])
        pos = self.position
        for name, value in row.items():
            self.arrays[name][pos] = value
        if self.latent_shape is not None:  # the slot's old latent belonged to the overwritten step
            self.arrays["deter"][pos] = 0
            self.arrays["stoch"][pos] = NO_LATENT
        self.steps_added += self.num_envs

    def _to_storage(self, value: torch.Tensor) -> torch.Tensor:
        """A host tensor on the storage device; to CUDA from pinned memory, not blocking the host."""
        if self.device.type == "cpu":
            return value
        return value.pin_memory().to(self.device, non_blocking=True)

    # ----------------------------------------------------------------------------- sampling
    def sample(
        self, batch: int, length: int, generator: torch.Generator | None = None, pin_memory: bool = False
    ) -> tuple[dict[str, torch.Tensor], ReplayIndex]:
        """A (batch, length) batch, uniform over every window of `length` consecutive stored
        steps of one env stream (never across the write head; across episodes is fine), with
        the stored latent of the step before each window as `deter`/`stoch`.

        The batch is on the storage device; `pin_memory` (CPU storage only) gathers it into
        pinned memory, for a non-blocking copy to a CUDA device. The index is on the storage
        device. `generator` is a CPU generator, whatever the storage device."""
        windows = self.filled - length + 1
        if length < 1 or windows < 1:
            raise ValueError(
                f"cannot sample sequences of {length} steps: each of the {self.num_envs} env streams holds "
                f"{self.filled} steps ({len(self)} in all, capacity {self.capacity_per_env} per env)"
            )
        pick = self._to_storage(torch.randint(0, windows * self.num_envs, (batch,), generator=generator))
        env, offset = pick % self.num_envs, pick // self.num_envs
        oldest = (self.position - self.filled) % self.capacity_per_env
        start = oldest + offset
        time = (start[:, None] + torch.arange(length, device=self.device)) % self.capacity_per_env
        flat = (time * self.num_envs + env[:, None]).reshape(-1)  # rows of the (capacity_per_env * num_envs, ...) view
        out = {name: self._gather(name, flat, (batch, length), pin_memory) for name in self.layout if name not in LATENT_KEYS}
        if self.latent_shape is not None:
            context = self._context(env, (start - 1) % self.capacity_per_env, has_previous=offset > 0)
            out.update({k: v.pin_memory() if pin_memory else v for k, v in context.items()})
        return out, ReplayIndex(env, time, self.rows_added)

    def _gather(self, name: str, flat: torch.Tensor, lead: tuple[int, ...], pin_memory: bool) -> torch.Tensor:
        """Steps `flat` of array `name`, gathered straight into a new (pinned) tensor of shape (*lead, ...)."""
        array = self.arrays[name]
        step_shape = array.shape[2:]
        out = torch.empty((flat.numel(), *step_shape), dtype=array.dtype, device=array.device, pin_memory=pin_memory)
        torch.index_select(array.view(-1, *step_shape), 0, flat, out=out)
        return out.view(*lead, *step_shape)

    def _context(self, env: torch.Tensor, time: torch.Tensor, has_previous: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent of the step before each window: zeros where that step is no longer stored
        (its slot holds the newest step) or has no latent written back yet."""
        classes = self.latent_shape[2]
        deter = self.arrays["deter"][time, env].float() * has_previous[:, None]
        index = torch.where(has_previous[:, None], self.arrays["stoch"][time, env].long(), NO_LATENT)
        stoch = (index[..., None] == torch.arange(classes, device=index.device)).float()  # NO_LATENT: all zeros
        return {"deter": deter, "stoch": stoch}

    def write_latents(
        self, index: ReplayIndex, deter: torch.Tensor, stoch: torch.Tensor, taken: torch.Tensor | None = None
    ) -> None:
        """Store the posteriors (B, T, D) and one-hot (B, T, S, C) of a sampled batch, except in
        rows that were overwritten by newer steps since it was sampled, and nowhere when `taken`
        (a 0-d bool tensor: the update was not skipped for a non-finite value) is false.

        Latents on the storage device are written at once, by index and without a host sync.
        Latents of a CUDA model for a CPU buffer are copied to pinned memory without blocking
        and stored at the next `add`, `write_latents` or `flush_latents`, against the rows as
        they are then; until then, samples see the latents written before."""
        if self.latent_shape is None:
            raise ValueError("this replay buffer stores no latents (latent_shape=None)")
        deter_dim, stoch_dim, classes = self.latent_shape
        b, t = index.time.shape
        if tuple(deter.shape) != (b, t, deter_dim) or tuple(stoch.shape) != (b, t, stoch_dim, classes):
            raise ValueError(
                f"latents of shape deter {tuple(deter.shape)}, stoch {tuple(stoch.shape)} do not fit the sampled "
                f"index ({b}, {t}) and latent shape {self.latent_shape}"
            )
        deter, stoch = deter.detach().to(torch.float16), stoch.detach().argmax(-1).to(torch.uint8)
        taken = torch.ones((), dtype=torch.bool, device=deter.device) if taken is None else taken
        self.flush_latents()
        if deter.device == self.device:
            self._store_latents(index, deter, stoch, taken)
            return
        if self.device.type != "cpu" or deter.device.type != "cuda":  # not a path training takes
            self._store_latents(index, deter.to(self.device), stoch.to(self.device), taken.to(self.device))
            return
        host = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True) for x in (deter, stoch, taken)]
        event = torch.cuda.Event()
        event.record()
        self.stage_latents(index, *host, ready=event)

    def stage_latents(
        self, index: ReplayIndex, deter: torch.Tensor, stoch: torch.Tensor, taken: torch.Tensor | None = None, ready=None
    ) -> None:
        """Keep host latents (float16 deter, uint8 stoch classes, the update's `taken` flag) to
        store at the next flush, once `ready` (a CUDA event, or None) has completed."""
        self.flush_latents()
        taken = torch.ones((), dtype=torch.bool) if taken is None else taken
        self.pending = (index, deter, stoch, taken, ready)

    def flush_latents(self) -> None:
        """Store the pending write-back, if any (waits for its copy from the device)."""
        if self.pending is None:
            return
        index, deter, stoch, taken, ready = self.pending
        self.pending = None
        if ready is not None:
            ready.synchronize()
        self._store_latents(index, deter, stoch, taken)

    def _store_latents(self, index: ReplayIndex, deter: torch.Tensor, stoch: torch.Tensor, taken: torch.Tensor) -> None:
        """deter (B, T, D) float16 and stoch (B, T, S) uint8 classes on the storage device, into
        the rows of `index` not overwritten since it was sampled. A where, not a mask: no
        host sync (windows may overlap, and then share their rows' fate)."""
        time = index.time.to(self.device)
        env = index.env.to(self.device)[:, None].expand_as(time)
        age = (self.position - 1 - time) % self.capacity_per_env  # rows written after each slot
        keep = (age >= min(self.rows_added - index.rows_added, self.capacity_per_env)) & taken
        for name, value in (("deter", deter), ("stoch", stoch)):
            array = self.arrays[name]
            mask = keep.view(*keep.shape, *[1] * (value.dim() - 2))
            array[time, env] = torch.where(mask, value, array[time, env])

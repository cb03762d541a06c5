"""The replay buffer: FIFO storage of environment steps and uniform sequence sampling (docs/algorithm.md §1 "Data").

Steps of `num_envs` parallel environment streams live in ring arrays of shape
(capacity_per_env, num_envs, ...), written one vector-env step (one row) at a time, so every env
stream is stored consecutively along the first axis and the oldest row is overwritten first.
Sequences are sampled uniformly over every window of consecutive steps of one stream; the
posterior latents the agent computes are written back so that a later sequence starts from the
stored latent of the step before it (the "replay context").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

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
        self.capacity_per_env = per_env_capacity(capacity, num_envs)
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
            row[name] = value.to(self.device, dtype)
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

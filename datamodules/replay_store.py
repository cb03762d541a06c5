"""Replay persistence: append-only chunk files and one small manifest per checkpoint.

A checkpoint must find exactly the replay it was saved with, and saving must cost what is new,
not the whole buffer (1M DMC steps are 12 GB). So, as danijar/dreamerv3 does with its chunk files:

- Rows (one vector-env step of every env) go to immutable chunk files of at most `chunk_rows`
  rows, named `<first row>-<end row>-<sha256 prefix>.chunk`. A chunk that reaches a multiple of
  `chunk_rows` is sealed and never written again; the rows after the last sealed chunk (the
  tail) are written anew at each save. A save writes the new rows plus at most one tail.
- A save writes `manifests/<rows>-<save id>.json`: the buffer configuration, how many rows the
  save covers, and the chunks (with checksums) holding the rows a resume needs, the newest
  `capacity_per_env` of them. The checkpoint stores the manifest's name. Files are written
  atomically, so a kill leaves every earlier manifest and its chunks intact, and files of a
  save whose checkpoint never got written are merely unreferenced.
- `collect_garbage` deletes the manifests no kept checkpoint names and the chunks none of the kept
  manifests lists, so the disk holds what the kept checkpoints need and no more.

Chunk files are `.npy` records of the step arrays written one after another (numpy reads them
back in the same order). The replay-context latents are not saved: they are a cache that the
agent rewrites on every update, and a resumed buffer starts without them, as new steps do.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from datamodules.replay_buffer import LATENT_KEYS, ReplayBuffer, ReplayFileError
from wm.run.files import atomic_write, remove_temporaries

FORMAT_VERSION = 2
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Chunk:
    """One chunk file: rows [start, end) of every env stream."""

    file: str
    start: int
    end: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "end": self.end, "sha256": self.sha256}


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.digest, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.bytes += len(view)
        return self.f.write(view)


def new_save_id() -> str:
    return uuid.uuid4().hex[:12]


class ReplayStore:
    """The saved replay of one buffer (one rank) in `directory`.

    It remembers the sealed chunks it wrote or loaded, so the next save writes only what came since.
    """

    def __init__(self, directory: str | os.PathLike, chunk_rows: int = CHUNK_ROWS):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.directory = Path(directory)
        self.chunk_rows = chunk_rows
        self.sealed: list[Chunk] = []  # consecutive sealed chunks of this run's history
        self.bytes_written = 0  # by the last save, chunks and manifest

    @property
    def chunk_dir(self) -> Path:
        return self.directory / "chunks"

    @property
    def manifest_dir(self) -> Path:
        return self.directory / "manifests"

    # ------------------------------------------------------------------------------- saving
    def save(self, buffer: ReplayBuffer, save_id: str) -> str:
        """Write the rows not yet on disk and a manifest for the buffer as it is now; returns
        the manifest's name, which the checkpoint keeps."""
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        self.bytes_written = 0
        rows = buffer.rows_added
        needed_from = max(0, rows - buffer.capacity_per_env)
        self.sealed = [c for c in self.sealed if c.end > needed_from]
        start = max(self.sealed[-1].end if self.sealed else 0, needed_from)
        tail = None
        while start < rows:
            end = min((start // self.chunk_rows + 1) * self.chunk_rows, rows)
            chunk = self._write_chunk(buffer, start, end)
            if end % self.chunk_rows == 0:
                self.sealed.append(chunk)
            else:
                tail = chunk
            start = end
        chunks = self.sealed + ([tail] if tail is not None else [])
        manifest = {
            "format": FORMAT_VERSION,
            "config": buffer.config,
            "rows": rows,
            "keys": _stored_keys(buffer),
            "chunks": [c.as_json() for c in chunks],
        }
        name = f"{rows:012d}-{save_id}.json"
        data = json.dumps(manifest, indent=1).encode()
        atomic_write(self.manifest_dir / name, lambda f: f.write(data))
        self.bytes_written += len(data)
        return name

    def _write_chunk(self, buffer: ReplayBuffer, start: int, end: int) -> Chunk:
        positions = torch.arange(start, end) % buffer.capacity_per_env
        writer: _HashingWriter | None = None

        def write(f: BinaryIO) -> None:
            nonlocal writer
            writer = _HashingWriter(f)
            for key in _stored_keys(buffer):
                np.save(writer, buffer.arrays[key][positions.to(buffer.device)].cpu().numpy(), allow_pickle=False)

        def final() -> Path:
            return self.chunk_dir / f"{start:012d}-{end:012d}-{writer.digest.hexdigest()[:16]}.chunk"

        path = atomic_write(self.chunk_dir / f"{start:012d}-{end:012d}.chunk", write, final)
        self.bytes_written += writer.bytes
        return Chunk(path.name, start, end, writer.digest.hexdigest())

    # ------------------------------------------------------------------------------ loading
    def verify(self, manifest_name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check a manifest and every chunk it lists (present, checksum); returns the manifest.
        Reads every chunk once: this is the check a resume runs before touching anything."""
        manifest = self.read_manifest(manifest_name, config)
        for chunk in self._chunks(manifest):
            self._read_verified(chunk)
        return manifest

    def load(self, buffer: ReplayBuffer, manifest_name: str) -> None:
        """Fill an empty buffer with the rows the manifest covers. On a damaged or missing file
        raise ReplayFileError, and leave the buffer empty."""
        manifest = self.read_manifest(manifest_name, buffer.config)
        rows = manifest["rows"]
        needed_from = max(0, rows - buffer.capacity_per_env)
        keys = _stored_keys(buffer)
        if manifest.get("keys") != keys:
            raise ReplayFileError(f"{self.manifest_dir / manifest_name}: stores {manifest.get('keys')}, not {keys}")
        buffer.clear()
        try:
            for chunk in self._chunks(manifest):
                arrays = self._parse(chunk, self._read_verified(chunk), buffer)
                first = max(chunk.start, needed_from)
                positions = (torch.arange(first, chunk.end) % buffer.capacity_per_env).to(buffer.device)
                for key, array in arrays.items():
                    buffer.arrays[key][positions] = torch.from_numpy(array[first - chunk.start:]).to(buffer.device)
        except BaseException:
            buffer.clear()
            raise
        buffer.steps_added = rows * buffer.num_envs
        self.sealed = [c for c in self._chunks(manifest) if c.end % self.chunk_rows == 0]

    def open(self, manifest_name: str) -> ReplayBuffer:
        """A new in-memory buffer of the manifest's configuration, loaded from it (to inspect a run's replay)."""
        config = self.read_manifest(manifest_name)["config"]
        buffer = ReplayBuffer(config["capacity_per_env"] * config["num_envs"], config["num_envs"],
                              config["observation_shapes"], config["action_dim"], config["latent_shape"])
        self.load(buffer, manifest_name)
        return buffer

    def read_manifest(self, name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        path = self.manifest_dir / name
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise ReplayFileError(f"{path}: missing; the checkpoint's replay buffer is not in {self.directory}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ReplayFileError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise ReplayFileError(f"{path}: not a replay manifest of format {FORMAT_VERSION}")
        if config is not None and manifest.get("config") != config:
            saved = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
            details = ", ".join(f"{k} is {saved.get(k)} in the file but {v} in this buffer"
                                for k, v in config.items() if saved.get(k) != v)
            raise ReplayFileError(f"{path}: saved with another configuration: {details}")
        self._chunks(manifest)  # raises if the chunks do not cover the rows
        return manifest

    def _chunks(self, manifest: dict[str, Any]) -> list[Chunk]:
        """The manifest's chunks, checked to cover exactly the rows a resume needs."""
        try:
            chunks = [Chunk(**entry) for entry in manifest["chunks"]]
            rows, capacity = int(manifest["rows"]), int(manifest["config"]["capacity_per_env"])
        except (KeyError, TypeError, ValueError) as error:
            raise ReplayFileError(f"{self.manifest_dir}: malformed manifest ({error})") from None
        expected = max(0, rows - capacity)
        for chunk in chunks:
            if chunk.start > expected or chunk.end <= expected:
                raise ReplayFileError(f"{self.manifest_dir}: chunks leave a gap at row {expected} of {rows}")
            expected = chunk.end
        if expected != rows:
            raise ReplayFileError(f"{self.manifest_dir}: chunks cover {expected} rows, the manifest says {rows}")
        return chunks

    def _read_verified(self, chunk: Chunk) -> bytes:
        path = self.chunk_dir / chunk.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ReplayFileError(f"{path}: missing") from None
        if hashlib.sha256(data).hexdigest() != chunk.sha256:
            raise ReplayFileError(f"{path}: corrupted or truncated (sha256 differs from the manifest)")
        return data

    def _parse(self, chunk: Chunk, data: bytes, buffer: ReplayBuffer) -> dict[str, np.ndarray]:
        stream, arrays = io.BytesIO(data), {}
        for key in _stored_keys(buffer):
            shape, dtype = buffer.layout[key]
            expected = (chunk.end - chunk.start, buffer.num_envs, *shape)
            try:
                array = np.load(stream, allow_pickle=False)
            except (ValueError, EOFError) as error:
                raise ReplayFileError(f"{self.chunk_dir / chunk.file}: unreadable array {key!r} ({error})") from None
            if array.shape != expected or array.dtype != torch.empty((), dtype=dtype).numpy().dtype:
                raise ReplayFileError(f"{self.chunk_dir / chunk.file}: {key!r} is {array.shape} {array.dtype}, expected {expected}")
            arrays[key] = array
        return arrays

    # ------------------------------------------------------------------------- housekeeping
    def collect_garbage(self, keep: set[str]) -> None:
        """Delete manifests not in `keep`, chunks no kept manifest lists, and temporary files."""
        if not self.directory.exists():
            return
        needed: set[str] = set()
        for folder in (self.manifest_dir, self.chunk_dir):
            if folder.exists():
                remove_temporaries(folder)
        for path in sorted(self.manifest_dir.glob("*.json")):
            if path.name not in keep:
                path.unlink()
                continue
            try:
                needed.update(c.file for c in self._chunks(json.loads(path.read_text())))
            except (ReplayFileError, json.JSONDecodeError, UnicodeDecodeError):
                continue  # a damaged manifest protects nothing; its checkpoint cannot resume anyway
        needed.update(c.file for c in self.sealed)  # the next save builds on these
        for path in self.chunk_dir.glob("*.chunk"):
            if path.name not in needed:
                path.unlink()


def _stored_keys(buffer: ReplayBuffer) -> list[str]:
    return [key for key in buffer.layout if key not in LATENT_KEYS]


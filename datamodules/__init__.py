"""Replay of environment steps for the agent (docs/algorithm.md §1 "Data"): the buffer (storage and sampling),
its persistence (chunk files and manifests) and the Lightning DataModule. Imports wm.model.phases
and the leaf modules of wm.run (files) only."""

from datamodules.replay import ReplayDataModule
from datamodules.replay_buffer import ReplayBuffer, ReplayFileError, ReplayIndex
from datamodules.replay_store import ReplayStore

__all__ = ["ReplayBuffer", "ReplayDataModule", "ReplayFileError", "ReplayIndex", "ReplayStore"]

"""Replay of environment steps for the agent (SPEC §1 "Data")."""

from datamodules.replay import ReplayBuffer, ReplayDataModule, ReplayFileError

__all__ = ["ReplayBuffer", "ReplayDataModule", "ReplayFileError"]

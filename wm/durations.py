"""Durations as a person reads them."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """3 d 4 h, 5 h 02 min, 12 min 30 s or 45 s."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def update_count(frames: float, action_repeat: int, train_ratio: float, batch_size: int, sequence_length: int) -> int:
    """Updates that `frames` env frames pay for: agent steps (frames / action repeat) times the train
    ratio (replayed steps per agent step), over the B*T steps one update replays."""
    return int(frames / action_repeat * train_ratio / (batch_size * sequence_length))

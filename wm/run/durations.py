"""Durations as a person reads them, and what a run sized for a GPU would take on a CPU."""

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


# Seconds per size12M bf16 update on wm's 2-core development CPUs, compiled: as one graph on one with
# AMX, in compiled regions (the default) on one with AVX512-BF16 but no AMX (README "Speed").
CPU_SIZE12M_UPDATE_SECONDS = (1.6, 4.3)


def gpu_sized_on_cpu(updates: int, size: str | None) -> str | None:
    """What a config sized for a GPU would take on a CPU, if that is an hour or more, in one line;
    None for size1M (sized for a CPU) or a short run."""
    if size in (None, "size1M"):
        return None
    low, high = (updates * seconds for seconds in CPU_SIZE12M_UPDATE_SECONDS)
    if high < 3600:
        return None
    return (f"this fit is sized for a GPU and runs on a CPU: {updates:,} updates of a {size} model are left. On wm's "
            f"2-core development CPUs a size12M update took {CPU_SIZE12M_UPDATE_SECONDS[0]:.1f} s (AMX, compiled as one "
            f"graph) to {CPU_SIZE12M_UPDATE_SECONDS[1]:.1f} s (AVX512-BF16 without AMX, compiled regions, the default), "
            f"so this run would take {format_duration(low)} to {format_duration(high)}"
            f"{' or more (a larger model)' if size != 'size12M' else ''} there (one H200: 0.15 s an update). The progress "
            "bar's ETA shows this machine's own figure once training runs; configs/cpu/ and configs/quickstart.yaml are "
            "sized for a CPU.")

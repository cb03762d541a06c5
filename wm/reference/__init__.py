"""Published reference scores: DreamerV3's learning curves and the score normalisers.

The curve files are DreamerV3's own published runs, copied unchanged with their credit and MIT
licence (README.md and LICENSE in this folder). A task of this project maps to a curve when the
published benchmark has it: `dmc-<domain>_<task>` (DMC from pixels) and `atari-<game>` (Atari 100k).
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

FOLDER = Path(__file__).resolve().parent
# suite -> (published file, the file's task prefix): "dmc-walker_walk" is "dmc_walker_walk" there.
CURVE_FILES = {"dmc": ("dmc_vision-dreamerv3.json.gz", "dmc"), "dmc_proprio": ("dmc_proprio-dreamerv3.json.gz", "dmc"),
               "atari": ("atari100k-dreamerv3.json.gz", "atari")}
REFERENCE_METHOD = "DreamerV3 (published)"

# Atari 100k: (random, human) episode returns, for human-normalised scores.
ATARI_RANDOM_HUMAN = {
    "alien": (227.8, 7127.7), "amidar": (5.8, 1719.5), "assault": (222.4, 742.0), "asterix": (210.0, 8503.3),
    "bank_heist": (14.2, 753.1), "battle_zone": (2360.0, 37187.5), "boxing": (0.1, 12.1), "breakout": (1.7, 30.5),
    "chopper_command": (811.0, 7387.8), "crazy_climber": (10780.5, 35829.4), "demon_attack": (152.1, 1971.0),
    "freeway": (0.0, 29.6), "frostbite": (65.2, 4334.7), "gopher": (257.6, 2412.5), "hero": (1027.0, 30826.4),
    "jamesbond": (29.0, 302.8), "kangaroo": (52.0, 3035.0), "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3), "ms_pacman": (307.3, 6951.6), "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3), "qbert": (163.9, 13455.0), "road_runner": (11.5, 7845.0),
    "seaquest": (68.4, 42054.7), "up_n_down": (533.4, 11693.2),
}
# Episode-return ranges that map a suite's returns onto [0, 1] (0: the low end, 1: the best return).
RETURN_RANGES = {"dmc": (0.0, 1000.0), "dmc_proprio": (0.0, 1000.0), "dmc_subtle": (0.0, 1000.0), "dmc_distracting": (0.0, 1000.0),
                 "toy-catch": (-1.0, 1.0), "toy-catch_small": (-1.0, 1.0), "toy-catch_distract": (-1.0, 1.0),
                 "toy-point_reach": (0.0, 200.0)}


@dataclass
class Curve:
    """Mean episode return over seeds at each step, with a 95% Student-t interval."""

    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: int


def t_interval(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% Student-t interval over `axis` (seeds), ignoring NaNs (a seed with no point
    there); NaN bounds where fewer than two seeds have a point."""
    values = np.asarray(values, float)
    n = (~np.isnan(values)).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(values, axis) / n
        spread = np.sqrt(np.nansum((values - np.expand_dims(mean, axis)) ** 2, axis) / (n - 1))
        half = stats.t.ppf(0.975, np.maximum(n - 1, 1)) * spread / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return mean, mean - half, mean + half


def split_task(task: str) -> tuple[str, str]:
    """"dmc-walker_walk" -> ("dmc", "walker_walk")."""
    suite, _, name = task.partition("-")
    return suite, name


@functools.cache
def published_runs(file: str) -> tuple[dict, ...]:
    with gzip.open(FOLDER / file, "rt") as f:
        return tuple(json.load(f))


def reference_runs(task: str) -> list[dict]:
    """DreamerV3's published runs of `task` (one per seed), or [] where it published none."""
    suite, name = split_task(task)
    if suite not in CURVE_FILES:
        return []
    file, prefix = CURVE_FILES[suite]
    return [run for run in published_runs(file) if run["task"] == f"{prefix}_{name}"]


def reference_curve(task: str, bins: int = 50, until: float | None = None) -> Curve | None:
    """DreamerV3's published curve of `task` up to `until` env frames (default: all of it): each
    seed's returns averaged in `bins` equal windows of env frames (its evaluations come in irregular
    bursts), then the mean and interval over seeds. A short run's plot gets windows of its own range."""
    runs = reference_runs(task)
    if not runs:
        return None
    end = until or max(max(run["xs"]) for run in runs)
    edges = np.linspace(0.0, end, bins + 1)
    per_seed = []
    for run in runs:
        xs, ys = np.asarray(run["xs"], float), np.asarray(run["ys"], float)
        xs, ys = xs[xs <= end], ys[xs <= end]
        index = np.clip(np.digitize(xs, edges) - 1, 0, bins - 1)
        sums, counts = np.bincount(index, ys, bins), np.bincount(index, minlength=bins)
        per_seed.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
    per_seed = np.asarray(per_seed)
    keep = ~np.isnan(per_seed).all(0)  # windows with a point of at least one seed
    if not keep.any():
        return None
    mean, low, high = t_interval(per_seed[:, keep])
    return Curve((edges[:-1] + edges[1:])[keep] / 2, mean, low, high, len(runs))


def reference_at(task: str, frames: float, window: float = 20_000.0) -> float | None:
    """DreamerV3's published mean return at `frames`: each seed's mean within +-`window` frames,
    averaged over seeds; None where it published no point there."""
    means = []
    for run in reference_runs(task):
        xs, ys = np.asarray(run["xs"], float), np.asarray(run["ys"], float)
        near = np.abs(xs - frames) <= window
        if near.any():
            means.append(ys[near].mean())
    return float(np.mean(means)) if means else None


def return_range(task: str) -> tuple[float, float] | None:
    """The lowest and highest return an episode of `task` can have, where known."""
    suite, _ = split_task(task)
    bounds = RETURN_RANGES.get(task, RETURN_RANGES.get(suite))
    return None if bounds is None else (float(bounds[0]), float(bounds[1]))


def normalized_score(task: str, value: float) -> float | None:
    """A final score on a common scale: human-normalised for Atari, return / 1000 for DMC suites,
    the success rate itself for Meta-World (pass `eval/success`), the toy tasks' return range.
    None for a task with no known scale."""
    suite, name = split_task(task)
    if suite == "atari":
        random, human = ATARI_RANDOM_HUMAN[name]
        return (value - random) / (human - random)
    if suite == "metaworld":
        return value
    bounds = return_range(task)
    if bounds is None:
        return None
    low, high = bounds
    return (value - low) / (high - low)

"""What the env loop and its evaluations log, and how: every metric against environment frames
(the x axis of every published curve), training episodes as one mean per log interval, videos as
mp4 artifacts, and artifact writes that must not end the run when the store or the disk fails."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger

from wm.envs.crafter import CRAFTER_ACHIEVEMENTS, crafter_score
from wm.run.tracking import EnvStepMLFlowLogger
from wm.run.video import write_mp4


def success_rate(successes: list[bool | None]) -> dict[str, float]:
    """{"success": the fraction of episodes that succeeded}, or {} for a task with no notion of success."""
    known = [s for s in successes if s is not None]
    return {"success": float(np.mean(known))} if known else {}


def achievement_rates(episodes: list[dict[str, bool]]) -> dict[str, float]:
    """Per achievement, the fraction of episodes that unlocked it."""
    names = sorted({name for achievements in episodes for name in achievements})
    return {name: float(np.mean([a.get(name, False) for a in episodes])) for name in names}


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], env_steps: int) -> None:
    """Metrics at `env_steps` frames; also moves the env-step logger's clock, which Lightning's own
    logging then uses."""
    for logger in trainer.loggers:
        if isinstance(logger, EnvStepMLFlowLogger):
            logger.env_steps = env_steps
        if trainer.is_global_zero:
            logger.log_metrics(metrics, step=env_steps)


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)] if trainer.is_global_zero else []


def store_write(logger, what: str, write) -> None:
    """An artifact write that must not end the run when the store or the disk fails (wm.run.tracking)."""
    if isinstance(logger, EnvStepMLFlowLogger):
        logger.guarded(what, write)
    else:
        write()


def log_videos(trainer: L.Trainer, videos: dict[str, np.ndarray], env_steps: int, action_repeat: int) -> None:
    """Each (T, H, W, 3) video as `videos/<name>_<env frames>.mp4`, at the env's frame rate."""
    loggers = mlflow_loggers(trainer)
    if not loggers:
        return

    def write_and_log() -> None:
        with tempfile.TemporaryDirectory() as folder:
            for name, video in videos.items():
                write_mp4(Path(folder) / f"{name}_{env_steps:09d}.mp4", video, fps=max(1, round(50 / action_repeat)))
            for logger in loggers:
                logger.experiment.log_artifacts(logger.run_id, folder, "videos")

    store_write(loggers[0], f"the videos at {env_steps:,} frames", write_and_log)


def achievement_metrics(prefix: str, episodes: list[dict[str, bool]]) -> dict[str, float]:
    """`<prefix>/achievement/<name>` success rates over the episodes and, where the env reports
    Crafter's achievements, `<prefix>/crafter_score`; nothing for envs without achievements."""
    rates = achievement_rates(episodes)
    if not rates:
        return {}
    metrics = {f"{prefix}/achievement/{name}": rate for name, rate in rates.items()}
    if set(rates) == set(CRAFTER_ACHIEVEMENTS):
        metrics[f"{prefix}/crafter_score"] = crafter_score(list(rates.values()))
    return metrics


def episode_metrics(prefix: str, returns: list[float], lengths: list[int], successes: list[bool | None],
                    achievements: list[dict[str, bool]]) -> dict[str, float]:
    """The mean return and length of some episodes, and their success and achievement rates where
    the task has them, as `<prefix>/...`."""
    return {f"{prefix}/return": float(np.mean(returns)), f"{prefix}/length": float(np.mean(lengths)),
            **{f"{prefix}/{k}": v for k, v in success_rate(successes).items()},
            **achievement_metrics(prefix, achievements)}


def log_collection(loop, trainer: L.Trainer) -> None:
    """The env loop's frames/s and updates/s (over windows of 10 s or more), and once per log
    interval the mean of the training episodes that ended in it and the loop's counters."""
    now = time.perf_counter()
    start, steps, updates = loop.clock
    if now - start >= 10.0:  # a window long enough for slow (CPU, size12M) runs
        loop.fps = (loop.env_steps - steps) / (now - start)
        loop.updates_per_second = (trainer.global_step - updates) / (now - start)
        loop.clock = (now, loop.env_steps, trainer.global_step)
    log_now = trainer.global_step % max(1, trainer.log_every_n_steps) == 0
    if loop.finished and log_now:
        # One write per logging interval: the mean over the episodes that ended in it.
        returns, lengths, successes, achievements = (list(column) for column in zip(*loop.finished))
        log_metrics(trainer, {**episode_metrics("episode", returns, lengths, successes, achievements),
                              "episode/count": float(len(returns))}, loop.env_steps)
        loop.finished.clear()
    if log_now:
        log_metrics(trainer, {"env/fps": loop.fps, "env/updates_per_second": loop.updates_per_second,
                              "env/episodes": float(loop.episodes), "env/restarts": float(loop.envs.restarts),
                              "train/updates": float(trainer.global_step)}, loop.env_steps)

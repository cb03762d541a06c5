"""Greedy evaluation episodes, shared by evaluations during a fit and `wm test`, and the part of
the env loop that runs them (`GreedyEvaluation`).

Episodes run in parallel envs under NEXT_STEP autoreset; each env plays episodes until the wanted
number has started, so no episode is biased towards the short ones that finish first. An episode
that a restart of its worker cut short is played again.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gymnasium as gym
import lightning as L
import numpy as np
import torch

from callbacks.interrupt import interrupt_signal
from callbacks.metrics import episode_metrics, log_metrics, log_videos, mlflow_loggers, store_write
from wm.envs import make_vector_env
from wm.inspection import (OPEN_LOOP_CONTEXT, OPEN_LOOP_FRAMES, open_loop, open_loop_grid, open_loop_video,
                           saliency_video)
from wm.run.tracking import EnvStepMLFlowLogger
from wm.run.video import side_by_side


ACHIEVEMENT = "achievement/"  # info keys of per-episode flags an env reports (Crafter's achievements)


@dataclass
class Episode:
    """One finished episode: its return, length, success (None for a task with no notion of
    success, whose env reports none), the achievements its env reports (name -> unlocked), and if it
    was recorded its frames and the actions that led to them (actions[0], before the first frame, is
    zeros)."""

    ret: float
    length: int
    success: bool | None
    achievements: dict[str, bool] = field(default_factory=dict)
    frames: list[np.ndarray] | None = None
    actions: list[np.ndarray] | None = None


class EpisodeStats:
    """Return, length, success and achievements of each env's running episode, under NEXT_STEP
    autoreset (the step after an episode's end only resets, so its reward is not the episode's)."""

    def __init__(self, num_envs: int):
        self.total, self.length, self.success = np.zeros(num_envs), np.zeros(num_envs, int), np.zeros(num_envs, bool)
        self.reports_success = False  # whether the env says whether an episode succeeded (Meta-World)
        self.achieved: dict[str, np.ndarray] = {}  # achievement -> whether each env's episode unlocked it

    def step(self, reward, first, done, info) -> list[tuple[int, tuple[float, int, bool | None, dict[str, bool]] | None]]:
        """Add one vector step; returns (env, (return, length, success, achievements)) for each
        episode that ended with it, with None for one a restart of its worker cut short; success
        is None where the env reports none."""
        live = ~first
        self.total += np.where(live, reward, 0.0)
        self.length += live
        if "success" in info:
            self.reports_success = True
            self.success |= np.asarray(info["success"], bool) & live
        for key in (k for k in info if k.startswith(ACHIEVEMENT)):
            achieved = self.achieved.setdefault(key.removeprefix(ACHIEVEMENT), np.zeros_like(self.success))
            achieved |= np.asarray(info[key], bool) & live
        restarted = np.broadcast_to(np.asarray(info.get("restarted", False), bool), live.shape)
        ended = []
        for i in np.flatnonzero(done & live):
            achievements = {name: bool(achieved[i]) for name, achieved in self.achieved.items()}
            success = bool(self.success[i]) if self.reports_success else None
            episode = (float(self.total[i]), int(self.length[i]), success, achievements)
            ended.append((int(i), None if restarted[i] else episode))
            self.total[i], self.length[i], self.success[i] = 0.0, 0, False
            for achieved in self.achieved.values():
                achieved[i] = False
        return ended


def play_episodes(envs: gym.vector.VectorEnv, act: Callable, count: int, seed: int, record: int = 0,
                  stop: Callable[[], bool] = lambda: False, to_env: Callable = lambda action: action) -> Iterator[Episode]:
    """`count` episodes of the policy `act(obs, is_first, state) -> (action, state)`, whose actions
    `to_env` turns into what the envs take, yielded as they finish. The first `record` episodes to
    start keep their image frames (the first observation to the last) and actions. Returns early,
    short of `count`, once `stop()` is true."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed)
    first, done, state = np.ones(n, bool), np.zeros(n, bool), None
    running = np.arange(n) < count  # whether env i's current episode counts
    started = int(running.sum())
    stats = EpisodeStats(n)
    recording: list[list[np.ndarray] | None] = [None] * n  # frames of env i's episode, if recorded
    actions: list[list[np.ndarray] | None] = [None] * n
    recorded = 0
    if "image" in obs:
        for i in range(min(record, count, n)):
            recording[i], recorded = [obs["image"][i]], recorded + 1
    finished = 0
    while finished < count:
        if stop():
            return
        action, state = act(obs, first, state)
        obs, reward, terminated, truncated, info = envs.step(to_env(action))
        first, done = done, terminated | truncated  # NEXT_STEP: the step after an end resets
        for i, frames in enumerate(recording):
            if frames is not None and not first[i]:
                if actions[i] is None:
                    actions[i] = [np.zeros_like(action[i])]
                frames.append(obs["image"][i])
                actions[i].append(action[i])
        for i in np.flatnonzero(first):
            running[i] = started < count
            started += running[i]
            if running[i] and recorded < record and "image" in obs:
                recording[i], recorded = [obs["image"][i]], recorded + 1
        for i, episode in stats.step(reward, first, done, info):
            frames, recording[i], taken, actions[i] = recording[i], None, actions[i], None
            if not running[i]:
                continue
            running[i] = False
            if episode is None:  # cut short by a restart of its worker: play it again
                started -= 1
                recorded -= frames is not None
                continue
            finished += 1
            yield Episode(*episode, frames=frames, actions=taken)


class GreedyEvaluation:
    """Greedy evaluations of the env loop (`callbacks.env_loop.EnvLoop`, which this is a part of):
    `eval_episodes` episodes every `eval_every` frames of a fit and at its end, and the episodes
    of `python -m wm test` (the test loop's batches) with what they log: the spread, every
    episode's result, the videos, and what the agent looks at and predicts (wm.inspection). They
    play on up to `num_envs` parallel evaluation envs of their own (the eval split of video
    backgrounds), with the env loop's task, seeds and counters, whose state it keeps."""

    def setup_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`test` and `predict`: their results go at the env frames of the checkpoint under test,
        which their loops (unlike a resumed fit) do not restore into the callbacks; their batches
        are greedy episodes."""
        if trainer.ckpt_path:
            state = torch.load(trainer.ckpt_path, map_location="cpu", mmap=True, weights_only=True)["callbacks"]
            self.env_steps, self.episodes = state[self.state_key]["env_steps"], state[self.state_key]["episodes"]
        for logger in trainer.loggers:
            if isinstance(logger, EnvStepMLFlowLogger):
                logger.env_steps = self.env_steps
        trainer.datamodule.provide_test_episodes(lambda: self._test_episodes(trainer, pl_module))

    def _eval_envs(self) -> gym.vector.VectorEnv:
        """Up to `num_envs` parallel evaluation envs (the eval split of video backgrounds), made
        once and restarted like the training envs."""
        if self.eval_envs is None:
            self.eval_envs = make_vector_env(
                self.task, min(self.eval_episodes, self.num_envs), self.action_repeat, time_limit=self.time_limit,
                autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, video_dir=self.video_dir, split="eval",
            )
        return self.eval_envs

    def _greedy_episodes(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """`eval_episodes` greedy episodes, yielded as they finish; fewer if a stop signal came."""
        def act(obs, first, state):
            return self._act(pl_module, obs, first, state, "greedy")

        with torch.no_grad():
            yield from play_episodes(self._eval_envs(), act, self.eval_episodes, self.rank_seed + 10**6 + self.episodes,
                                     record=self.eval_videos, stop=lambda: interrupt_signal(trainer) is not None,
                                     to_env=self._to_env)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """`eval_episodes` greedy episodes on parallel eval envs: logs eval/* and the video, and
        returns the mean return; None, and nothing logged, if a stop signal cut it short."""
        episodes = list(self._greedy_episodes(trainer, pl_module))
        if len(episodes) < self.eval_episodes:
            return None
        returns = np.array([e.ret for e in episodes])
        self.last_eval_return, self.last_eval_std = float(returns.mean()), float(returns.std())
        self.last_eval_at = self.env_steps
        log_metrics(trainer, {**episode_metrics("eval", returns, [e.length for e in episodes], [e.success for e in episodes],
                                                [e.achievements for e in episodes]),
                              "eval/return_std": self.last_eval_std}, self.env_steps)
        self._log_video(trainer, episodes, "eval")
        return self.last_eval_return

    # ------------------------------------------------------------------ `python -m wm test`
    def _test_episodes(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The test loop's batches: greedy episodes, kept for `on_test_epoch_end`."""
        self.tested: list[Episode] = []
        for episode in self._greedy_episodes(trainer, pl_module):
            self.tested.append(episode)
            yield episode

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What the per-episode means of the agent's test_step leave out: the spread over episodes,
        every episode's result (a CSV artifact) and the video."""
        if not self.tested:
            return
        returns = np.array([e.ret for e in self.tested])
        log_metrics(trainer, {"test/return_std": float(returns.std()), "test/episodes": float(len(returns))}, self.env_steps)
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["episode", "return", "length", "success"])
        writer.writerows([i, e.ret, e.length, "" if e.success is None else int(e.success)] for i, e in enumerate(self.tested))
        name = f"test/episodes_{self.env_steps:09d}.csv"
        for logger in mlflow_loggers(trainer):
            store_write(logger, name, lambda lg=logger: lg.experiment.log_text(lg.run_id, table.getvalue(), name))
        self._log_video(trainer, self.tested, "test")
        self._log_inspection(trainer, pl_module, [e for e in self.tested if e.frames])

    def _log_inspection(self, trainer: L.Trainer, pl_module: L.LightningModule, recorded: list[Episode]) -> None:
        """Open-loop predictions of the recorded episodes (with an image decoder) and the occlusion
        saliency of the first one: mp4s in videos/, and as PNGs in images/ the saliency of its
        middle frame and the open-loop grid of the first episode."""
        loggers = mlflow_loggers(trainer)
        if not recorded or not loggers:
            return
        video, image = saliency_video(pl_module, recorded[0].frames, recorded[0].actions)
        videos, images = {"saliency": video}, {"saliency": image}
        if pl_module.world_model.objective.image_decoder() is not None:
            videos["openloop"] = open_loop_video(pl_module, [(e.frames, e.actions) for e in recorded])
            first = recorded[0]
            rows = open_loop(pl_module, np.stack(first.frames[:OPEN_LOOP_FRAMES]), np.stack(first.actions[:OPEN_LOOP_FRAMES]),
                             OPEN_LOOP_CONTEXT)
            images["openloop"] = open_loop_grid(rows, OPEN_LOOP_CONTEXT)
        log_videos(trainer, videos, self.env_steps, self.action_repeat)
        for logger in loggers:
            for name, image in images.items():
                path = f"images/{name}_{self.env_steps:09d}.png"
                store_write(logger, path, lambda lg=logger, im=image, p=path: lg.experiment.log_image(lg.run_id, im, p))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def _log_video(self, trainer: L.Trainer, episodes: list[Episode], prefix: str) -> None:
        """The recorded episodes side by side, enlarged, as `videos/<prefix>_<env frames>.mp4`."""
        recorded = [e.frames for e in episodes if e.frames]
        if recorded:
            log_videos(trainer, {prefix: side_by_side(recorded)}, self.env_steps, self.action_repeat)

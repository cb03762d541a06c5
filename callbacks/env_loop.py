"""The environment-interaction callback: collects the experience that the replay DataModule feeds.

Random prefill first, then after every update as many environment steps as the train ratio asks
(docs/algorithm.md §1 "Data"), acting with the agent's policy; counters live in `state_dict` so a
resumed run continues its step count. What it logs is callbacks/metrics.py; its greedy
evaluations (during training and, for `python -m wm test` and `predict`, as the test and predict
loops' batches) are callbacks/evaluation.py's `GreedyEvaluation`, a part of this callback.

Its phases are timed for `python -m wm.bench fit` (wm.model.phases.phase, free unless a benchmark
records): "env" (stepping the envs and storing the steps), "act" (the policy's actions for the
envs), "eval" (evaluations during training) and "logging".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm import tqdm

from callbacks.evaluation import Episode, EpisodeStats, GreedyEvaluation
from callbacks.interrupt import interrupt_signal
from callbacks.metrics import log_collection
from datamodules.replay_store import new_save_id
from wm.envs import make_env, make_vector_env
from wm.envs.base import env_spec
from wm.model.phases import phase
from wm.run.durations import gpu_sized_on_cpu, update_count


FRAMES_BAR = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} frames [{elapsed}<{remaining}{postfix}]"

class EnvLoop(GreedyEvaluation, L.Callback):
    """Steps `num_envs` copies of `task` and writes every step into the replay buffer.

    Args:
        task: environment name, e.g. "dmc-walker_walk" or "toy-point_reach".
        num_envs: parallel environments (worker processes when > 1).
        action_repeat: environment frames per agent step.
        total_steps: stop training after this many environment frames (agent steps x repeat).
        prefill: environment frames collected with random actions before the first update.
        train_ratio: replayed steps per agent step; each update consumes B x T replayed steps,
            so one update is followed by B * T / train_ratio agent steps, whatever num_envs
            (the envs step together, once every num_envs * train_ratio / (B * T) updates).
        eval_every: environment frames between greedy evaluations (0: only at the end).
        eval_episodes: episodes per evaluation (and of `python -m wm test`).
        eval_videos: evaluation episodes recorded side by side in an mp4 artifact (0: no video).
        seed: seed of the env resets and random prefill actions (evaluation envs: seed + 10^6);
            rank r of a multi-process run uses seed + 1000 r. None: `python -m wm` derives it
            from the run's seed (`seed_everything`, see wm.run.identity.derived_seed); 0 for an EnvLoop
            made in code.
        video_dir: background videos of dmc_distracting tasks (train/ and eval/ sub-folders);
            none: the built-in procedural backgrounds.
    """

    def __init__(
        self,
        task: str = "toy-point_reach",
        num_envs: int = 1,
        action_repeat: int = 2,
        time_limit: int | None = None,
        total_steps: int = 1_000_000,
        prefill: int = 2500,
        train_ratio: float = 512.0,
        eval_every: int = 0,
        eval_episodes: int = 10,
        eval_videos: int = 4,
        seed: int | None = None,
        video_dir: str | None = None,
    ):
        super().__init__()
        self.task, self.num_envs, self.action_repeat, self.time_limit = task, num_envs, action_repeat, time_limit
        self.total_steps, self.prefill, self.train_ratio = total_steps, prefill, train_ratio
        self.eval_every, self.eval_episodes, self.eval_videos = eval_every, eval_episodes, eval_videos
        self.seed, self.video_dir = 0 if seed is None else seed, video_dir
        probe = self._make_env(seed)
        self.spec = env_spec(probe)
        probe.close()
        self.env_steps = 0  # environment frames collected on this rank
        self.episodes = 0
        # Replayed steps (B x T per update) not yet paid for by agent steps (train_ratio each); kept
        # in replayed steps as sums of fractional agent steps (e.g. 4/3) round below whole steps.
        self.replay_credit = 0.0
        self.last_return = float("nan")
        self.last_eval_return = float("nan")
        self.last_eval_std = float("nan")
        self.next_eval = eval_every
        self.envs: gym.vector.VectorEnv | None = None
        self.eval_envs: gym.vector.VectorEnv | None = None
        self.buffer = None
        self.rng: np.random.Generator | None = None
        self.restored: dict | None = None  # counters and RNG states of the checkpoint resumed from
        self.restored_replay: dict | None = None  # the replay that checkpoint covers
        self.last_eval_at = -1  # env frames at the last evaluation
        self.tested: list[Episode] = []  # the episodes of `python -m wm test`
        # Whether on_train_end evaluates; the fit benchmark, which stops a run early, turns it off.
        self.final_eval = True

    # --------------------------------------------------------------------------- plumbing
    def _make_env(self, seed: int | None) -> gym.Env:
        return make_env(self.task, self.action_repeat, self.time_limit, seed=seed, video_dir=self.video_dir)

    def state_dict(self) -> dict:
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "replay_credit": self.replay_credit,
            "last_return": self.last_return,
            "last_eval_return": self.last_eval_return,
            "last_eval_std": self.last_eval_std,
            "next_eval": self.next_eval,
            "last_eval_at": self.last_eval_at,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state if self.rng is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.restored = dict(state)
        for key in ("env_steps", "episodes", "replay_credit", "last_return", "last_eval_return", "next_eval", "last_eval_at"):
            setattr(self, key, state[key])
        self.last_eval_std = state.get("last_eval_std", float("nan"))  # absent from checkpoints before it existed

    @staticmethod
    def replay_dir(trainer: L.Trainer) -> Path:
        """Where the buffer is saved: beside the checkpoints, one folder per rank."""
        callback = trainer.checkpoint_callback
        root = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return root / "replay" / f"rank{trainer.global_rank}"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The buffer's new rows go beside the .ckpt, not into it; the checkpoint names the
        # replay manifest it needs (the same save id on every rank).
        save_id = trainer.strategy.broadcast(new_save_id())
        checkpoint["replay"] = trainer.datamodule.save_replay(self.replay_dir(trainer), save_id)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "replay" not in checkpoint:
            raise ValueError("the checkpoint names no replay buffer: it was written by an older version of wm")
        self.restored_replay = checkpoint["replay"]

    def _restore(self, trainer: L.Trainer) -> None:
        """Buffer and RNG states of the checkpoint this fit resumes from."""
        state, self.restored = self.restored, None
        trainer.datamodule.load_replay(self.replay_dir(trainer), self.restored_replay)
        torch.set_rng_state(state["torch_rng"])
        if state["numpy_rng"] is not None:
            self.rng.bit_generator.state = state["numpy_rng"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank_seed = self.seed + 1000 * trainer.global_rank
        if stage in ("test", "predict"):
            self.setup_evaluation(trainer, pl_module)
        if stage != "fit":
            return
        size = pl_module.world_model.size
        trainer.datamodule.create_buffer(
            self.num_envs, self.spec.observation_shapes, self.spec.action_dim, (size.deter, size.stoch, size.classes)
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after a checkpoint restore (counters are back) and before the fit loop fetches its
        # first batch, so the buffer is reloaded and prefilled in time; the envs start fresh.
        self._warn_if_gpu_sized(trainer, pl_module)
        rank_zero_info(f"Starting {self.num_envs} env{'s' * (self.num_envs > 1)} of {self.task}"
                       + (" (worker processes)" if self.num_envs > 1 else ""))
        self.envs = make_vector_env(
            self.task, self.num_envs, self.action_repeat, seed=self.rank_seed + self.episodes,
            time_limit=self.time_limit, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, video_dir=self.video_dir,
        )
        self.rng = np.random.default_rng(self.rank_seed + self.env_steps)
        self.obs, _ = self.envs.reset(seed=self.rank_seed + self.episodes)
        self.is_first = np.ones(self.num_envs, bool)
        self.done = np.zeros(self.num_envs, bool)
        self.act_state = None
        self.current = EpisodeStats(self.num_envs)  # the episodes under way
        self.finished: list[tuple[float, int, bool, dict[str, bool]]] = []
        self.buffer = trainer.datamodule.buffer
        if self.restored is not None:
            self._restore(trainer)
        self._add(np.zeros((self.num_envs, self.spec.action_dim), np.float32), np.zeros(self.num_envs), self.done, self.done)
        self.clock = (time.perf_counter(), self.env_steps, trainer.global_step)
        self.fps = self.updates_per_second = 0.0
        needed = max(self.prefill, trainer.datamodule.sequence_length * self.action_repeat * self.num_envs)
        with tqdm(desc="Prefill (random actions)", total=needed, initial=min(self.env_steps, needed), unit_scale=True,
                  bar_format=FRAMES_BAR,
                  disable=self.env_steps >= needed or not trainer.is_global_zero or trainer.progress_bar_callback is None,
                  file=sys.stdout, dynamic_ncols=True) as bar:
            while (self.env_steps < needed or len(self.buffer) < trainer.datamodule.sequence_length * self.num_envs) \
                    and interrupt_signal(trainer) is None:
                self.step(pl_module, random=True)
                bar.update(min(self.env_steps, needed) - bar.n)
        if self.env_steps >= self.total_steps:  # resumed from the end of a finished run: nothing to train
            trainer.should_stop = True

    def updates_left(self, trainer: L.Trainer) -> int:
        dm = trainer.datamodule
        frames = max(0, self.total_steps - self.env_steps)
        return update_count(frames, self.action_repeat, self.train_ratio, dm.batch_size, dm.sequence_length)

    def _warn_if_gpu_sized(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A config sized for a GPU that trains on a CPU would run for days; say so at the start."""
        if trainer.strategy.root_device.type == "cpu":
            warning = gpu_sized_on_cpu(self.updates_left(trainer), getattr(pl_module.hparams, "size", None))
            if warning:
                rank_zero_warn(warning)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        dm.write_back(batch, outputs)
        self.replay_credit += dm.batch_size * dm.sequence_length
        vector_step = self.num_envs * self.train_ratio  # replayed steps one step of every env pays for
        while self.replay_credit >= vector_step:
            self.step(pl_module)
            self.replay_credit -= vector_step
        if self.eval_every and self.env_steps >= self.next_eval:
            with phase("eval"):
                evaluated = self.evaluate(trainer, pl_module) is not None
            if evaluated:
                self.next_eval += self.eval_every
        with phase("logging"):
            log_collection(self, trainer)
        if self.env_steps >= self.total_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final evaluation, unless the last one was at this very step or the fit was interrupted.
        if self.final_eval and self.eval_episodes and self.last_eval_at != self.env_steps and interrupt_signal(trainer) is None:
            self.evaluate(trainer, pl_module)
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        for name in ("envs", "eval_envs"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

    # ---------------------------------------------------------------------------- stepping
    def _random_action(self) -> np.ndarray:
        if self.spec.discrete:
            return np.eye(self.spec.action_dim, dtype=np.float32)[self.rng.integers(0, self.spec.action_dim, self.num_envs)]
        return self.rng.uniform(-1, 1, (self.num_envs, self.spec.action_dim)).astype(np.float32)

    def _to_env(self, action: np.ndarray) -> np.ndarray:
        """Model actions (one-hot where discrete) to what the env takes (indices where discrete)."""
        return action.argmax(-1) if self.spec.discrete else action

    @staticmethod
    def _act(pl_module, obs: dict, is_first: np.ndarray, state, mode: str):
        """The agent's action for a batch of observations (numpy in, numpy out)."""
        batch = {k: torch.as_tensor(v) for k, v in obs.items()}
        batch["is_first"] = torch.as_tensor(is_first)
        action, state = pl_module.act(batch, state, mode=mode)
        return action.float().cpu().numpy(), state

    def _policy_action(self, pl_module) -> np.ndarray:
        with phase("act"):
            action, self.act_state = self._act(pl_module, self.obs, self.is_first, self.act_state, "sample")
        return action

    def step(self, pl_module: L.LightningModule, random: bool = False) -> None:
        """One step of every env; NEXT_STEP autoreset: the step after an episode's last one
        returns the next episode's first observation and ignores the action."""
        action = self._random_action() if random else self._policy_action(pl_module)
        with phase("env"):
            self.obs, reward, terminated, truncated, info = self.envs.step(self._to_env(action))
            self.is_first = self.done
            self.done = terminated | truncated
            self._add(action, reward, terminated, self.done)
            self.env_steps += self.num_envs * self.action_repeat
            for _, episode in self.current.step(reward, self.is_first, self.done, info):
                self.episodes += 1
                if episode is not None:
                    self.last_return = episode[0]
                    self.finished.append(episode)

    def _add(self, action, reward, terminated, last) -> None:
        """One row of the buffer, which zeroes the action and reward of `is_first` rows."""
        first = self.is_first
        self.buffer.add(
            {
                **self.obs,
                "action": action,
                "reward": reward,
                "is_first": first.copy(),
                "is_last": np.asarray(last, bool) & ~first,
                "is_terminal": np.asarray(terminated, bool) & ~first,
            }
        )

"""The environment-interaction callback: collects the experience that the replay DataModule feeds.

Random prefill first, then after every update as many environment steps as the train ratio asks
(SPEC §1 "Data"), acting with the agent's policy. Episode returns, lengths and success are
logged; counters live in `state_dict` so a resumed run continues its step count.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger

from wm.envs import make_env, make_vector_env
from wm.logger import EnvStepMLFlowLogger


@dataclass(frozen=True)
class EnvSpec:
    """What the model must be built for: observation shapes and the action space."""

    observation_shapes: dict[str, tuple[int, ...]]
    action_dim: int
    discrete: bool


def env_spec(env: gym.Env) -> EnvSpec:
    obs_space, act_space = env.observation_space, env.action_space
    shapes = {k: tuple(int(d) for d in space.shape) for k, space in obs_space.spaces.items()}
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvSpec(shapes, int(act_space.n), True)
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return EnvSpec(shapes, int(act_space.shape[0]), False)
    raise ValueError(f"unsupported action space {act_space}: use Box(-1, 1, (A,)) or Discrete(n)")


class EnvLoop(L.Callback):
    """Steps `num_envs` copies of `task` and writes every step into the replay buffer.

    Args:
        task: environment name, e.g. "dmc-walker_walk" or "toy-point_reach".
        num_envs: parallel environments (worker processes when > 1).
        action_repeat: environment frames per agent step.
        total_steps: stop training after this many environment frames (agent steps x repeat).
        prefill: environment frames collected with random actions before the first update.
        train_ratio: replayed steps per agent step; each update consumes B x T replayed steps,
            so one update is followed by B * T / train_ratio agent steps.
        eval_every: environment frames between greedy evaluations (0: only at the end).
        eval_episodes: episodes per evaluation.
        seed: environment seed; rank r of a multi-process run uses seed + 1000 r.
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
        seed: int = 0,
        video_dir: str | None = None,
    ):
        super().__init__()
        self.task, self.num_envs, self.action_repeat, self.time_limit = task, num_envs, action_repeat, time_limit
        self.total_steps, self.prefill, self.train_ratio = total_steps, prefill, train_ratio
        self.eval_every, self.eval_episodes, self.seed, self.video_dir = eval_every, eval_episodes, seed, video_dir
        probe = self._make_env(seed)
        self.spec = env_spec(probe)
        probe.close()
        self.env_steps = 0  # environment frames collected on this rank
        self.episodes = 0
        self.credit = 0.0  # agent steps owed to the train ratio
        self.last_return = float("nan")
        self.last_eval_return = float("nan")
        self.next_eval = eval_every
        self.envs: gym.vector.VectorEnv | None = None
        self.buffer = None
        self.rng: np.random.Generator | None = None
        self.restored: dict | None = None
        self.saved_buffer_at = -1

    # --------------------------------------------------------------------------- plumbing
    def _make_env(self, seed: int | None, split: str = "train") -> gym.Env:
        return make_env(self.task, self.action_repeat, self.time_limit, seed=seed, video_dir=self.video_dir, split=split)

    def state_dict(self) -> dict:
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "credit": self.credit,
            "last_return": self.last_return,
            "last_eval_return": self.last_eval_return,
            "next_eval": self.next_eval,
            "buffer_steps": self.buffer.steps_added if self.buffer is not None else 0,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state if self.rng is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.restored = dict(state)
        for key in ("env_steps", "episodes", "credit", "last_return", "last_eval_return", "next_eval"):
            setattr(self, key, state[key])

    @staticmethod
    def replay_dir(trainer: L.Trainer) -> Path:
        """Where the buffer is saved: beside the checkpoints, one folder per rank."""
        callback = trainer.checkpoint_callback
        root = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return root / "replay" / f"rank{trainer.global_rank}"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The buffer goes beside the .ckpt, not into it; saved once per env-step count.
        if self.buffer is not None and self.saved_buffer_at != self.env_steps:
            self.buffer.save(self.replay_dir(trainer))
            self.saved_buffer_at = self.env_steps

    def _restore(self, trainer: L.Trainer) -> None:
        """Buffer and RNG states of the checkpoint this fit resumes from."""
        state, self.restored = self.restored, None
        directory = self.replay_dir(trainer)
        self.buffer.load(directory)
        if self.buffer.steps_added != state["buffer_steps"]:
            raise ValueError(
                f"replay buffer in {directory} holds {self.buffer.steps_added} steps but the checkpoint "
                f"expects {state['buffer_steps']}: it belongs to another checkpoint; resume from last.ckpt"
            )
        torch.set_rng_state(state["torch_rng"])
        if state["numpy_rng"] is not None:
            self.rng.bit_generator.state = state["numpy_rng"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.rank_seed = self.seed + 1000 * trainer.global_rank
        size = pl_module.world_model.size
        trainer.datamodule.create_buffer(
            self.num_envs, self.spec.observation_shapes, self.spec.action_dim, (size.deter, size.stoch, size.classes)
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after a checkpoint restore (counters are back) and before the fit loop fetches its
        # first batch, so the buffer is reloaded and prefilled in time; the envs start fresh.
        self.envs = make_vector_env(
            self.task, self.num_envs, self.action_repeat, seed=self.rank_seed + self.episodes,
            time_limit=self.time_limit, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, video_dir=self.video_dir,
        )
        self.rng = np.random.default_rng(self.rank_seed + self.env_steps)
        self.obs, _ = self.envs.reset(seed=self.rank_seed + self.episodes)
        self.is_first = np.ones(self.num_envs, bool)
        self.done = np.zeros(self.num_envs, bool)
        self.act_state = None
        self.episode_return = np.zeros(self.num_envs)
        self.episode_length = np.zeros(self.num_envs, int)
        self.episode_success = np.zeros(self.num_envs, bool)
        self.finished: list[tuple[float, int, bool]] = []
        self.buffer = trainer.datamodule.buffer
        if self.restored is not None:
            self._restore(trainer)
        self._add(np.zeros((self.num_envs, self.spec.action_dim), np.float32), np.zeros(self.num_envs), self.done, self.done)
        self.clock = (time.perf_counter(), self.env_steps, trainer.global_step)
        self.fps = self.updates_per_second = 0.0
        needed = max(self.prefill, trainer.datamodule.sequence_length * self.action_repeat * self.num_envs)
        while self.env_steps < needed or len(self.buffer) < trainer.datamodule.sequence_length * self.num_envs:
            self.step(pl_module, random=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        trainer.datamodule.write_back(outputs)
        dm = trainer.datamodule
        self.credit += dm.batch_size * dm.sequence_length / self.train_ratio
        while self.credit >= self.num_envs:
            self.step(pl_module)
            self.credit -= self.num_envs
        if self.eval_every and self.env_steps >= self.next_eval:
            self.next_eval += self.eval_every
            self.evaluate(trainer, pl_module)
        self._log(trainer, pl_module)
        if self.env_steps >= self.total_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_episodes:
            self.evaluate(trainer, pl_module)
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None

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
        action, self.act_state = self._act(pl_module, self.obs, self.is_first, self.act_state, "sample")
        return action

    def step(self, pl_module: L.LightningModule, random: bool = False) -> None:
        """One step of every env; NEXT_STEP autoreset: the step after an episode's last one
        returns the next episode's first observation and ignores the action."""
        action = self._random_action() if random else self._policy_action(pl_module)
        self.obs, reward, terminated, truncated, info = self.envs.step(self._to_env(action))
        self.is_first = self.done
        self.done = terminated | truncated
        self._add(action, reward, terminated, self.done)
        self.env_steps += self.num_envs * self.action_repeat
        live = ~self.is_first
        self.episode_return += np.where(live, reward, 0.0)
        self.episode_length += live
        if "success" in info:
            self.episode_success |= np.asarray(info["success"], bool) & live
        for i in np.flatnonzero(self.done):
            self.episodes += 1
            self.last_return = float(self.episode_return[i])
            self.finished.append((self.last_return, int(self.episode_length[i]), bool(self.episode_success[i])))
            self.episode_return[i], self.episode_length[i], self.episode_success[i] = 0.0, 0, False

    def _add(self, action, reward, terminated, last) -> None:
        first = self.is_first
        self.buffer.add(
            {
                **self.obs,
                "action": np.where(first[:, None], 0.0, action).astype(np.float32),
                "reward": np.where(first, 0.0, reward).astype(np.float32),
                "is_first": first.copy(),
                "is_last": np.asarray(last, bool) & ~first,
                "is_terminal": np.asarray(terminated, bool) & ~first,
            }
        )

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Greedy episodes on a separate env; logs and returns the mean return."""
        env = self._make_env(self.rank_seed + 10**6 + self.episodes, split="eval")
        returns, successes, frames = [], [], []
        for episode in range(self.eval_episodes):
            obs, _ = env.reset()
            state, first, total, success, done = None, True, 0.0, False, False
            while not done:
                if episode == 0 and "image" in obs:
                    frames.append(obs["image"])
                action, state = self._act(pl_module, {k: v[None] for k, v in obs.items()}, np.array([first]), state, "greedy")
                obs, reward, terminated, truncated, info = env.step(self._to_env(action[0]))
                total += float(reward)
                success |= bool(info.get("success", False))
                first, done = False, terminated or truncated
            returns.append(total)
            successes.append(success)
        env.close()
        self._log_video(trainer, frames)
        self.last_eval_return = float(np.mean(returns))
        self._log_to_loggers(trainer, {
            "eval/return": self.last_eval_return,
            "eval/return_std": float(np.std(returns)),
            "eval/success": float(np.mean(successes)),
        })
        return self.last_eval_return

    # --------------------------------------------------------------------------- logging
    def _log_to_loggers(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        """Metrics against environment frames, the x axis of every published curve; also moves
        the env-step logger's clock, which Lightning's own logging then uses."""
        for logger in trainer.loggers:
            if isinstance(logger, EnvStepMLFlowLogger):
                logger.env_steps = self.env_steps
            if trainer.is_global_zero:
                logger.log_metrics(metrics, step=self.env_steps)

    def _log_video(self, trainer: L.Trainer, frames: list[np.ndarray]) -> None:
        """The first evaluation episode as a GIF artifact, `videos/eval_<env frames>.gif`."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not frames or not loggers or not trainer.is_global_zero:
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"eval_{self.env_steps:09d}.gif"
            imageio.mimsave(path, frames, duration=50, loop=0)
            for logger in loggers:
                logger.experiment.log_artifact(logger.run_id, str(path), "videos")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        start, steps, updates = self.clock
        if now - start >= 10.0:  # a window long enough for slow (CPU, size12M) runs
            self.fps = (self.env_steps - steps) / (now - start)
            self.updates_per_second = (trainer.global_step - updates) / (now - start)
            self.clock = (now, self.env_steps, trainer.global_step)
        log_now = trainer.global_step % max(1, trainer.log_every_n_steps) == 0
        if self.finished and log_now:
            # One write per logging interval: the mean over the episodes that ended in it.
            returns, lengths, successes = map(np.asarray, zip(*self.finished))
            self._log_to_loggers(trainer, {
                "episode/return": float(returns.mean()),
                "episode/length": float(lengths.mean()),
                "episode/success": float(successes.mean()),
                "episode/count": float(len(returns)),
            })
            self.finished.clear()
        progress = {
            "env_steps": float(self.env_steps),
            "fps": self.fps,
            "updates/s": self.updates_per_second,
            "return": self.last_return,
        }
        pl_module.log_dict(progress, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if log_now:
            self._log_to_loggers(trainer, {"env/fps": progress["fps"], "env/updates_per_second": progress["updates/s"],
                                           "env/episodes": float(self.episodes), "train/updates": float(trainer.global_step)})

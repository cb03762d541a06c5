"""A probe dataset: episodes with the simulator's true state behind every observation, split by
episode into a train and a held-out set, collected once and reused by every objective and seed.

`collect` plays episodes through the env factory the training uses (`wm.envs.make_env`), with
uniformly random actions or a trained checkpoint's policy (sampled, with a share `epsilon` of
random actions), and keeps for every step the observation, the action that led to it, reward,
flags and the env's `true_state()` groups (`state.<group>` keys). Each split is stored as a replay
buffer of one env stream, its episodes one after another, in the replay store's chunk files
(`datamodules.replay_store`): the same layout as a run's replay, read back with its checks.
`dataset.json`, written last, says what the folder holds; a folder without it is an unfinished
collection, which `collect` may overwrite. It is the dataset's card: the policy mix (policy,
epsilon), and what the recorded actions alone tell of the state (the action anchor's R²), since a
dataset whose state the actions give away cannot show what the images add. Held-out episodes of
dmc_distracting are played again, with the same seeds and actions, on background clips the
training never shows (a video folder's `eval/` clips, or the procedural source's eval seed).
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datamodules.replay_buffer import ReplayBuffer
from datamodules.replay_store import ReplayStore, new_save_id
from wm.run.files import atomic_write

STATE_PREFIX = "state."  # buffer keys of the true-state groups
SPLITS = ("train", "heldout")
INFO = "dataset.json"


@dataclass(frozen=True)
class Collection:
    """What to collect: `frames` env frames (at least) of `task`, episode i reset with seed + i.

    `policy`: a checkpoint whose policy acts (sampling its action distribution), or None for
    uniformly random actions; `epsilon`: the share of steps that take a random action instead.
    Every `heldout_every`-th episode goes to the held-out split.
    """

    task: str
    frames: int
    action_repeat: int = 2
    time_limit: int | None = None
    seed: int = 0
    policy: str | None = None
    epsilon: float = 0.0
    heldout_every: int = 5
    video_dir: str | None = None


def random_action(space, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random action as the model writes it (one-hot where discrete)."""
    if hasattr(space, "n"):
        return np.eye(int(space.n), dtype=np.float32)[rng.integers(int(space.n))]
    return rng.uniform(-1.0, 1.0, space.shape).astype(np.float32)


CHUNK_FRAMES = 2000  # env frames per unit of work (a worker's task, a step of the progress bar)


def play_episodes(collection: Collection, first_episode: int, frames: int, indices: list[int] | None = None,
                  split: str = "train") -> tuple[list[dict[str, np.ndarray]], bool]:
    """Episodes first_episode, first_episode + 1, ... until they hold `frames` env frames (or the
    episodes `indices`), each as arrays with one row per observation (the first with a zero action
    and reward); and whether the actions are discrete. Episode i resets with seed + i and draws its
    random actions from its own generator, so it can be played again; `split` chooses the
    background clips of dmc_distracting ("eval": clips the training never shows)."""
    from wm.envs import make_env  # in a worker process, the simulators load here

    env = make_env(collection.task, collection.action_repeat, collection.time_limit, video_dir=collection.video_dir,
                   split=split)
    discrete = hasattr(env.action_space, "n")
    agent = None
    if collection.policy is not None:
        from wm.agent.agent import Agent

        agent = Agent.from_checkpoint(collection.policy).eval()
    episodes, played = [], 0
    todo = iter(indices) if indices is not None else itertools.count(first_episode)
    try:
        for index in todo:
            if indices is None and played >= frames:
                break
            episodes.append(play_episode(env, agent, collection, index))
            played += (len(episodes[-1]["reward"]) - 1) * collection.action_repeat
    finally:
        env.close()
    return episodes, discrete


def play_episode(env, agent, collection: Collection, index: int) -> dict[str, np.ndarray]:
    """Episode `index` of the collection (see `play_episodes`)."""
    discrete = hasattr(env.action_space, "n")
    rng = np.random.default_rng([collection.seed, index])
    obs, _ = env.reset(seed=collection.seed + index)
    action = np.zeros_like(random_action(env.action_space, rng))
    rows = [step_row(obs, action, 0.0, True, False, False, env.unwrapped.true_state())]
    state, done = None, False
    while not done:
        if agent is not None:  # the policy sees every observation, also where epsilon overrides it
            batch = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
            batch["is_first"] = torch.tensor([len(rows) == 1])
            chosen, state = agent.act(batch, state, mode="sample")
            action = chosen[0].float().numpy()
        if agent is None or rng.random() < collection.epsilon:
            action = random_action(env.action_space, rng)
            if state is not None:  # the recurrent state continues from the action really taken
                state = state._replace(action=torch.as_tensor(action)[None])
        obs, reward, terminated, truncated, _ = env.step(int(action.argmax()) if discrete else action)
        done = terminated or truncated
        rows.append(step_row(obs, action, reward, False, done, terminated, env.unwrapped.true_state()))
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def step_row(obs, action, reward, first, last, terminal, state) -> dict[str, np.ndarray]:
    return {**{k: np.asarray(v) for k, v in obs.items()}, "action": np.asarray(action, np.float32),
            "reward": np.float32(reward), "is_first": np.bool_(first), "is_last": np.bool_(last),
            "is_terminal": np.bool_(terminal), **{STATE_PREFIX + k: np.asarray(v, np.float32) for k, v in state.items()}}


def collect(collection: Collection, out: Path, workers: int = 1) -> "ProbeDataset":
    """Collect `collection` into the folder `out` (refused if it already holds a dataset).

    The frames are played in units of CHUNK_FRAMES: unit k plays episodes k * 10^6, k * 10^6 + 1,
    ... so the dataset is the same whatever the number of workers, which only run units side by side.
    """
    out = Path(out)
    if (out / INFO).exists():
        raise FileExistsError(f"{out} already holds a probe dataset ({INFO}); give another --out or delete it")
    if out.exists():  # an unfinished collection
        shutil.rmtree(out)
    started = time.perf_counter()
    units = [min(CHUNK_FRAMES, collection.frames - start) for start in range(0, collection.frames, CHUNK_FRAMES)]
    parts = []
    with tqdm(total=collection.frames, desc=f"Collecting {collection.task}", unit="frames", unit_scale=True,
              file=sys.stdout, dynamic_ncols=True) as bar:
        if workers == 1:
            for k, frames in enumerate(units):
                parts.append(play_episodes(collection, k * 10**6, frames))
                bar.update(frames)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
                futures = [pool.submit(play_episodes, collection, k * 10**6, frames) for k, frames in enumerate(units)]
                for future, frames in zip(futures, units):
                    parts.append(future.result())
                    bar.update(frames)
    episodes = [episode for part, _ in parts for episode in part]
    indices = [k * 10**6 + j for k, (part, _) in enumerate(parts) for j in range(len(part))]
    discrete = parts[0][1]
    held = [i % collection.heldout_every == collection.heldout_every - 1 for i in range(len(episodes))]
    if not any(held):
        raise ValueError(f"{len(episodes)} episodes leave none for the held-out split (every {collection.heldout_every}th): "
                         "collect more frames or lower --heldout-every")
    backgrounds = collection.task.startswith("dmc_distracting-")
    if backgrounds:  # held-out episodes played again (same seed and actions) on clips the training never shows
        played, _ = play_episodes(collection, 0, 0, [index for index, h in zip(indices, held) if h], split="eval")
        again = iter(played)
        episodes = [next(again) if h else episode for episode, h in zip(episodes, held)]
    splits = {name: [e for e, h in zip(episodes, held) if h == (name == "heldout")] for name in SPLITS}
    info = {
        "task": collection.task, "action_repeat": collection.action_repeat, "time_limit": collection.time_limit,
        "seed": collection.seed, "frames": collection.frames, "policy": collection.policy or "random",
        "epsilon": collection.epsilon, "heldout_every": collection.heldout_every, "video_dir": collection.video_dir,
        "heldout_backgrounds": "eval clips (never in training)" if backgrounds else None, "discrete": discrete,
        "command": " ".join(sys.argv),
    }
    return write_dataset(out, splits, info, started)


def write_dataset(out: Path, splits: dict[str, list[dict[str, np.ndarray]]], info: dict,
                  started: float | None = None) -> "ProbeDataset":
    """Store the episodes of each split (as `play_episodes` makes them) in `out` with their card:
    `info` (what was collected, and how) completed with the shapes, the splits, the seconds since
    `started` and the action anchor; dataset.json written last."""
    first = splits["train"][0]
    observations = {k: list(v.shape[1:]) for k, v in first.items()
                    if k not in ("action", "reward", "is_first", "is_last", "is_terminal") and not k.startswith(STATE_PREFIX)}
    groups = {k.removeprefix(STATE_PREFIX): int(v.shape[1]) for k, v in first.items() if k.startswith(STATE_PREFIX)}
    info = {**info, "observation_shapes": observations, "groups": groups, "action_dim": int(first["action"].shape[1]),
            "splits": {}}
    for name, split in splits.items():
        buffer = ReplayBuffer(sum(len(e["reward"]) for e in split), 1,
                              {**{k: tuple(v) for k, v in observations.items()},
                               **{STATE_PREFIX + g: (d,) for g, d in groups.items()}}, info["action_dim"])
        for episode in split:
            for t in range(len(episode["reward"])):
                buffer.add({k: v[t][None] for k, v in episode.items()})
        manifest = ReplayStore(out / name).save(buffer, new_save_id())
        info["splits"][name] = {"manifest": manifest, "episodes": len(split), "steps": buffer.rows_added,
                                "frames": sum((len(e["reward"]) - 1) for e in split) * info.get("action_repeat", 1)}
    info["seconds"] = round(time.perf_counter() - started, 1) if started is not None else 0.0
    info["action_anchor"] = action_anchor_card(ProbeDataset(out, info))
    text = json.dumps(info, indent=1).encode()
    atomic_write(out / INFO, lambda f: f.write(text))
    return ProbeDataset(out)


def action_anchor_card(dataset: "ProbeDataset") -> dict:
    """What the actions alone tell of this dataset's state (`wm.probe.evaluate.action_anchor`), for
    its card: a dataset whose state the actions give away cannot show what the images add."""
    from wm.probe.evaluate import action_anchor

    result = action_anchor(dataset)
    return {"overall_r2": round(result.overall(), 4), "lags": result.action_lags,
            "r2": {group: round(r2, 4) for (_, group), r2 in result.r2.items()}, "not_counted": result.not_counted}


class ProbeDataset:
    """A collected dataset: its description and its splits as replay buffers."""

    def __init__(self, folder: str | Path, info: dict | None = None):
        """`info`: the description of a collection not yet finished (its dataset.json not written)."""
        self.folder = Path(folder)
        if info is None and not (self.folder / INFO).is_file():
            raise FileNotFoundError(f"{self.folder} holds no probe dataset ({INFO} is missing): make one with "
                                    "`python -m wm.probe collect`")
        self.info = info if info is not None else json.loads((self.folder / INFO).read_text())
        self._buffers: dict[str, ReplayBuffer] = {}

    @functools.cached_property
    def not_counted(self) -> dict[str, str]:
        """The groups an overall mean leaves out, each with the group it repeats
        (`wm.probe.evaluate.duplicate_groups` of the train split): computed once per dataset."""
        from wm.probe.evaluate import duplicate_groups

        return duplicate_groups(self.states("train"))

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def groups(self) -> dict[str, int]:
        return self.info["groups"]

    @property
    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.info["observation_shapes"].items()}

    def split(self, name: str) -> ReplayBuffer:
        """The split's steps, loaded (and checked against their checksums) once."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name not in self._buffers:
            self._buffers[name] = ReplayStore(self.folder / name).open(self.info["splits"][name]["manifest"])
        return self._buffers[name]

    def steps(self, name: str) -> dict[str, torch.Tensor]:
        """Every stored step of a split, in order: (N, ...) arrays of its one env stream."""
        buffer = self.split(name)
        return {k: v[: buffer.rows_added, 0] for k, v in buffer.arrays.items()}

    def states(self, name: str) -> dict[str, torch.Tensor]:
        """The true-state groups of every step of a split, (N, dim) float32."""
        return {g: v for k, v in self.steps(name).items() if (g := k.removeprefix(STATE_PREFIX)) != k}

    def windows(self, name: str, length: int) -> Iterator[dict[str, torch.Tensor]]:
        """A split cut into consecutive (1, length) windows (the last one shorter), in order."""
        steps = self.steps(name)
        total = len(steps["reward"])
        for start in range(0, total, length):
            yield {k: v[start : start + length][None] for k, v in steps.items()}

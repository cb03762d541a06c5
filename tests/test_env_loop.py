"""The env loop's bookkeeping around episode boundaries, under the NEXT_STEP autoreset it runs:
the rows it writes to a real replay buffer, the episodes it records, the agent's per-env state,
and how many agent steps follow each update.

A scripted task, registered as "toy-scripted" and built by the real factory (action repeat,
time limit, RestartingVectorEnv workers), ends its episodes at known frames, so the expected
rows are written out below. The trainer is a stand-in with only what EnvLoop reads; the agent
is a real size1M Agent.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from gymnasium import spaces

import callbacks.env_loop
from callbacks.env_loop import EnvLoop
from wm.run.cli import WMCLI
from wm.run.cli import main as cli_main
from datamodules import ReplayDataModule
from wm.agent.agent import ActState, Agent
from wm.envs.base import PixelEnv
from wm.envs.toy import TOY_TASKS
from wm.objectives import Barlow

REPO = Path(__file__).resolve().parents[1]
SEED = 7  # EnvLoop seed: env i is reset with SEED + i
LIMIT = 4  # frames: the time limit the factory gives the scripted task at action repeat 1
# Per env, its episodes in turn: terminated after that many frames, or None: truncated by the time limit.
SCRIPTS = ([2, None, 3, 1], [3, 1, None, LIMIT])
# The first 16 rows each env must get. F: is_first; ".": mid-episode; T: is_last and is_terminal;
# L: is_last only (truncated). Env 1's last episode terminates exactly at the time limit: terminal.
EXPECTED_ROWS = (
    "F.TF...LF..TFTF.",
    "F..TFTF...LF...T",
)


def scripted_reward(env: int, frame: int) -> float:
    """What env `env` pays for the `frame`-th frame (from 1) of an episode."""
    return 10.0 * (env + 1) + frame


class Scripted(PixelEnv):
    """Plays its env's script; observes [env, episode, frame, action it received (2)] as `state`."""

    episode_steps = LIMIT

    def __init__(self, image_size: int = 64) -> None:
        super().__init__(image_size)
        self.observation_space = spaces.Dict(
            {**self.observation_space.spaces, "state": spaces.Box(-np.inf, np.inf, (5,), np.float32)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.size, self.env, self.episode, self.frame = image_size, 0, -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # a seeded reset starts the script again
            self.env, self.episode = seed - SEED, -1
        self.episode, self.frame = self.episode + 1, 0
        return self._state_obs(np.zeros(2)), {}

    def step(self, action):
        self.frame += 1
        script = SCRIPTS[self.env]
        end = script[self.episode % len(script)]
        return self._state_obs(action), scripted_reward(self.env, self.frame), self.frame == end, False, {}

    def _state_obs(self, action) -> dict[str, np.ndarray]:
        image = np.zeros((self.size, self.size, 3), np.uint8)
        return {**self._observe(image), "state": np.array([self.env, self.episode, self.frame, *action], np.float32)}


@pytest.fixture(autouse=True)
def scripted_task(monkeypatch):
    # The factory builds "toy-<name>" from TOY_TASKS; toy workers fork, so they see it too.
    monkeypatch.setitem(TOY_TASKS, "scripted", Scripted)


@pytest.fixture(scope="module")
def agent() -> Agent:
    torch.manual_seed(0)
    return Agent({"image": (64, 64, 3), "state": (5,)}, 2, objective=Barlow(), size="size1M")


def start(agent, num_envs=2, action_repeat=1, prefill=30, train_ratio=16.0, batch_size=4, sequence_length=8):
    """An EnvLoop through setup and on_fit_start (prefill), with a real data module and buffer."""
    loop = EnvLoop("toy-scripted", num_envs=num_envs, action_repeat=action_repeat, prefill=prefill,
                   train_ratio=train_ratio, eval_every=0, eval_episodes=0, seed=SEED)
    dm = ReplayDataModule(batch_size=batch_size, sequence_length=sequence_length, capacity=1000)
    trainer = SimpleNamespace(datamodule=dm, callbacks=[], global_rank=0, global_step=0, log_every_n_steps=1,
                              loggers=[], is_global_zero=True, should_stop=False, progress_bar_callback=None,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    loop.setup(trainer, agent, "fit")
    loop.on_fit_start(trainer, agent)
    return loop, trainer


def rows(loop: EnvLoop, name: str, count: int) -> np.ndarray:
    """The first `count` rows of a buffer array, as numpy (rows, envs, ...)."""
    assert loop.buffer.rows_added >= count
    return loop.buffer.arrays[name][:count].numpy()


def spell(first, last, terminal) -> list[str]:
    """Each env's rows in the EXPECTED_ROWS alphabet."""
    def char(f, la, te):
        return "F" if f else ("T" if te else "L") if la else "."
    return ["".join(map(char, first[:, i], last[:, i], terminal[:, i])) for i in range(first.shape[1])]


def expected_episodes() -> list[tuple[float, int, bool | None, dict]]:
    """(return, length, success: None, as the scripted envs report none, achievements) of every
    episode EXPECTED_ROWS ends, in the order they end
    (envs ending at the same row: by env index); returns summed from scripted_reward."""
    episodes, starts = [], [0] * len(EXPECTED_ROWS)
    for row in range(len(EXPECTED_ROWS[0])):
        for env, spelled in enumerate(EXPECTED_ROWS):
            if spelled[row] == "F":
                starts[env] = row
            elif spelled[row] in "TL":
                length = row - starts[env]
                episodes.append((sum(scripted_reward(env, t) for t in range(1, length + 1)), length, None, {}))
    return episodes


def test_rows_follow_the_episode_ends_of_each_env(agent):
    loop, _ = start(agent)  # prefill: 30 frames, 15 vector steps after the reset row
    n = len(EXPECTED_ROWS[0])
    try:
        assert loop.buffer.rows_added == n and loop.env_steps == 2 * (n - 1)
        first, last, terminal = (rows(loop, k, n) for k in ("is_first", "is_last", "is_terminal"))
        assert spell(first, last, terminal) == list(EXPECTED_ROWS)
        state, action, reward = rows(loop, "state", n), rows(loop, "action", n), rows(loop, "reward", n)
        # The observations line up with the flags: frame 0 of a new episode on each is_first row.
        assert np.array_equal(state[..., 2] == 0, first)
        assert np.array_equal(state[..., 0], np.broadcast_to(np.arange(2), (n, 2)))
        # `action` is the action that led to the row's observation (the env echoes what it got);
        # none leads to a first observation, though the loop passed one that the autoreset ignored.
        live = ~first
        assert np.array_equal(action[live], state[..., 3:][live]) and np.all(action[live] != 0)
        assert not action[first].any() and not reward[first].any()
        expected_reward = 10.0 * (np.arange(2) + 1) + state[..., 2]
        assert np.array_equal(reward[live], expected_reward[live])
        # Finished episodes: returns are the sums of what the env paid, lengths count frames.
        assert loop.finished == expected_episodes()
        assert loop.episodes == len(loop.finished) == 8
        assert loop.last_return == expected_episodes()[-1][0]
        assert list(loop.current.length) == [1, 0]  # env 0: one frame into an episode; env 1 just ended one
    finally:
        loop.close()


def env_row(state: ActState, i: int) -> ActState:
    return ActState(state.latent.map(lambda t: t[i : i + 1]), state.action[i : i + 1])


def test_only_the_env_that_restarts_gets_a_fresh_state(agent):
    loop, _ = start(agent)
    mixed = 0
    try:
        for _ in range(16):
            obs, first, before = loop.obs, loop.is_first.copy(), loop.act_state
            loop.step(agent)
            if before is None:  # the first policy step after prefill starts every env afresh
                continue
            mixed += first[0] != first[1]
            for i in range(loop.num_envs):
                one = {k: v[i : i + 1] for k, v in obs.items()}
                _, fresh = EnvLoop._act(agent, one, np.array([True]), None, "sample")
                _, carried = EnvLoop._act(agent, one, np.array([False]), env_row(before, i), "sample")
                expected, other = (fresh, carried) if first[i] else (carried, fresh)
                deter = loop.act_state.latent.deter[i]
                torch.testing.assert_close(deter, expected.latent.deter[0], rtol=1e-5, atol=1e-5)
                assert not torch.allclose(deter, other.latent.deter[0], atol=1e-3), (i, first)
        assert mixed >= 4, "the script must restart one env while the other goes on"
    finally:
        loop.close()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("num_envs", [1, 2])
@pytest.mark.parametrize("train_ratio, per_update", [(16.0, 2.0), (24.0, 4 / 3)])
def test_agent_steps_per_update_follow_the_train_ratio(agent, num_envs, train_ratio, per_update):
    """B x T / train_ratio agent steps per update (B=4, T=8), in whole vector steps: what is
    owed is never negative and never a whole vector step; env_steps counts frames (repeat 2)."""
    loop, trainer = start(agent, num_envs, action_repeat=2, prefill=16, train_ratio=train_ratio)
    dm = trainer.datamodule
    batches = iter(dm.train_dataloader())
    frames, rows_before = loop.env_steps, dm.buffer.rows_added
    updates = 30
    try:
        for update in range(1, updates + 1):
            loop.on_train_batch_end(trainer, agent, {}, next(batches), update - 1)
            trainer.global_step = update
            agent_steps = (dm.buffer.rows_added - rows_before) * num_envs
            assert loop.env_steps - frames == 2 * agent_steps
            owed = update * per_update - agent_steps
            assert -1e-9 <= owed < num_envs, (update, agent_steps)
        assert abs(agent_steps / updates - per_update) < num_envs / updates
        assert not trainer.should_stop
    finally:
        loop.close()


@pytest.mark.parametrize("num_envs", [1, 4, 16])
def test_updates_per_env_frame_do_not_depend_on_num_envs(num_envs, monkeypatch):
    """The DMC settings (B=16, T=64, train ratio 512, action repeat 2): every update pays for
    B x T / 512 = 2 agent steps, 4 frames, with 1, 4 or 16 envs. The envs step together, so
    16 of them step once every 8 updates; what is owed stays under one vector step."""
    loop = EnvLoop("toy-scripted", num_envs=num_envs, action_repeat=2, train_ratio=512.0, eval_every=0, eval_episodes=0)

    def vector_step(pl_module):  # what EnvLoop.step counts, without the envs
        loop.env_steps += loop.num_envs * loop.action_repeat

    loop.step = vector_step
    monkeypatch.setattr(callbacks.env_loop, "log_collection", lambda loop, trainer: None)
    dm = SimpleNamespace(batch_size=16, sequence_length=64, write_back=lambda batch, outputs: None)
    trainer = SimpleNamespace(datamodule=dm, should_stop=False)
    for update in range(1, 65):
        loop.on_train_batch_end(trainer, None, {}, {}, update - 1)
        owed = 4 * update - loop.env_steps  # frames the updates so far have paid for, not yet collected
        assert 0 <= owed < 2 * num_envs, (update, loop.env_steps)
    assert loop.env_steps == 4 * 64, "64 updates: 256 frames, whatever num_envs"


class Validated(Exception):
    """Raised where the CLI would start instantiating: every config check has passed."""


class CheckOnlyCLI(WMCLI):
    def instantiate_classes(self) -> None:
        raise Validated


@pytest.mark.parametrize("config", ["dmc", "dmc_proprio", "dmc_subtle", "dmc_distracting", "metaworld", "atari100k", "crafter",
                                    "memory_maze"])
def test_shipped_configs_pass_the_checks_with_their_env_counts(config, tmp_path, capsys):
    """16 env workers for DMC and Meta-World (R2-Dreamer), one env for Atari 100k; the real CLI
    prints them and its checks (prefill, capacity per env stream, ...) accept them."""
    path = str(REPO / "configs" / f"{config}.yaml")
    with pytest.raises(SystemExit) as printed:
        cli_main(["fit", "--config", path, "--print_config"])
    assert printed.value.code == 0
    env = yaml.safe_load(capsys.readouterr().out)["env"]
    assert env["num_envs"] == (1 if config == "atari100k" else 16) and env["train_ratio"] in (128, 512)
    with pytest.raises(Validated):
        CheckOnlyCLI(args=["fit", "--config", path, "--run.root", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []

"""The Lightning callbacks of a run: the env loop that collects experience at the train ratio
(env_loop) and its greedy evaluations (evaluation), what they log (metrics), checkpoints, stop
signals, the run record, and the bar and summary (progress). They may import wm.envs, wm.agent,
wm.inspection, datamodules and the leaf modules of wm.run (files, identity, tracking, durations,
video); wm.run's commands put them together."""

from callbacks.env_loop import EnvLoop
from wm.envs.base import EnvSpec

__all__ = ["EnvLoop", "EnvSpec"]

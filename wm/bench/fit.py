"""Where the wall time of real training goes: `python -m wm.bench fit --config configs/dmc.yaml --seconds 120`.

Runs the real `python -m wm fit` (the LightningCLI of wm/run/cli.py, with the given configs and any
extra `--key value` overrides) in a temporary run root, so no run of the user's is touched. After
`--warmup` updates it measures `--seconds` of training, then stops the fit cleanly (a callback sets
`trainer.should_stop`; the final evaluation is skipped) and prints env frames/s, updates/s and the
share of the measured wall time spent in:

- env stepping: the envs' step and storing the steps in the replay buffer (EnvLoop phase "env");
- acting: the policy's actions for the envs (EnvLoop phase "act");
- updates: the training step, forward, backward and optimizer (on_train_batch_start to _end);
- replay: sampling batches, moving them to the model's device, writing the latents back;
- evaluation: evaluations during training (EnvLoop phase "eval");
- logging: EnvLoop's logging and Lightning's per-step metric logging;
- checkpointing: periodic checkpoints with their replay files;
- other: the rest (Lightning's loop, the data fetcher, the env loop's bookkeeping).

The phases are timed with `wm.model.phases.phase`, which synchronises CUDA at their edges while a
benchmark records (and costs nothing otherwise): the shares are those of the loop run serially,
each phase's GPU work counted in the phase that launched it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import psutil
import torch

import callbacks.env_loop as env_loop_module
from callbacks.checkpoint import EnvStepCheckpoint
from callbacks.env_loop import EnvLoop
from wm.run.machine import freed_memory_label, retain_freed_memory
from wm.run.cli import WMCLI
from wm.run.files import atomic_write
from wm.envs import make_vector_env
from wm.run.tracking import sqlite_uri
from wm.bench.profiling import ProcessUsage, describe_usage
from wm.model.phases import phase, start_recording, stop_recording

# (recorded phase, printed name), in the order printed; "other" is the rest of the wall time.
SHARES = (
    ("env", "env stepping"),
    ("act", "acting"),
    ("update", "updates"),
    ("replay", "replay"),
    ("eval", "evaluation"),
    ("logging", "logging"),
    ("checkpoint", "checkpointing"),
)


def _timed(fn, name: str):
    """`fn`, its calls timed as phase `name` while a benchmark records."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)
    return wrapper


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FitTimer(L.Callback):
    """Times a fit's phases for `seconds` after `warmup` updates, then stops it. Must be the
    first callback, so that its batch hooks bracket the update alone."""

    def __init__(self, seconds: float, warmup: int = 1):
        self.seconds, self.warmup = seconds, warmup
        self.created = time.perf_counter()
        self.recorder: dict[str, float] | None = None
        self.result: dict | None = None
        self.batches = 0  # updates run, warm-up included
        self.updates = 0  # measured updates
        self.update_usage: list[ProcessUsage] = []  # each measured update's wall time, CPU and page faults
        self.marks: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for callback in trainer.callbacks:
            if isinstance(callback, EnvStepCheckpoint):
                callback.save = _timed(callback.save, "checkpoint")
        connector = getattr(trainer, "_logger_connector", None)  # Lightning's own per-step logging
        if connector is not None and hasattr(connector, "update_train_step_metrics"):
            connector.update_train_step_metrics = _timed(connector.update_train_step_metrics, "logging")

    def env_loop(self, trainer: L.Trainer) -> EnvLoop:
        return next(c for c in trainer.callbacks if isinstance(c, EnvLoop))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks["fit_start"] = time.perf_counter()  # before the env loop starts its envs and prefills
        make = env_loop_module.make_vector_env

        def timed(*args, **kwargs):  # the env loop's first call starts the training envs
            env_loop_module.make_vector_env = make
            start = time.perf_counter()
            envs = make(*args, **kwargs)
            self.env_start = time.perf_counter() - start
            self.workers = worker_memory(envs)
            return envs

        env_loop_module.make_vector_env = timed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks["train_start"] = time.perf_counter()
        self.prefill_frames = self.env_loop(trainer).env_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.recorder is None and self.batches == self.warmup:
            loop = self.env_loop(trainer)
            _sync(pl_module.device)
            self.recorder = start_recording()
            self.marks["start"] = time.perf_counter()
            self.start_frames = loop.env_steps
            self.start_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        _sync(pl_module.device)
        self.batch_start = ProcessUsage.now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.recorder is None:
            return
        _sync(pl_module.device)
        usage = ProcessUsage.now() - self.batch_start
        self.recorder["update"] += usage.wall
        self.update_usage.append(usage)
        self.updates += 1
        if time.perf_counter() - self.marks["start"] >= self.seconds:
            trainer.should_stop = True
            self.env_loop(trainer).final_eval = False  # stopped early: no final evaluation to time

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recorder is None:
            return
        _sync(pl_module.device)
        end = time.perf_counter()
        stop_recording()
        loop, data = self.env_loop(trainer), trainer.datamodule
        self.result = {
            "task": loop.task, "num_envs": loop.num_envs, "size": pl_module.hparams.get("size"),
            "batch": (data.batch_size, data.sequence_length), "train_ratio": loop.train_ratio,
            "device": str(pl_module.device), "threads": torch.get_num_threads(),
            "replay_device": str(data.buffer.device) if data.buffer is not None else None,
            "setup": self.marks["fit_start"] - self.created,
            "prefill": self.marks["train_start"] - self.marks["fit_start"], "prefill_frames": self.prefill_frames,
            "env_start": getattr(self, "env_start", float("nan")), "workers": getattr(self, "workers", None),
            "warmup": self.marks["start"] - self.marks["train_start"],
            "wall": end - self.marks["start"], "frames": loop.env_steps - self.start_frames, "updates": self.updates,
            "phases": dict(self.recorder), "update_usage": list(self.update_usage),
            "graphs": (self.start_graphs, torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.start_graphs),
        }
        self.recorder = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stop_recording()  # also after an exception: no recording left on
        env_loop_module.make_vector_env = make_vector_env


def worker_memory(envs) -> tuple[float, float] | None:
    """Mean resident (RSS) and own (USS) MiB of the envs' worker processes; None without workers."""
    pids = envs.worker_pids() if getattr(envs, "asynchronous", False) else []
    if not pids:
        return None
    memory = [psutil.Process(pid).memory_full_info() for pid in pids]
    return (sum(m.rss for m in memory) / len(pids) / 2**20, sum(m.uss for m in memory) / len(pids) / 2**20)


def shares(result: dict) -> dict[str, float]:
    """Seconds per printed phase, "other" the rest of the measured wall time."""
    phases, wall = result["phases"], result["wall"]
    seconds = {name: phases.get(key, 0.0) for key, name in SHARES}
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    return seconds


def report(result: dict) -> str:
    wall = result["wall"]
    b, t = result["batch"]
    seconds_per_update = [usage.wall for usage in result["update_usage"]]
    lines = [
        f"fit benchmark: {result['task']}  {result['size']}  {result['num_envs']} envs  B={b} T={t}  "
        f"train ratio {result['train_ratio']:g}  device {result['device']}  replay on {result['replay_device']}  "
        f"threads {result['threads']}  freed memory {result['freed_memory']}",
        f"setup: {result['setup']:.1f} s  env start and prefill: {result['prefill']:.1f} s "
        f"({result['prefill_frames']} env frames)  warm-up: {result['warmup']:.1f} s",
        f"env start: {result['env_start']:.1f} s for {result['num_envs']} env{'s' * (result['num_envs'] > 1)}"
        + (f"; each worker process holds {result['workers'][0]:.0f} MiB resident (RSS), {result['workers'][1]:.0f} MiB "
           "of its own (USS: not shared with other processes)" if result["workers"] else " (in this process)"),
        f"measured: {wall:.2f} s, {result['frames']} env frames, {result['updates']} updates",
        f"compiled graphs: {result['graphs'][0]} before the measurement, {result['graphs'][1]} during it "
        "(a graph compiled during it is a recompile)",
        f"env frames/s: {result['frames'] / wall:.2f}",
        f"updates/s: {result['updates'] / wall:.3f}",
        f"seconds per update: median {statistics.median(seconds_per_update):.3f} (min "
        f"{min(seconds_per_update):.3f}, max {max(seconds_per_update):.3f}; the figure `wm.bench update` "
        "measures in isolation)",
        describe_usage(result["update_usage"]),
        "share of wall time:",
    ]
    seconds = shares(result)
    for name, value in seconds.items():
        lines.append(f"  {name:<15}{100 * value / wall:6.1f}%  {value:9.2f} s")
    lines.append(f"  {'total':<15}{100 * sum(seconds.values()) / wall:6.1f}%  {sum(seconds.values()):9.2f} s")
    inner = {k: v for k, v in result["phases"].items() if k not in dict(SHARES)}
    update = result["phases"].get("update", 0.0)
    if inner and update > 0:  # the agent's own phases, inside the updates
        lines.append("update phases (share of update time): "
                     + ", ".join(f"{k} {100 * v / update:.1f}%" for k, v in inner.items()))
    return "\n".join(lines)


class BenchCLI(WMCLI):
    """The real CLI, with the timer as the trainer's first callback."""

    timer: FitTimer

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.insert(0, self.timer)
        return trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", required=True,
                        help="a `python -m wm fit` config (repeat for more, e.g. an objective)")
    parser.add_argument("--seconds", type=float, default=120.0, help="wall seconds of training to measure")
    parser.add_argument("--warmup", type=int, default=1, help="updates before the measurement starts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (--run.threads; 0: the fit's rule)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def summary(result: dict) -> dict:
    """The measurement as plain data: what `report` prints, per-update figures included."""
    seconds_per_update = [usage.wall for usage in result["update_usage"]]
    plain = {k: v for k, v in result.items() if k != "update_usage"}
    plain.update(update_usage=[dataclasses.asdict(u) for u in result["update_usage"]],
                 frames_per_second=result["frames"] / result["wall"], updates_per_second=result["updates"] / result["wall"],
                 median_update=statistics.median(seconds_per_update), shares=shares(result))
    return plain


def run(args: argparse.Namespace) -> None:
    """Run and report; extra `--key value` fit options come in `args.overrides` (a list)."""
    retained = retain_freed_memory()
    timer = FitTimer(args.seconds, args.warmup)
    BenchCLI.timer = timer
    with tempfile.TemporaryDirectory(prefix="wm-bench-fit-") as root:
        cli_args = ["fit", *(a for config in args.config for a in ("--config", config)),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    *getattr(args, "overrides", []), *(["--run.threads", str(args.threads)] if args.threads else []),
                    # the run lives and is tracked in the temporary root, whatever the configs say
                    "--run.root", root, "--run.name", "bench", "--run.tracking_uri", sqlite_uri(Path(root) / "mlflow.db")]
        argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads `cli_args` only (and says so when argv has more)
        try:
            BenchCLI(args=cli_args)
        finally:
            sys.argv = argv
    if timer.result is None:
        print(f"fit benchmark: the fit ended before {args.warmup} warm-up updates; nothing was measured")
        return
    result = {**timer.result, "freed_memory": freed_memory_label(retained)}
    print(report(result), flush=True)
    if args.json:
        text = json.dumps(summary(result), indent=1).encode()
        atomic_write(Path(args.json), lambda f: f.write(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wm.bench fit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    run(args)

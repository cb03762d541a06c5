"""`python -m wm.bench update|params|replay`: the speed and memory of one training update, the
parameter table, and the cost of a replay save (see wm/bench/__init__.py for every mode)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from datamodules import ReplayBuffer, ReplayStore
from wm.agent.agent import Agent
from wm.probe.offline import OfflineWorldModel
from wm.run.machine import freed_memory_label, retain_freed_memory
from wm.run.files import atomic_write
from wm.objectives import OBJECTIVES, make_objective
from wm.run.machine import choose_threads
from wm.agent.agent import set_compile_cache
from wm.bench.profiling import ProcessUsage, ProfileBatch, describe_usage
from wm.model.phases import start_recording, stop_recording
from wm.model.sizes import SIZES
from wm.agent.synthetic import random_batch
from wm.run.validation import effective_precision, fallback_message

PHASES = ("encode", "observe", "objective", "imagine", "backward", "optimizer")
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class RepeatBatch(IterableDataset):
    """The same batch forever: the benchmark measures the update, not the replay."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class UpdateTimer(L.Callback):
    """Wall time, phase times and process usage (CPU, page faults) of every training batch."""

    def __init__(self):
        self.phases: list[dict[str, float]] = []
        self.usage: list[ProcessUsage] = []

    @property
    def seconds(self) -> list[float]:
        """Each batch's wall time."""
        return [usage.wall for usage in self.usage]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.current = start_recording()
        self.start = ProcessUsage.now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.usage.append(ProcessUsage.now() - self.start)
        stop_recording()
        self.phases.append(dict(self.current))


def build_agent(args: argparse.Namespace) -> tuple[Agent | OfflineWorldModel, dict[str, tuple[int, ...]]]:
    """The agent `args` describes, or with --world-model-only the offline world model of
    `wm.probe train` (its update: the world model's loss alone, no imagination or actor-critic)."""
    shapes = {"image": (args.image_size, args.image_size, 3)}
    common = dict(discrete=args.discrete, objective=make_objective(args.objective), size=args.size,
                  compile=getattr(args, "compile", False))
    if getattr(args, "world_model_only", False):
        return OfflineWorldModel(shapes, args.action_dim, **common), shapes
    return Agent(shapes, args.action_dim, compile_scope=getattr(args, "compile_scope", "regions"), **common), shapes


def update_loss(model: Agent | OfflineWorldModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss one update of `model` minimises, computed eagerly."""
    if isinstance(model, OfflineWorldModel):
        return model.world_model.loss(batch).loss
    return model.losses(batch)[0]


def update_gflop(agent: Agent | OfflineWorldModel, batch: dict[str, torch.Tensor]) -> float:
    """Matmul and conv GFLOP of one update, forward and backward (counted eagerly on a copy)."""
    clone = copy.deepcopy(agent)
    with FlopCounterMode(display=False) as counter:
        update_loss(clone, batch).backward()
    return counter.get_total_flops() / 1e9


def peak_matmul_gflops(dtype: torch.dtype, device: str, size: int = 4096, repeats: int = 5) -> float:
    """This machine's matmul throughput: the best of `repeats` square matmuls."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def train(agent: Agent, batch: dict[str, torch.Tensor], args: argparse.Namespace, precision: str, steps: int,
          callbacks: list[L.Callback]) -> None:
    """`steps` updates of `agent` on `batch` through a Lightning Trainer."""
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(agent, DataLoader(RepeatBatch(batch), batch_size=None))


def measure_update(args: argparse.Namespace) -> dict:
    """Real updates of the agent `args` describes, and what they cost: the figures as plain data
    (what `bench_update` prints and `--json` writes)."""
    retained = retain_freed_memory()
    torch.manual_seed(0)
    requested = PRECISIONS[args.precision]
    precision = effective_precision(requested, args.device)
    torch.set_num_threads(choose_threads(args.threads)[0])  # the fit's rule, so that the two figures compare
    if args.compile:
        if args.cold:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="wm-compile-cold-")
        set_compile_cache()
        torch._dynamo.utils.counters.clear()
    agent, shapes = build_agent(args)
    batch = random_batch(shapes, args.action_dim, args.discrete, args.batch, args.length)
    gflop = update_gflop(agent, batch)
    timer = UpdateTimer()
    profiled = args.warmup + args.updates  # one more update, profiled and not timed
    profiler = ProfileBatch(profiled)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(agent, batch, args, precision, profiled + 1, [timer, profiler])
    measured = timer.seconds[args.warmup : profiled]
    median = statistics.median(measured)
    result = {
        "objective": args.objective, "size": args.size, "batch": args.batch, "length": args.length,
        "requested_precision": requested, "precision": precision, "device": args.device,
        "threads": torch.get_num_threads(), "compile": args.compile,
        "compile_scope": args.compile_scope if args.compile else None, "freed_memory": freed_memory_label(retained),
        "world_model_only": getattr(args, "world_model_only", False),
        "parameters": agent.parameter_table(), "seconds": measured, "median": median, "warmup": args.warmup,
        "usage": describe_usage(timer.usage[args.warmup : profiled]), "gflop": gflop,
        "host_syncs": sum(profiler.counts.syncs.values()), "sync_ops": dict(profiler.counts.syncs),
        "aten_ops": profiler.counts.aten_ops, "leaf_ops": profiler.counts.leaf_ops,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
    }
    if args.compile:
        counters = torch._dynamo.utils.counters
        result.update(first_update=timer.seconds[0], compile_seconds=timer.seconds[0] - median,
                      cold=args.cold, cache=os.environ["TORCHINDUCTOR_CACHE_DIR"],
                      graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
        if args.cold:  # the same compile again, from the cache the cold one filled: what a later run pays
            torch._dynamo.reset()
            warm = UpdateTimer()
            agent, _ = build_agent(args)
            train(agent, batch, args, precision, 1, [warm])
            result.update(warm_first_update=warm.seconds[0], warm_compile_seconds=warm.seconds[0] - median)
    else:
        phases = timer.phases[args.warmup : profiled]
        mean_total = statistics.fmean(measured)
        shares = {name: statistics.fmean(p.get(name, 0.0) for p in phases) for name in PHASES}
        shares["other"] = max(0.0, mean_total - sum(shares.values()))
        result.update(mean=mean_total, phases=shares)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    result.update(matmul_dtype=str(dtype).removeprefix("torch."), peak_gflops=peak_matmul_gflops(dtype, args.device))
    return result


def describe_update(result: dict) -> str:
    """The measurement as the lines `python -m wm.bench update` prints."""
    measured, median = result["seconds"], result["median"]
    mode = f"compiled ({result['compile_scope']})" if result["compile"] else "eager"
    scope = "world-model update (wm.probe train)  " if result.get("world_model_only") else ""
    lines = [f"{scope}objective {result['objective']}  size {result['size']}  B={result['batch']} T={result['length']}  "
             f"precision {result['precision']}  device {result['device']}  threads {result['threads']}  {mode}  "
             f"freed memory {result['freed_memory']}",
             result["parameters"],
             f"median seconds per update: {median:.3f}  (min {min(measured):.3f}, max {max(measured):.3f}, "
             f"{len(measured)} updates after {result['warmup']} warm-up)",
             result["usage"]]
    if result["compile"]:
        lines.append(f"compile: first update {result['first_update']:.1f} s, i.e. {result['compile_seconds']:.1f} s of "
                     f"compilation ({'cold' if result['cold'] else 'warm or cold'} cache at {result['cache']}); "
                     f"graphs {result['graphs']}, graph breaks {result['graph_breaks']}")
        if result["cold"]:
            lines.append(f"compile: warm, from that cache: first update {result['warm_first_update']:.1f} s, i.e. "
                         f"{result['warm_compile_seconds']:.1f} s of compilation")
    else:
        for name, seconds in result["phases"].items():
            lines.append(f"  {name:<10}{seconds:8.3f} s  {100 * seconds / result['mean']:5.1f}%")
    lines.append(f"one update: {result['host_syncs']} host syncs {result['sync_ops'] or ''}, {result['aten_ops']} aten ops "
                 f"dispatched, {result['leaf_ops']} leaf aten ops")
    achieved = result["gflop"] / median
    lines.append(f"GFLOP per update: {result['gflop']:.0f}  achieved {achieved:.0f} GFLOP/s = "
                 f"{100 * achieved / result['peak_gflops']:.0f}% of this machine's {result['matmul_dtype']} matmul peak "
                 f"({result['peak_gflops']:.0f} GFLOP/s, 4096x4096)")
    if result["peak_gpu_mib"] is not None:
        lines.append(f"peak GPU memory allocated: {result['peak_gpu_mib']:.0f} MiB")
    lines.append(f"peak process RSS: {result['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def bench_update(args: argparse.Namespace) -> None:
    if effective_precision(PRECISIONS[args.precision], args.device) != PRECISIONS[args.precision]:
        print(fallback_message(PRECISIONS[args.precision], effective_precision(PRECISIONS[args.precision], args.device),
                               args.device))
    result = measure_update(args)
    print(describe_update(result), flush=True)
    if args.json:
        text = json.dumps(result, indent=1).encode()
        atomic_write(Path(args.json), lambda f: f.write(text))


def print_params(args: argparse.Namespace) -> None:
    agent, _ = build_agent(args)
    print(agent.parameter_table())


def bench_replay(args: argparse.Namespace) -> None:
    """A checkpoint's replay save: the first one writes every row; every later one what is new."""
    shape = (args.image_size, args.image_size, 3)
    buffer = ReplayBuffer(args.rows + args.new_rows, 1, {"image": shape}, args.action_dim)
    pattern = torch.arange(256, dtype=torch.uint8)[:, None, None, None, None].expand(256, 1, *shape)
    for start in range(0, args.rows + args.new_rows, 256):  # distinct rows, cheap to make
        end = min(start + 256, args.rows + args.new_rows)
        buffer.arrays["image"][start:end] = pattern[: end - start]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        store = ReplayStore(folder)
        for label, rows in (("first save", args.rows), (f"next save, {args.new_rows} rows later", args.rows + args.new_rows)):
            buffer.steps_added = rows
            start = time.perf_counter()
            store.save(buffer, label.split(",")[0].replace(" ", "_"))
            seconds = time.perf_counter() - start
            print(f"{label:<34} at {rows:>9} rows: {store.bytes_written / 2**20:10.1f} MiB in {seconds:7.2f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wm.bench", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["update", "params", "replay"])
    parser.add_argument("--size", default="size12M", choices=list(SIZES))
    parser.add_argument("--objective", default="barlow", choices=list(OBJECTIVES))
    parser.add_argument("--precision", default="32", choices=list(PRECISIONS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--action-dim", type=int, default=6)
    parser.add_argument("--discrete", action="store_true")
    parser.add_argument("--compile", action="store_true", help="update: compile the loss and backward (model.compile)")
    parser.add_argument("--cold", action="store_true", help="update --compile: start from an empty compile cache")
    parser.add_argument("--compile-scope", default="regions", choices=["regions", "update"],
                        help="update --compile: the repeated blocks, or the whole update as one graph")
    parser.add_argument("--world-model-only", action="store_true",
                        help="update: the offline world model's update (`wm.probe train`), not the agent's")
    parser.add_argument("--updates", type=int, default=5, help="timed updates")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the fit's rule, --run.threads)")
    parser.add_argument("--rows", type=int, default=100_000, help="replay: rows in the buffer at the first save")
    parser.add_argument("--new-rows", type=int, default=12_500, help="replay: rows added before the next save")
    parser.add_argument("--dir", default=None, help="replay: where to write (default: the system's temporary folder)")
    parser.add_argument("--json", default=None, help="update: also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.world_model_only and args.compile and args.compile_scope == "update":
        parser.error("--compile-scope update: the offline world model compiles its regions only; "
                     "drop --compile-scope or --world-model-only")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    {"update": bench_update, "params": print_params, "replay": bench_replay}[args.what](args)

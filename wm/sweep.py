"""Sweeps: tasks x objectives x seeds as runs of one MLflow experiment per benchmark.

    python -m wm.sweep --config configs/dmc_subtle.yaml --objectives barlow mudreamer reconstruction \\
        --seeds 0 1 2                      # run one after another here
    python -m wm.sweep --config configs/cpu/toy.yaml --objectives barlow none --seeds 0 1 \\
        --parallel 2                       # two at a time, one core each
    python -m wm.sweep --config configs/atari100k.yaml --tasks atari-pong atari-breakout \\
        --seeds 0 1 --slurm sweep.sbatch   # write a SLURM job-array script instead

Every run is `python -m wm fit` with the benchmark config, an objective config, the task and the
seed, in `<root>/<task>-<objective>-s<seed>`; all runs of a sweep share one tracking store
(`<root>/mlflow.db` unless --tracking-uri) and the experiment named in the config, so their curves
sit side by side in `mlflow ui`. Arguments after `--` go to every run; those that change what a run
trains add a short stable tag of them to its objective's name (`barlow-1a2b3c`, in the run name
and the report), so a sweep re-run with other overrides never resumes the runs of the first.

A preset (configs/paper/) names the benchmark config, tasks, objectives and seeds of a published
experiment, so that it is one command; options given on the command line replace the preset's:

    python -m wm.sweep --preset configs/paper/dmc.yaml --slurm dmc.sbatch --slurm-option=--gres=gpu:1

Objectives are the configs in configs/objective/: the four objectives and the paper's ablations
(barlow_augment, barlow_b8). Sweeps of size12M models print their expected GPU-hours.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from wm.run.durations import update_count
from wm.run.tracking import create_store, ensure_experiment, sqlite_uri
from wm.objectives import objective_name
from wm.run.identity import overrides_tag, run_name

REPO = Path(__file__).resolve().parents[1]
OBJECTIVE_CONFIGS = REPO / "configs" / "objective"
PRESET_KEYS = ("config", "tasks", "objectives", "seeds")
# R2-Dreamer's Table 1: 1M env steps of DMC walker-walk on one RTX 3080 Ti took 4.4 h for R2-Dreamer,
# 7.0 h for its PyTorch DreamerV3 (with the decoder) and 10.4 h for DreamerPro. That run is 250,000 size12M updates:
# 1M frames / action repeat 2 * train ratio 512 / (B 16 * T 64).
PUBLISHED_GPU_HOURS = {"barlow": 4.4, "reconstruction": 7.0, "dreamerpro": 10.4}
PUBLISHED_UPDATES = 250_000
PUBLISHED_SIZE = "size12M"


def objective_configs() -> list[str]:
    """What --objectives accepts: the objectives and their ablations, one config each in configs/objective/."""
    return sorted(path.stem for path in OBJECTIVE_CONFIGS.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def merge(base: dict, override: dict) -> dict:
    """`override` over `base`, key by key in nested mappings, as LightningCLI composes --config files."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def expected_gpu_hours(config: Path, objective: str) -> float | None:
    """One run's hours on an RTX 3080 Ti, scaled from the published wall-clock by its update count, or
    None for a model size other than the published one.

    Reconstruction takes DreamerV3's time per update, DreamerPro its own, every other objective
    R2-Dreamer's (InfoNCE's projector costs what Barlow's does); env
    stepping is assumed to cost per update what it did in the published run, and an update of a
    smaller batch as much as a full one (an upper bound). A planning estimate.
    """
    data = merge(read_yaml(config), read_yaml(OBJECTIVE_CONFIGS / f"{objective}.yaml"))
    model, env, batch = data.get("model") or {}, data.get("env") or {}, data.get("data") or {}
    if model.get("size") != PUBLISHED_SIZE:
        return None
    updates = update_count(env["total_steps"], env["action_repeat"], env["train_ratio"], batch["batch_size"],
                           batch["sequence_length"])
    method = objective_name(model["objective"]["class_path"])
    return updates * PUBLISHED_GPU_HOURS.get(method, PUBLISHED_GPU_HOURS["barlow"]) / PUBLISHED_UPDATES


def read_preset(path: Path) -> dict:
    """A preset's config (relative to the repository), tasks, objectives and seeds, or a clear refusal."""
    if not path.is_file():
        raise ValueError(f"--preset {path}: no such file; the presets are in {REPO / 'configs' / 'paper'}")
    preset = read_yaml(path)
    unknown = sorted(set(preset) - set(PRESET_KEYS))
    if unknown:
        raise ValueError(f"--preset {path}: unknown keys {unknown}; a preset has {', '.join(PRESET_KEYS)}")
    if "config" in preset:
        preset["config"] = REPO / preset["config"]
    return preset


def benchmark_of(config: Path) -> tuple[str, str]:
    """(experiment name, default task) of a benchmark config."""
    data = read_yaml(config)
    experiment = (data.get("run") or {}).get("experiment") or config.stem
    task = (data.get("env") or {}).get("task")
    return experiment, task


def store_uri(root: Path, tracking_uri: str | None) -> str:
    """The sweep's one store: `--tracking-uri`, else MLFLOW_TRACKING_URI, else `<root>/mlflow.db`."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(root / "mlflow.db")


def sweep_commands(
    config: Path, tasks: list[str], objectives: list[str], seeds: list[int], root: Path, tracking_uri: str, extra: list[str]
) -> list[list[str]]:
    """One `python -m wm fit` command per (task, objective, seed)."""
    valid = objective_configs()
    unknown = [o for o in objectives if o not in valid]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; choose from {', '.join(valid)}")
    experiment, default_task = benchmark_of(config)
    tasks = tasks or [default_task]
    from wm.envs import SUITES, available_tasks  # the simulators load only once a sweep is really made

    known = set(available_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        suites = sorted({t.partition("-")[0] for t in unknown} & set(SUITES))
        raise ValueError(f"unknown tasks {unknown}; valid: {', '.join(available_tasks(suites or None))}")
    tracking_uri = store_uri(root, tracking_uri)
    tag = overrides_tag(extra)
    commands = []
    for task, objective, seed in itertools.product(tasks, objectives, seeds):
        # Overrides that change training give the runs their own variant (name and report cell), so
        # a re-run with other overrides makes new runs instead of "resuming" finished ones.
        variant = ["--run.variant", f"{objective}-{tag}"] if tag else []
        commands.append([
            sys.executable, "-m", "wm", "fit",
            "--config", str(config), "--config", str(OBJECTIVE_CONFIGS / f"{objective}.yaml"),
            "--env.task", task, "--seed_everything", str(seed),  # the run's one seed: every other derives from it
            *variant, "--run.name", run_name(task, f"{objective}-{tag}" if tag else objective, seed),
            "--run.root", str(root), "--run.experiment", experiment, "--run.tracking_uri", tracking_uri,
            "--ckpt_path", "last",  # a rerun (or a requeued job) resumes; a finished run ends at once
            *extra,
        ])
    return commands


def slurm_script(commands: list[list[str]], job_name: str, slurm_options: list[str]) -> str:
    """A job-array script: array task i runs command i.

    Pre-emptible and requeueable: SLURM sends SIGUSR1 two minutes before the time limit to the
    fit (the batch shell is replaced by it with `exec`), which writes a checkpoint at the next
    update and requeues its array task; the requeued task resumes from it (`--ckpt_path last`).
    A pre-emption's SIGTERM also ends the fit with a checkpoint.
    """
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --array=0-{len(commands) - 1}",
             "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]
    lines += [f"#SBATCH {option}" for option in slurm_options]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", "COMMANDS=("]
    lines += [f"  {shlex.quote(shlex.join(command))}" for command in commands]
    lines += [")", 'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)


def command_run_name(command: list[str]) -> str:
    """The run folder's name that a sweep command gives."""
    return command[command.index("--run.name") + 1]


def run_locally(commands: list[list[str]], parallel: int = 1, log_dir: Path | None = None,
                names: list[str] | None = None, what: str = "runs") -> int:
    """Run `parallel` at a time; a failed run is reported and the sweep goes on.

    With parallel > 1 each run gets cores / parallel torch threads (OMP_NUM_THREADS): CPU thread
    pools that compete for the same cores slow down far more than they share. With `log_dir` each
    run's output goes to `<log_dir>/<name>.log` instead of the terminal, `names` giving each
    command's (default: the run's name, `--run.name`); `what` the commands are, in the last line.
    """
    names = names or [command_run_name(command) for command in commands]
    env = dict(os.environ)
    if parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    pending, running, failed = list(enumerate(zip(commands, names), 1)), [], []
    while pending or running:
        while pending and len(running) < parallel:
            i, (command, name) = pending.pop(0)
            print(f"[{i}/{len(commands)}] {shlex.join(command[1:])}", flush=True)
            log = None
            if log_dir is not None:
                log = (log_dir / f"{name}.log").open("a")
                print(f"    output: {log.name}", flush=True)
            running.append((command, name, log, subprocess.Popen(command, env=env, stdout=log, stderr=log)))
        time.sleep(0.5)
        for entry in [r for r in running if r[3].poll() is not None]:
            command, name, log, process = entry
            running.remove(entry)
            if log is not None:
                log.close()
            if process.returncode:
                failed.append(command)
            print(f"{'FAILED' if process.returncode else 'finished'}: {name}", flush=True)
    for command in failed:
        print(f"FAILED: {shlex.join(command[1:])}", file=sys.stderr)
    print(f"{len(commands) - len(failed)} of {len(commands)} {what} finished")
    return 1 if failed else 0


def print_gpu_hours(config: Path, objectives: list[str], runs_per_objective: int) -> None:
    """The sweep's expected GPU-hours, per objective and in all (to stderr: --dry-run prints commands)."""
    hours = {objective: expected_gpu_hours(config, objective) for objective in objectives}
    if None in hours.values():
        return
    per_run = ", ".join(f"{objective} {h:.2g} h" for objective, h in hours.items())
    total = runs_per_objective * sum(hours.values())
    print(f"expected: about {total:,.0f} GPU-hours on an RTX 3080 Ti ({runs_per_objective * len(objectives):,} runs; "
          f"per run {per_run}), scaled from R2-Dreamer's published wall-clock by update count", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wm.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", type=Path, default=None,
                        help="a published experiment's config, tasks, objectives and seeds, e.g. configs/paper/dmc.yaml")
    parser.add_argument("--config", type=Path, default=None, help="benchmark config, e.g. configs/dmc.yaml")
    parser.add_argument("--tasks", nargs="*", default=None, help="tasks (default: the config's task)")
    parser.add_argument("--objectives", nargs="+", default=None, choices=objective_configs(),
                        help="objectives or ablations (default: barlow)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="(default: 0)")
    parser.add_argument("--root", type=Path, default=None, help="run folder root (default: runs/<experiment>)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow store shared by the runs (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)")
    parser.add_argument("--slurm", type=Path, default=None, help="write a SLURM job-array script here instead of running")
    parser.add_argument("--slurm-option", action="append", default=[], help='e.g. --slurm-option="--gres=gpu:1"')
    parser.add_argument("--parallel", type=int, default=1, help="local runs at once, each on cores / N threads (logs in <root>/logs)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments passed to every run")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Path, list[list[str]]]:
    """The sweep's root and commands: the command line's options, then the preset's, then the defaults."""
    preset = read_preset(args.preset) if args.preset else {}
    for key, default in {"config": None, "tasks": [], "objectives": ["barlow"], "seeds": [0]}.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    if args.config is None:
        raise ValueError("give --config (a benchmark config, e.g. configs/dmc.yaml) or --preset (e.g. configs/paper/dmc.yaml)")
    root = args.root or Path("runs") / benchmark_of(args.config)[0]
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    return root, sweep_commands(args.config, args.tasks, args.objectives, args.seeds, root, args.tracking_uri, extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parallel < 1:
        raise SystemExit(f"--parallel {args.parallel}: give at least 1 (runs at once)")
    try:
        root, commands = resolve(args)
    except ValueError as e:  # bad input: a clear message, and nothing was created
        raise SystemExit(f"error: {e}") from None
    print_gpu_hours(args.config, args.objectives, len(commands) // len(args.objectives))
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    root.mkdir(parents=True, exist_ok=True)
    # The runs' shared store and experiment, made before they start together.
    uri = store_uri(root, args.tracking_uri)
    if not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        create_store(root / "mlflow.db")
    ensure_experiment(uri, benchmark_of(args.config)[0])
    if args.slurm:
        args.slurm.write_text(slurm_script(commands, f"wm-{benchmark_of(args.config)[0]}", args.slurm_option))
        print(f"wrote {args.slurm}: {len(commands)} array tasks; submit with `sbatch {args.slurm}`")
        return 0
    log_dir = None
    if args.parallel > 1:  # interleaved output of several runs would be unreadable
        log_dir = root / "logs"
        log_dir.mkdir(exist_ok=True)
    return run_locally(commands, args.parallel, log_dir)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m wm.bench check --out DIR`: what a machine gives wm, in one command, as JSON and markdown.

Made for the first run on a new GPU (about 8 minutes on one; `--budget`), and for a CPU with tiny
sizes (`--tiny`, which CI runs). In order of what matters most:

1. device: the accelerator, its driver, torch and CUDA versions, and its bf16 matmul rate measured
   on the spot;
2. update: seconds per update and peak memory of barlow, reconstruction, mudreamer and dreamerpro
   at size12M, B16 T64, bf16, eager and compiled (regions; the whole update as one graph), CUDA
   graphs on a GPU; cold and warm compile times; the host syncs of one update (must be 0);
3. fit: a short real `python -m wm fit` of toy Catch (configs/quickstart.yaml; no simulator), its
   replay on the GPU where there is one: env frames/s, updates/s, its update against the same
   update alone, and a resume from its checkpoint that continues the run;
4. largest: the largest model size that trains with B16 T64;
5. dmc: where dm_control is installed, `wm.bench fit` of configs/dmc.yaml (16 EGL-rendering env
   workers beside the training process): env frames/s, updates/s and what 1M frames would take.

Every measurement is its own process with a time limit: one that fails, runs out of memory or
times out is recorded with its last line and the rest go on; what the budget leaves out is
marked skipped. The compile cache is the check's own (empty at the start), so the first compile
of each piece is cold.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

OBJECTIVES = ("barlow", "reconstruction", "mudreamer", "dreamerpro")
MODES = ("eager", "regions", "update")
SECTIONS = ("device", "update", "fit", "largest", "dmc")
SIZES = ("size12M", "size25M", "size50M", "size100M", "size200M")
REPO = Path(__file__).resolve().parents[2]
PUBLISHED = "R2-Dreamer's paper (Table 1): 1M frames of walker-walk in 4.4 h on one RTX 3080 Ti (DreamerV3: 7.0 h)"


@dataclass
class Plan:
    """What the check measures on this device."""

    device: str
    size: str = "size12M"
    batch: int = 16
    length: int = 64
    updates: int = 5
    warmup: int = 3  # CUDA graphs record in the first calls
    objectives: tuple[str, ...] = OBJECTIVES
    compiled_objectives: tuple[str, ...] = OBJECTIVES  # the compiled rows (a CPU compiles for minutes)
    modes: tuple[str, ...] = MODES
    sizes: tuple[str, ...] = SIZES
    fit_seconds: float = 30.0
    fit_overrides: list[str] = field(default_factory=list)
    resume_frames: tuple[int, int] = (1500, 2000)
    dmc_seconds: float = 60.0
    dmc_overrides: list[str] = field(default_factory=list)
    tiny: bool = False
    notes: list[str] = field(default_factory=list)  # what this machine lacks and what the check does instead


def make_plan(args: argparse.Namespace) -> Plan:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
    plan = Plan(device, fit_overrides=[*accelerator, "--data.storage", "auto"], dmc_overrides=list(accelerator))
    if args.tiny:  # seconds on a CPU: the same code paths at the smallest sizes
        tiny_data = ["--data.batch_size", "2", "--data.sequence_length", "8", "--data.capacity", "5000"]
        plan = Plan(device, size="size1M", batch=2, length=8, updates=2, warmup=1, sizes=("size1M", "size12M"),
                    compiled_objectives=OBJECTIVES[:1],
                    fit_seconds=20.0, resume_frames=(40, 56), dmc_seconds=15.0, tiny=True,
                    fit_overrides=[*plan.fit_overrides, *tiny_data, "--env.prefill", "32", "--env.train_ratio", "16"],
                    dmc_overrides=[*plan.dmc_overrides, *tiny_data, "--model.size", "size1M", "--env.num_envs", "2",
                                   "--env.prefill", "32", "--env.train_ratio", "16", "--model.compile", "false"])
    if importlib.util.find_spec("av") is None:  # PyAV writes the evaluation videos
        plan.fit_overrides += ["--env.eval_videos", "0"]
        plan.dmc_overrides += ["--env.eval_videos", "0"]
        plan.notes.append("PyAV is not installed here: the fits run with --env.eval_videos 0")
    if importlib.util.find_spec("mlflow") is None:
        plan.notes.append("MLflow is not installed here: `python -m wm fit` tracks every run in it, so the fits are skipped")
    if args.objectives:
        plan.objectives = tuple(args.objectives)
        plan.compiled_objectives = tuple(o for o in plan.objectives if o in plan.compiled_objectives) or plan.objectives[:1]
    if args.modes:
        plan.modes = tuple(args.modes)
    return plan


@dataclass
class Step:
    """One measurement process: its status ("ok", "failed", "out of memory", "timed out",
    "skipped"), a line saying why when not ok, its wall time and what it wrote."""

    status: str
    why: str = ""
    seconds: float = 0.0
    result: dict | list | None = None


class Runner:
    """Runs the measurements as child processes within the check's deadline, logging their output."""

    def __init__(self, out: Path, deadline: float, env: dict[str, str]):
        self.out, self.deadline, self.env = out, deadline, env
        self.log = out / "check.log"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, argv: list[str], limit: float, json_path: Path | None = None, least: float = 10.0) -> Step:
        """`python argv` for at most `limit` seconds (and what the deadline leaves); skipped when
        less than `least` seconds are left."""
        by_budget = self.remaining() < limit
        limit = min(limit, self.remaining())
        if limit < least:
            return Step("skipped", f"the check's budget had {max(0.0, self.remaining()):.0f} s left")
        print(f"[{name}] {' '.join(argv)}  (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=limit, env=self.env,
                                  cwd=REPO)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                             for part in (expired.stdout, expired.stderr))
            code = None
        seconds = time.monotonic() - start
        with self.log.open("a") as log:
            log.write(f"\n===== {name} ({seconds:.0f} s, exit {code}): {' '.join(argv)}\n{output}")
        if code is None:
            return Step("timed out", f"stopped after {limit:.0f} s" + (", the end of the check's budget" if by_budget else ""),
                        seconds)
        if code != 0:
            lines = [line for line in output.strip().splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
            status = "out of memory" if "OutOfMemoryError" in output or "out of memory" in output else "failed"
            return Step(status, last.strip()[:300], seconds)
        result = json.loads(json_path.read_text()) if json_path is not None and json_path.exists() else None
        return Step("ok", "", seconds, result)


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                          text=True)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {flag}" in text})


def device_section(plan: Plan) -> dict:
    """The machine, and its matmul rate in bf16 and fp32 measured here (best of a few, square)."""
    import lightning
    import torch

    from wm.bench.update import peak_matmul_gflops

    n = 8192 if plan.device == "cuda" else 1024
    info = {"device": plan.device, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "cpu_flags": cpu_flags(), "matmul_size": n,
            "bf16_tflops": peak_matmul_gflops(torch.bfloat16, plan.device, n) / 1e3,
            "fp32_tflops": peak_matmul_gflops(torch.float32, plan.device, n) / 1e3}
    if plan.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), driver=nvidia_driver(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count)
    else:
        info.update(name=info["cpu"])
    return info


def update_argv(plan: Plan, objective: str, mode: str, size: str | None = None, updates: int | None = None,
                warmup: int | None = None) -> list[str]:
    argv = ["-m", "wm.bench", "update", "--size", size or plan.size, "--objective", objective, "--precision", "bf16",
            "--device", plan.device, "--batch", str(plan.batch), "--length", str(plan.length),
            "--updates", str(updates or plan.updates), "--warmup", str(warmup or plan.warmup)]
    if mode != "eager":
        argv += ["--compile", "--compile-scope", mode]
    return argv


def update_rows(plan: Plan, first: bool) -> list[tuple[str, str]]:
    """(objective, mode) rows in the order a user needs them: `first`, every objective eager and
    the first objective's compiled regions, cold then warm (`regions-warm`: a new process from
    the cache the cold one filled); then the rest: the first objective's update as one graph,
    and the other objectives compiled."""
    compiled = [m for m in ("regions", "update") if m in plan.modes]
    head, *others = plan.compiled_objectives
    early = [(o, "eager") for o in plan.objectives if "eager" in plan.modes]
    early += [(head, mode) for m in compiled[:1] for mode in (m, f"{m}-warm")]
    late = [(head, mode) for m in compiled[1:] for mode in (m, f"{m}-warm")]
    late += [(o, m) for m in compiled for o in others]
    return early if first else late


def update_section(plan: Plan, runner: Runner, work: Path, first: bool = True) -> list[dict]:
    rows = []
    for objective, mode in update_rows(plan, first):
        path = work / f"update-{objective}-{mode}.json"
        warm = mode.endswith("-warm")
        argv = update_argv(plan, objective, mode.removesuffix("-warm"), updates=2 if warm else None)
        limit = 120.0 if mode == "eager" else 300.0
        step = runner.run(f"update {objective} {mode}", [*argv, "--json", str(path)], limit, path)
        rows.append({"objective": objective, "mode": mode, "status": step.status, "why": step.why,
                     "seconds": step.seconds, "result": step.result})
    return rows


def largest_section(plan: Plan, runner: Runner, work: Path) -> list[dict]:
    """Eager bf16 updates of larger and larger models at the check's B and T, up to the first that
    does not fit (or fails)."""
    rows = []
    for size in plan.sizes:
        path = work / f"largest-{size}.json"
        step = runner.run(f"largest {size}", [*update_argv(plan, "barlow", "eager", size, 1, 1), "--json", str(path)],
                          180.0, path)
        rows.append({"size": size, "status": step.status, "why": step.why, "result": step.result})
        if step.status != "ok":
            break
    return rows


def checkpoint_state(path: Path) -> dict:
    import torch

    from wm.run.identity import RECORD_KEY

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {"global_step": checkpoint["global_step"], "run": checkpoint.get(RECORD_KEY, {}).get("run_id")}


def fit_section(plan: Plan, runner: Runner, work: Path) -> dict:
    """Toy Catch through the user's own command: measured by `wm.bench fit`, its update alone
    by `wm.bench update` with the quickstart's model, then a fit and its resume in a run folder."""
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    path = work / "fit.json"
    fit = runner.run("fit toy-catch", ["-m", "wm.bench", "fit", "--config", quickstart, "--seconds", str(plan.fit_seconds),
                                       "--json", str(path), *plan.fit_overrides], plan.fit_seconds + 150, path)
    batch, length = ("2", "8") if plan.tiny else ("16", "16")
    alone_path = work / "fit-alone.json"
    alone = runner.run("fit toy-catch: its update alone",
                       ["-m", "wm.bench", "update", "--size", "size1M", "--objective", "barlow", "--precision", "32",
                        "--device", plan.device, "--batch", batch, "--length", length, "--action-dim", "3",
                        "--discrete", "--updates", "5", "--warmup", "2", "--json", str(alone_path)], 120.0, alone_path)
    root = work / "runs"
    first, second = plan.resume_frames
    common = ["-m", "wm", "fit", "--config", quickstart, *plan.fit_overrides, "--run.root", str(root),
              "--run.name", "check", "--env.eval_every", "0", "--env.eval_episodes", "2", "--env.eval_videos", "0",
              "--trainer.enable_progress_bar", "false", "--run.checkpoint_every", str(first)]
    started = runner.run("fit toy-catch: a run", [*common, "--env.total_steps", str(first)], 240.0)
    resume = {"status": started.status, "why": started.why}
    last = root / "check" / "checkpoints" / "last.ckpt"
    if started.status == "ok" and last.exists():
        before = checkpoint_state(last)
        resumed = runner.run("fit toy-catch: its resume", [*common, "--env.total_steps", str(second), "--ckpt_path", "last"],
                             240.0)
        after = checkpoint_state(last) if resumed.status == "ok" else None
        ok = after is not None and after["global_step"] > before["global_step"] and after["run"] == before["run"]
        resume = {"status": resumed.status if resumed.status != "ok" or ok else "failed",
                  "why": resumed.why or ("" if ok else "the resume did not continue the run"),
                  "before": before, "after": after, "frames": [first, second]}
    return {"fit": {"status": fit.status, "why": fit.why, "result": fit.result},
            "alone": {"status": alone.status, "why": alone.why, "result": alone.result}, "resume": resume}


def dmc_section(plan: Plan, runner: Runner, work: Path) -> dict:
    if importlib.util.find_spec("dm_control") is None:
        return {"status": "skipped", "why": "dm_control is not installed"}
    path = work / "dmc.json"
    step = runner.run("fit dmc", ["-m", "wm.bench", "fit", "--config", str(REPO / "configs" / "dmc.yaml"), "--seconds",
                                  str(plan.dmc_seconds), "--json", str(path), *plan.dmc_overrides],
                      plan.dmc_seconds + 240, path, least=plan.dmc_seconds + 30)
    return {"status": step.status, "why": step.why, "result": step.result}


# ----------------------------------------------------------------------------------------- report
def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def update_table(rows: list[dict]) -> list[str]:
    lines = ["| objective | mode | status | s/update (median) | peak GPU MiB | host syncs | compile s | graphs, breaks | "
             "GFLOP/update | % of bf16 peak |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        r = row["result"] or {}
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['why']}"
        compiled = r.get("compile_seconds")
        percent = 100 * r["gflop"] / r["median"] / r["peak_gflops"] if r else None
        graphs = f"{r['graphs']}, {r['graph_breaks']}" if "graphs" in r else "-"
        lines.append(f"| {row['objective']} | {row['mode']} | {status} | {fmt(r.get('median'))} | "
                     f"{fmt(r.get('peak_gpu_mib'), 0)} | {fmt(r.get('host_syncs'))} | {fmt(compiled, 1)} | {graphs} | "
                     f"{fmt(r.get('gflop'), 0)} | {fmt(percent, 1)} |")
    return lines


def fit_lines(section: dict) -> list[str]:
    fit, alone, resume = section["fit"], section["alone"], section["resume"]
    lines = []
    if fit["status"] == "ok" and fit["result"]:
        r = fit["result"]
        lines.append(f"- toy Catch (configs/quickstart.yaml), {r['size']}, B={r['batch'][0]} T={r['batch'][1]}, device "
                     f"{r['device']}, replay on {r['replay_device']}: {r['frames_per_second']:.1f} env frames/s, "
                     f"{r['updates_per_second']:.2f} updates/s, {r['median_update']:.4f} s per update in the fit")
        if alone["status"] == "ok" and alone["result"]:
            median = alone["result"]["median"]
            lines.append(f"- the same update alone: {median:.4f} s; in the fit / alone: {r['median_update'] / median:.2f}x")
        else:
            lines.append(f"- the same update alone: {alone['status']} {alone['why']}")
    else:
        lines.append(f"- toy Catch fit: {fit['status']} {fit['why']}")
    if resume.get("after"):
        lines.append(f"- resume: a run to {resume['frames'][0]} frames (update {resume['before']['global_step']}), "
                     f"resumed with --ckpt_path last to {resume['frames'][1]} (update {resume['after']['global_step']}), "
                     f"the same MLflow run: {resume['status']}")
    else:
        lines.append(f"- resume: {resume['status']} {resume['why']}")
    return lines


def dmc_lines(section: dict) -> list[str]:
    if section["status"] != "ok" or not section.get("result"):
        return [f"- configs/dmc.yaml: {section['status']} {section['why']}"]
    r = section["result"]
    frames_per_update = r["frames"] / max(r["updates"], 1)
    hours = 1e6 / r["frames_per_second"] / 3600 if r["frames_per_second"] else float("inf")
    workers = r.get("workers")
    lines = [f"- {r['task']}, {r['size']}, {r['num_envs']} envs, B={r['batch'][0]} T={r['batch'][1]}, train ratio "
             f"{r['train_ratio']:g}, replay on {r['replay_device']}: {r['frames_per_second']:.1f} env frames/s, "
             f"{r['updates_per_second']:.2f} updates/s ({frames_per_update:.1f} frames per update), "
             f"{r['median_update']:.4f} s per update in the fit",
             f"- env start {r['env_start']:.1f} s" + (f", each worker {workers[0]:.0f} MiB RSS / {workers[1]:.0f} MiB USS"
                                                       if workers else "") +
             f"; env start and prefill {r['prefill']:.1f} s ({r['prefill_frames']} frames), warm-up {r['warmup']:.1f} s",
             f"- 1M env frames at this rate: {hours:.2f} h ({PUBLISHED})",
             "- share of wall time: " + ", ".join(f"{k} {100 * v / r['wall']:.0f}%" for k, v in r["shares"].items())]
    return lines


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [f"# wm hardware check: {d.get('name', d['device'])}", "",
             f"{report['date']}; torch {d['torch']}, lightning {d['lightning']}, Python {d['python']}; "
             + (f"driver {d['driver']}, CUDA {d['cuda']}, compute capability {d['capability']}, "
                f"{d['memory_gib']:.0f} GiB; " if d["device"] == "cuda" else "")
             + f"{d['cpu_cores']} CPU cores {' '.join(d['cpu_flags'])}; matmul {d['matmul_size']}^3: bf16 "
             f"{d['bf16_tflops']:.1f} TFLOP/s, fp32 {d['fp32_tflops']:.1f} TFLOP/s; "
             f"the check took {report['seconds']:.0f} s{' (tiny sizes)' if report['plan']['tiny'] else ''}.", ""]
    plan = report["plan"]
    lines += [f"- {note}" for note in plan["notes"]] + ([""] if plan["notes"] else [])
    if "update" in report:
        lines += [f"## Updates: {plan['size']}, B={plan['batch']} T={plan['length']}, bf16", "",
                  *update_table(report["update"]), "",
                  "Compile s: the first update's time minus the median (cold: an empty cache; `-warm`: a new process "
                  "from the cache the cold one filled). Host syncs of one update must be 0.", ""]
    if "fit" in report:
        lines += ["## A real fit and its resume", "", *fit_lines(report["fit"]), ""]
    if "largest" in report:
        lines += [f"## Largest size at B={plan['batch']} T={plan['length']} (eager, bf16)", "",
                  "| size | status | s/update | peak GPU MiB |", "| --- | --- | --- | --- |"]
        for row in report["largest"]:
            r = row["result"] or {}
            status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['why']}"
            lines.append(f"| {row['size']} | {status} | {fmt(r.get('median'))} | {fmt(r.get('peak_gpu_mib'), 0)} |")
        lines.append("")
    if "dmc" in report:
        lines += ["## configs/dmc.yaml", "", *dmc_lines(report["dmc"]), ""]
    return "\n".join(lines)


def write(out: Path, report: dict) -> None:
    from wm.run.files import atomic_write

    text = json.dumps(report, indent=1, default=str).encode()
    atomic_write(out / "check.json", lambda f: f.write(text))
    page = markdown(report).encode()
    atomic_write(out / "check.md", lambda f: f.write(page))


def check(args: argparse.Namespace) -> dict:
    plan = make_plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="wm-check-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "PYTHONUNBUFFERED": "1"}
    runner = Runner(out, started + args.budget, env)
    sections = args.sections or list(SECTIONS)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "plan": {k: v for k, v in vars(plan).items()}, "budget": args.budget}
    report["device"] = device_section(plan)  # every page names its machine
    write(out, {**report, "seconds": time.monotonic() - started})
    fits = importlib.util.find_spec("mlflow") is not None
    # In order of what matters most, so that a short budget leaves out the least: the eager
    # updates and the default compile, a real fit and its resume, the DMC fit, the largest size,
    # then the rest of the compiled updates.
    order = [("update", update_section), ("fit", fit_section), ("dmc", dmc_section), ("largest", largest_section),
             ("update", functools.partial(update_section, first=False))]
    for name, section in order:
        if name in sections and (fits or name not in ("fit", "dmc")):
            result = section(plan, runner, work)
            report[name] = report.get(name, []) + result if name == "update" else result
            write(out, {**report, "seconds": time.monotonic() - started})  # what is done so far survives a kill
    report["seconds"] = time.monotonic() - started
    write(out, report)
    shutil.rmtree(work, ignore_errors=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for check.json, check.md and check.log")
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes: seconds on a CPU (what CI runs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda where there is one")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check; later parts are skipped")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None, help="default: all")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=None, help="default: all four")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: all three")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wm.bench check", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = check(args)
    print(markdown(report), flush=True)

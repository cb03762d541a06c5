"""`python -m wm.report --experiment NAME --out DIR`: a sweep's results as a paper shows them.

Reads every training run of one MLflow experiment (tasks x objectives x seeds, as `wm.sweep`
makes them) and writes into `--out`, and as artifacts of a report run in the same store:
- `curves.png`: per task, the greedy eval return against env frames, mean and 95% Student-t
  interval over seeds per objective, with DreamerV3's published curve where the task has one;
- `final.csv`: per task and objective, the final eval return (and success rate), its normalised
  score, and the return of the last training episodes; `runs.csv`: the same per run;
- `aggregates.csv`, `aggregates.png`: mean, median, interquartile mean (IQM) and optimality gap of
  the normalised final scores per objective, with 95% stratified-bootstrap intervals, and
  `profiles.png`, the performance profiles, both computed by `rliable`;
- `report.md`: the tables above (with the random policy's return, `--random-frames`), the
  normalisation used and the command that made it; `--markdown FILE` also writes it into FILE
  between generated-section markers, keeping the prose around them (how `docs/results.md` is made).
Several `--experiment`s of one store get a folder each, `<out>/<experiment>`.

Normalised scores: human-normalised for Atari, return / 1000 for DMC suites, the success rate for
Meta-World, the return range for the toy tasks (`wm.reference.normalized_score`).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics, plot_utils  # noqa: E402

from wm.envs import make_env  # noqa: E402
from wm.run.files import atomic_write  # noqa: E402
from wm.run.tracking import sqlite_uri  # noqa: E402
from wm.objectives import objective_name  # noqa: E402
from wm.probe.report import ProbeReport, is_probe_experiment, make_probe_report  # noqa: E402
from wm.reference import (REFERENCE_METHOD, Curve, normalized_score, reference_at, reference_curve,  # noqa: E402
                          return_range, t_interval)

REPORT_TAG = "wm.report"  # marks the report runs, which the next report skips
AGGREGATES = ("mean", "median", "IQM", "optimality gap")
TRAIN_EPISODES = 10  # training episodes averaged for the "training" column


@dataclass
class RunResult:
    """The eval history of one training run."""

    name: str
    task: str
    objective: str  # the objective's name, or an ablation's (run.variant)
    seed: int
    steps: np.ndarray  # env frames of each evaluation
    returns: np.ndarray  # mean greedy return of each evaluation
    successes: np.ndarray  # mean success of each evaluation (0 where a task has no success signal)
    action_repeat: int = 1
    train_return: float = float("nan")  # mean return of the last training episodes (`last_episodes_return`)

    @property
    def final_return(self) -> float:
        return float(self.returns[-1])

    @property
    def final_score(self) -> float | None:
        """The final evaluation on the task's common scale (Meta-World: its success rate)."""
        value = self.successes[-1] if self.task.startswith("metaworld-") else self.returns[-1]
        return normalized_score(self.task, float(value))


@dataclass
class Aggregates:
    """rliable's aggregate metrics of the normalised final scores, per objective."""

    tasks: list[str]
    seeds: int  # runs per task and objective that entered (the smallest count over the cells)
    points: dict[str, np.ndarray]  # objective -> one value per AGGREGATES
    intervals: dict[str, np.ndarray]  # objective -> (2, len(AGGREGATES)): lower and upper bounds
    scores: dict[str, np.ndarray]  # objective -> (seeds, tasks) normalised final scores


def history(client: MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, float), np.asarray(values, float)


def last_episodes_return(returns: np.ndarray, counts: np.ndarray, episodes: int = TRAIN_EPISODES) -> float:
    """Mean return of the last `episodes` training episodes (or a few more, whole logging intervals),
    from `episode/return` and `episode/count`: each log is the mean of the episodes that ended since
    the previous one, and how many. Fewer evaluation episodes than this are noisy on tasks like reacher."""
    total, seen = 0.0, 0.0
    for value, count in zip(returns[::-1], counts[::-1]):
        total, seen = total + value * count, seen + count
        if seen >= episodes:
            break
    return total / seen if seen else float("nan")


def load_runs(client: MlflowClient, experiment: str, metric: str = "eval/return") -> list[RunResult]:
    """Every training run of `experiment` with at least one evaluation, oldest first."""
    results = []
    for run in client.search_runs([experiment_id_of(client, experiment)], order_by=["attributes.start_time ASC"], max_results=50_000):
        params = run.data.params
        if REPORT_TAG in run.data.tags or "env.task" not in params:
            continue
        steps, returns = history(client, run.info.run_id, metric)
        if not len(steps):
            continue
        success_steps, successes = history(client, run.info.run_id, "eval/success")
        successes = np.interp(steps, success_steps, successes) if len(success_steps) else np.zeros_like(returns)
        _, episode_returns = history(client, run.info.run_id, "episode/return")
        _, episode_counts = history(client, run.info.run_id, "episode/count")
        results.append(RunResult(run.info.run_name, params["env.task"],
                                 objective_name(params.get("model.objective.class_path"), params.get("run.variant")),
                                 int(params.get("seed_everything", 0)), steps, returns, successes,
                                 int(params.get("env.action_repeat", 1)), last_episodes_return(episode_returns, episode_counts)))
    return results


def group(results: list[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """(task, objective) -> its runs, ordered by seed."""
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for result in sorted(results, key=lambda r: (r.task, r.objective, r.seed)):
        cells.setdefault((result.task, result.objective), []).append(result)
    return cells


def seed_curve(runs: list[RunResult]) -> Curve:
    """Mean and interval over seeds on the union of their eval frames; a seed counts only where it
    has data (interpolated between its own evaluations, never extrapolated)."""
    steps = np.unique(np.concatenate([r.steps for r in runs]))
    per_seed = np.stack([np.where((steps >= r.steps[0]) & (steps <= r.steps[-1]), np.interp(steps, r.steps, r.returns), np.nan)
                         for r in runs])
    mean, low, high = t_interval(per_seed)
    return Curve(steps, mean, low, high, len(runs))


def aggregate(results: list[RunResult], reps: int = 2000, seed: int = 0) -> Aggregates | None:
    """Mean, median, IQM and optimality gap of the normalised final scores with stratified-bootstrap
    95% intervals (rliable), over the tasks that every objective ran and that have a known scale.
    Each cell enters with its lowest seeds, as many as the smallest cell has. None if nothing can."""
    cells = group([r for r in results if r.final_score is not None])
    objectives = sorted({objective for _, objective in cells})
    tasks = sorted(task for task in {task for task, _ in cells} if all((task, o) in cells for o in objectives))
    if not tasks:
        return None
    seeds = min(len(cells[task, o]) for task in tasks for o in objectives)
    scores = {o: np.array([[cells[task, o][i].final_score for task in tasks] for i in range(seeds)]) for o in objectives}

    def all_aggregates(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(x), metrics.aggregate_median(x), metrics.aggregate_iqm(x),
                         metrics.aggregate_optimality_gap(x)])

    points, intervals = rly.get_interval_estimates(scores, all_aggregates, reps=reps,
                                                   random_state=np.random.RandomState(seed))
    return Aggregates(tasks, seeds, points, intervals, scores)


def random_returns(task: str, action_repeat: int, frames: int, seed: int = 0) -> np.ndarray:
    """Returns of whole episodes of uniformly random actions, with the runs' action repeat, until
    they total at least `frames` env frames: the floor every agent must clear. A frame budget
    keeps the cost alike across suites (a toy episode is ~10 frames, a DMC one 1000)."""
    env = make_env(task, action_repeat=action_repeat, seed=seed)
    returns, played = [], 0
    try:
        while played < frames:
            env.reset()
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                played += action_repeat
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return np.asarray(returns)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def final_rows(results: list[RunResult], random: dict[str, np.ndarray] | None = None) -> list[dict]:
    """One row per (task, objective): final return over seeds, normalised score, the random policy's
    mean return where `random` has the task, and DreamerV3's published return at the same frames."""
    rows = []
    for (task, objective), runs in group(results).items():
        finals = np.array([r.final_return for r in runs])
        mean, low, high = t_interval(finals)
        frames = float(np.median([r.steps[-1] for r in runs]))
        normalised = [r.final_score for r in runs]
        rows.append({
            "task": task, "objective": objective, "seeds": len(runs), "frames": int(frames),
            "return_mean": float(mean), "return_ci_low": float(low), "return_ci_high": float(high),
            "success_mean": float(np.mean([r.successes[-1] for r in runs])),
            "train_return_mean": float(np.mean([r.train_return for r in runs])),
            "normalised_mean": None if None in normalised else float(np.mean(normalised)),
            "random_return": float(random[task].mean()) if random and task in random else None,
            "random_episodes": len(random[task]) if random and task in random else 0,
            "dreamerv3_at_frames": reference_at(task, frames),
        })
    return rows


def plot_curves(results: list[RunResult], path: Path) -> dict[str, dict[str, Curve]]:
    """One panel per task: every objective's mean over seeds (thick) with its 95% Student-t interval,
    clipped to the task's return range where it is known, and each seed's curve (thin); DreamerV3's
    where published. Returns the curves drawn, per task and label."""
    cells = group(results)
    tasks = sorted({task for task, _ in cells})
    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    drawn: dict[str, dict[str, Curve]] = {}
    for ax, task in zip(axes.flat, tasks):
        curves = {objective: seed_curve(runs) for (t, objective), runs in cells.items() if t == task}
        end = max(curve.steps[-1] for curve in curves.values())
        reference = reference_curve(task, until=end * 1.05)
        if reference is not None:
            curves[REFERENCE_METHOD] = reference
        bounds = return_range(task)
        for label, curve in curves.items():
            style = {"color": "black", "linestyle": "--"} if label == REFERENCE_METHOD else {}
            line, = ax.plot(curve.steps, curve.mean, label=f"{label} ({curve.seeds} seeds)", lw=2, **style)
            low, high = (curve.low, curve.high) if bounds is None else (np.clip(curve.low, *bounds), np.clip(curve.high, *bounds))
            ax.fill_between(curve.steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
            for run in cells.get((task, label), []):  # one thin line per seed under the mean
                ax.plot(run.steps, run.returns, color=line.get_color(), lw=0.7, alpha=0.5)
        if bounds is not None:  # a return outside the task's range is impossible: so is an interval there
            span = bounds[1] - bounds[0]
            ax.set_ylim(bounds[0] - 0.03 * span, bounds[1] + 0.03 * span)
        ax.set_title(task)
        ax.set_xlabel("env frames")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        drawn[task] = curves
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def plot_aggregates(aggregates: Aggregates, folder: Path, reps: int) -> None:
    objectives = list(aggregates.points)
    figure, _ = plot_utils.plot_interval_estimates(aggregates.points, aggregates.intervals, metric_names=list(AGGREGATES),
                                                   algorithms=objectives, xlabel="normalised score",
                                                   row_height=0.7, xlabel_y_coordinate=-0.6 / len(objectives))
    figure.savefig(folder / "aggregates.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    taus = np.linspace(0.0, max(1.0, max(s.max() for s in aggregates.scores.values())), 81)
    profiles, profile_intervals = rly.create_performance_profile(aggregates.scores, taus, reps=reps)
    figure, ax = plt.subplots(figsize=(6, 4))
    colors = dict(zip(objectives, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_intervals, colors=colors,
                                         xlabel=r"normalised score $\tau$", ax=ax)
    ax.legend([Line2D([], [], color=colors[o]) for o in objectives], objectives)
    figure.savefig(folder / "profiles.png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(experiment: str, command: str, results: list[RunResult], rows: list[dict], aggregates: Aggregates | None,
             reps: int, random_frames: int = 0, level: int = 1, folder: str = "") -> str:
    """The report as markdown; `level` is its top heading's level and `folder` the path from the
    markdown file to the figures."""
    top, sub = "#" * level, "#" * (level + 1)
    lines = [f"{top} Report: experiment `{experiment}`", "",
             f"{len(results)} runs, made by `{command}`.", "",
             f"{sub} Final greedy eval return", "",
             "Mean over seeds [95% Student-t interval] at the last evaluation; normalised as below; random: "
             + (f"the mean return of uniformly random actions over whole episodes totalling at least {random_frames:,} "
                "env frames per task (their number in parentheses)" if random_frames else "not measured (--random-frames)")
             + f"; training: the mean return of each run's last {TRAIN_EPISODES} training episodes (sampled actions), "
             "over seeds; DreamerV3: its published mean at the same env frames (+-20k), where it has the task.", "",
             "| task | objective | seeds | env frames | return | normalised | training | random | DreamerV3 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        interval = f" [{fmt(row['return_ci_low'])}, {fmt(row['return_ci_high'])}]" if row["seeds"] > 1 else ""
        random = fmt(row["random_return"], 2) + (f" ({row['random_episodes']})" if row["random_episodes"] else "")
        lines.append(f"| {row['task']} | {row['objective']} | {row['seeds']} | {row['frames']} | "
                     f"{fmt(row['return_mean'])}{interval} | {fmt(row['normalised_mean'], 3)} | "
                     f"{fmt(row['train_return_mean'])} | {random} | "
                     f"{fmt(row['dreamerv3_at_frames'])} |")
    lines += ["", f"![learning curves]({folder}curves.png)", ""]
    if aggregates is None:
        lines += ["No aggregate: no task with a known score scale was run by every objective.", ""]
    else:
        lines += [f"{sub} Aggregate normalised score", "",
                  f"Over {len(aggregates.tasks)} task{'s' * (len(aggregates.tasks) != 1)} ({', '.join(aggregates.tasks)}), "
                  f"{aggregates.seeds} run{'s' * (aggregates.seeds != 1)} each; "
                  f"point estimates and 95% stratified-bootstrap intervals ({reps} resamples), computed by rliable. "
                  "Optimality gap: lower is better.", "",
                  "| objective | " + " | ".join(AGGREGATES) + " |", "| --- |" + " --- |" * len(AGGREGATES)]
        for objective, point in aggregates.points.items():
            low, high = aggregates.intervals[objective]
            cells = [f"{p:.3f} [{lo:.3f}, {hi:.3f}]" for p, lo, hi in zip(point, low, high)]
            lines.append(f"| {objective} | " + " | ".join(cells) + " |")
        lines += ["", f"![aggregates]({folder}aggregates.png)", "", f"![performance profiles]({folder}profiles.png)", ""]
    lines += ["Normalisation: Atari human-normalised ((return - random) / (human - random)); DMC suites return / 1000; "
              "Meta-World the success rate; the toy Catch tasks (return + 1) / 2; toy-point_reach return / 200.", ""]
    return "\n".join(lines)


@dataclass
class Report:
    """What `make_report` wrote, for callers that go on with it (notebooks, tests)."""

    experiment: str
    command: str
    results: list[RunResult]
    rows: list[dict]
    curves: dict[str, dict[str, Curve]]
    aggregates: Aggregates | None
    run_id: str | None
    reps: int = 2000
    random_frames: int = 0

    def markdown(self, level: int = 1, folder: str = "") -> str:
        return markdown(self.experiment, self.command, self.results, self.rows, self.aggregates, self.reps,
                        self.random_frames, level, folder)


def make_report(tracking_uri: str, experiment: str, out: Path, reps: int = 2000, log: bool = True,
                command: str = "python -m wm.report", random_frames: int = 0) -> Report | ProbeReport:
    """Writes the report files into `out` and, with `log`, into a new report run of the experiment:
    a probe study's report (wm.probe.report) for an experiment of probed runs, else the RL one.
    With `random_frames`, each task's random-policy return is measured by playing it."""
    client = MlflowClient(tracking_uri)
    experiment_id = experiment_id_of(client, experiment)
    if is_probe_experiment(client, experiment_id):
        report = make_probe_report(client, experiment_id, experiment, out, reps, command, REPORT_TAG)
    else:
        report = make_rl_report(client, experiment, out, reps, command, random_frames)
    if log:
        run = client.create_run(experiment_id, run_name="report", tags={REPORT_TAG: "1"})
        report.run_id = run.info.run_id
        client.log_artifacts(report.run_id, str(out), "report")
        client.set_terminated(report.run_id, "FINISHED")
    return report


def experiment_id_of(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"--experiment {experiment!r}: no such experiment in this store; it has {names}")
    return found.experiment_id


def make_rl_report(client: MlflowClient, experiment: str, out: Path, reps: int, command: str,
                   random_frames: int) -> Report:
    results = load_runs(client, experiment)
    if not results:
        raise ValueError(f"--experiment {experiment!r} has no run with an evaluation (eval/return) yet")
    out.mkdir(parents=True, exist_ok=True)
    random = {}
    if random_frames:
        for task in sorted({r.task for r in results}):
            repeat = next(r.action_repeat for r in results if r.task == task)
            random[task] = random_returns(task, repeat, random_frames)
    rows = final_rows(results, random)
    curves = plot_curves(results, out / "curves.png")
    aggregates = aggregate(results, reps)
    write_csv(out / "final.csv", rows)
    write_csv(out / "runs.csv", [{"run": r.name, "task": r.task, "objective": r.objective, "seed": r.seed,
                                  "frames": int(r.steps[-1]), "final_return": r.final_return, "train_return": r.train_return,
                                  "final_success": float(r.successes[-1]), "normalised": r.final_score} for r in results])
    if aggregates is not None:
        write_csv(out / "aggregates.csv", [
            {"objective": o, "aggregate": name, "value": float(p), "ci_low": float(lo), "ci_high": float(hi)}
            for o, point in aggregates.points.items()
            for name, p, lo, hi in zip(AGGREGATES, point, *aggregates.intervals[o])])
        plot_aggregates(aggregates, out, reps)
    report = Report(experiment, command, results, rows, curves, aggregates, None, reps, random_frames)
    (out / "report.md").write_text(report.markdown())
    return report


def markers(section: str = "") -> tuple[str, str]:
    """The lines that enclose a generated section (`section` names one of several in one file)."""
    name = f" [{section}]" if section else ""
    return (f"<!-- begin: written by python -m wm.report{name}; edits between these lines are replaced -->",
            f"<!-- end: written by python -m wm.report{name} -->")


def markdown_template(path: Path, section: str = "") -> str:
    """The text `write_generated_section` will fill: the file, or just the markers for a new one.
    A file without the markers is refused, never overwritten."""
    begin, end = markers(section)
    text = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise ValueError(f"--markdown {path}: the file exists without the generated-section markers; add the two "
                         f"lines\n{begin}\n{end}\nwhere the report should go, or choose a new file")
    return text


def write_generated_section(path: Path, body: str, section: str = "") -> None:
    """Puts `body` between the markers (of `section`) in `path`, keeping the prose around them."""
    begin, end = markers(section)
    head, rest = markdown_template(path, section).split(begin, 1)
    tail = rest.split(end, 1)[1]
    new = f"{head}{begin}\n\n{body.strip()}\n\n{end}{tail}"
    atomic_write(path, lambda f: f.write(new.encode()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", nargs="+", required=True,
                        help="MLflow experiment(s) of the sweep(s) (the config's run.experiment); several share one store")
    parser.add_argument("--tracking-uri", default="", help="its store (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///runs/<experiment>/mlflow.db, where `python -m wm fit` and wm.sweep put it)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the report files (<out>/<experiment> for each of several experiments)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write every experiment's report into this markdown file, between its generated-"
                             "section markers (prose around them is kept)")
    parser.add_argument("--section", default="", help="with --markdown: the named generated section to write, for a "
                        "file that holds several (its markers carry the name)")
    parser.add_argument("--random-frames", type=int, default=0,
                        help="play random-policy episodes per task until they total this many env frames, for the "
                             "baseline column (10000: ~1000 toy episodes, 10 DMC ones)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples of the intervals")
    parser.add_argument("--no-log", action="store_true", help="write the files only, no report run in the store")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(Path("runs", args.experiment[0], "mlflow.db"))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"error: --tracking-uri {uri}: no such MLflow store; pass the sweep's --tracking-uri", file=sys.stderr)
        return 2
    try:
        if args.markdown is not None:
            markdown_template(args.markdown, args.section)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "wm.report", *(sys.argv[1:] if argv is None else argv)])
    several = len(args.experiment) > 1
    reports = []
    try:
        for experiment in args.experiment:
            out = args.out / experiment if several else args.out
            reports.append(make_report(uri, experiment, out, args.reps, log=not args.no_log, command=command,
                                       random_frames=args.random_frames))
            print(reports[-1].markdown())
            print(f"wrote {out}" + (f"; logged as run {reports[-1].run_id} of experiment {experiment!r}"
                                    if reports[-1].run_id else ""))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.markdown is not None:
        sections = []
        for report, experiment in zip(reports, args.experiment):
            folder = Path(os.path.relpath(args.out / experiment if several else args.out, args.markdown.parent))
            sections.append(report.markdown(level=2, folder=f"{folder.as_posix()}/"))
        write_generated_section(args.markdown, "\n".join(sections), args.section)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

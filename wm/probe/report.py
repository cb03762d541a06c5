"""The report of a probe study (`python -m wm.probe study`), written by `python -m wm.report`.

Reads every probed run and anchor of the experiment and writes, per dataset: the held-out R² of
the linear probe per state group and objective, with the anchors beside them; the R² of each
feature set (h, z, both); the open-loop R² and reward error against the imagination horizon; the
final held-out world-model loss. Values are means over seeds with 95% bootstrap intervals over
seeds (rliable's, one task: resampling the seeds), which three seeds make coarse. Figures:
`probe_<dataset>.png` (R² by group, R² against horizon).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from mlflow import MlflowClient
from rliable import library as rly
from rliable import metrics as rly_metrics

from wm.inspection import new_figure
from wm.objectives import objective_name
from wm.probe.evaluate import DUPLICATE_R2, NOT_COUNTED_TAG, overall_curve
from wm.probe.figures import R2_FLOOR

ANCHOR_ORDER = ("anchor_true", "anchor_actions", "anchor_blind", "anchor_untrained", "anchor_noise")
FEATURE_SUFFIXES = ("_embed", "_deter", "_stoch")  # r2 keys of the other feature sets than (h, z)


# Each kind of free anchor its own colour and dash in the curve figures, so that the actions (the anchor a claim
# is usually measured against) cannot be taken for noise: both lie near zero on some datasets.
ANCHOR_LINES = {"anchor_actions": ("black", "--"), "anchor_blind": ("tab:brown", "-."),
                "anchor_untrained": ("grey", ":"), "anchor_noise": ("darkgrey", (0, (1, 4)))}


def anchor_kind(cell: str) -> str:
    """The entry of ANCHOR_ORDER an anchor's cell is of (`anchor_blind_<objective>` -> `anchor_blind`)."""
    return next(kind for kind in ANCHOR_ORDER if cell == kind or cell.startswith(kind + "_"))


def anchor_line(cell: str) -> tuple[str, object]:
    """The colour and line style of a free anchor's horizontal line."""
    return ANCHOR_LINES[anchor_kind(cell)]


def free_anchor(cell: str) -> bool:
    """An anchor that needs no learning from the images: every anchor but the true state."""
    return cell.startswith("anchor_") and cell != "anchor_true"


HORIZONS = (0, 1, 5, 10, 15)
CURVE_PREFIX = "probe/curve/"  # `probe/curve/<overall or group>/r2`: a run's checkpoints probed over training, updates as the step


@dataclass
class ProbedRun:
    """One probed run (or anchor): its cell, seed and numbers."""

    name: str
    dataset: str
    cell: str  # the objective (or ablation) name, or the anchor's variant
    seed: int
    r2: dict[str, float]  # "<group>" / "<group>_deter" / "overall_stoch" ... -> R²
    rollout: dict[str, np.ndarray] = field(default_factory=dict)  # group -> R² at horizon 0..K
    reward_mse: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heldout_loss: float = float("nan")
    minutes: float = float("nan")  # the run's wall time
    not_counted: dict[str, str] = field(default_factory=dict)  # groups left out of overall -> the group each repeats
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # "overall" or a group -> updates -> R² from (h, z)

    @property
    def anchor(self) -> bool:
        return self.cell.startswith("anchor_")


def is_probe_experiment(client: MlflowClient, experiment_id: str) -> bool:
    runs = client.search_runs([experiment_id], filter_string="metrics.`probe/overall/r2` > -1e12", max_results=1)
    return bool(runs)


def latest_points(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """A curve's points (step -> value) from its latest evaluation: a run probed again holds each
    step's point of every evaluation, and the last written is the one that counts."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return {step: latest[step][1] for step in sorted(latest)}


def latest_curve(client: MlflowClient, run_id: str, key: str) -> np.ndarray:
    """A rollout curve (the horizon as the step) from its latest evaluation (`latest_points`)."""
    return np.array(list(latest_points(client, run_id, key).values()))


def load_probed_runs(client: MlflowClient, experiment_id: str, skip_tag: str) -> list[ProbedRun]:
    found = []
    for run in client.search_runs([experiment_id], max_results=50_000):
        metrics, params = run.data.metrics, run.data.params
        if skip_tag in run.data.tags or "probe/overall/r2" not in metrics:
            continue
        dataset = Path(params.get("data.dataset", "?")).name
        if "anchor" in params:
            cell = params["run.variant"]
        else:
            cell = objective_name(params.get("model.objective.class_path"), params.get("run.variant"))
        r2 = {key.removeprefix("probe/").replace("/r2", ""): value for key, value in metrics.items()
              if key.startswith("probe/") and not key.startswith(("probe/rollout/", "probe/curve/"))}
        rollout = {}
        for key in metrics:
            if key.startswith("probe/rollout/") and key.endswith("/r2"):
                rollout[key.removeprefix("probe/rollout/").removesuffix("/r2")] = latest_curve(client, run.info.run_id, key)
        curves = {key.removeprefix(CURVE_PREFIX).removesuffix("/r2"): latest_points(client, run.info.run_id, key)
                  for key in metrics if key.startswith(CURVE_PREFIX) and key.endswith("/r2")}
        minutes = training_minutes(run) if "anchor" not in params else np.nan
        found.append(ProbedRun(run.info.run_name, dataset, cell, int(params.get("seed_everything", 0)), r2, rollout,
                               latest_curve(client, run.info.run_id, "probe/rollout/reward_mse"),
                               metrics.get("heldout/loss", float("nan")), minutes,
                               json.loads(run.data.tags.get(NOT_COUNTED_TAG, "{}")),
                               curves))
    return sorted(found, key=lambda r: (r.dataset, r.anchor, r.cell, r.seed))


def training_minutes(run) -> float:
    """A run's training wall time: what its training logged over all its sessions; for a run
    trained before wm logged it, its end minus its start, unknown (NaN) if it was resumed, as that
    counts the time it lay stopped."""
    if "train/minutes" in run.data.metrics:
        return run.data.metrics["train/minutes"]
    if any(key.startswith("resumed") for key in run.data.params):
        return float("nan")
    return ((run.info.end_time or run.info.start_time) - run.info.start_time) / 60000


def interval(values: list[float], reps: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds and its 95% bootstrap interval (the mean itself for one seed)."""
    values = np.asarray([v for v in values if np.isfinite(v)], float)
    if len(values) == 0:
        return (np.nan, np.nan, np.nan)
    if len(values) == 1:
        return (float(values[0]),) * 3
    points, ranges = rly.get_interval_estimates({"x": values[:, None]}, lambda s: np.array([rly_metrics.aggregate_mean(s)]),
                                                reps=reps, random_state=np.random.RandomState(seed))
    return float(points["x"][0]), float(ranges["x"][0, 0]), float(ranges["x"][1, 0])


def cell_order(cells: set[str]) -> list[str]:
    objectives = sorted(c for c in cells if not c.startswith("anchor_"))
    anchors = sorted((c for c in cells if c.startswith("anchor_")),
                     key=lambda c: (ANCHOR_ORDER.index(anchor_kind(c)), c))
    return objectives + anchors


def fmt(point: tuple[float, float, float], digits: int = 2) -> str:
    mean, low, high = point
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if low == high else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


@dataclass
class ProbeReport:
    experiment: str
    command: str
    runs: list[ProbedRun]
    rows: list[dict]
    reps: int
    run_id: str | None = None

    def markdown(self, level: int = 1, folder: str = "") -> str:
        top, sub = "#" * level, "#" * (level + 1)
        lines = [f"{top} Probe report: experiment `{self.experiment}`", "",
                 f"{sum(not r.anchor for r in self.runs)} probed runs and {sum(r.anchor for r in self.runs)} anchors, "
                 f"made by `{self.command}`. Mean over seeds [95% bootstrap interval over seeds, {self.reps} resamples]; "
                 "R² on the held-out episodes, of a ridge probe fitted on the train episodes. Overall: the mean over "
                 "the distinct groups. A group that a linear map of another group gives (R² above "
                 f"{DUPLICATE_R2} on the train split) is shown but not counted, and of two groups that give each other "
                 "the first counts, so no quantity is counted twice; a group that never varies in a dataset is left out. "
                 "Anchors: the true state as the features (the top); the recorded actions alone (the last K actions of "
                 "the episode and the time step, K up to 32 chosen by cross-validation on the train split), which the "
                 "RSSM integrates into h for free; a blind model (the objective trained with every image one constant "
                 "grey, so that its RSSM learns from the actions and rewards alone); an untrained model (what a random network of that architecture "
                 "already holds; objectives that build the same encoder and RSSM share one, named after the first of "
                 "them); Gaussian noise features (the bottom). **Gain** is overall minus the best free anchor (every "
                 "anchor but the true state): a claim about what a representation learned rests on the gain, not on "
                 "R² alone.", ""]
        for dataset in sorted({r.dataset for r in self.runs}):
            rows = [row for row in self.rows if row["dataset"] == dataset]
            groups = [g for g in rows[0]["groups"]]
            not_counted = rows[0]["not_counted"]
            lines += [f"{sub} {dataset}", "",
                      "Held-out R² of the linear probe from the latent state (h and z) to each true-state group:", "",
                      "| objective | seeds | " + " | ".join(f"{g} (not counted)" if g in not_counted else g for g in groups)
                      + " | overall | gain over the best free anchor |",
                      "| --- | --- |" + " --- |" * (len(groups) + 2)]
            lines += [f"| {row['cell']} | {row['seeds']} | " + " | ".join(fmt(row['r2'][g]) for g in groups)
                      + f" | **{fmt(row['r2']['overall'])}** | {fmt(row['gain'])} |" for row in rows]
            best_cell, best_free = rows[0]["best_free"]
            if best_cell is not None:
                lines += ["", f"The best free anchor here is {best_cell}, overall {best_free:.2f}."]
            if not_counted:
                lines += ["", "Not counted in overall: " + "; ".join(f"{g}, a linear map of {o}"
                                                                     for g, o in not_counted.items()) + "."]
            models = [row for row in rows if np.isfinite(row["r2"]["overall_deter"][0])]  # trained, blind, untrained
            lines += ["", "Overall R² from the encoder's embedding of the one frame (the image pathway alone), h alone "
                      "(which integrates the actions), z alone and both; open-loop R² (mean over the groups) of imagined "
                      "states after k steps with the recorded actions (k = 0: the posterior at the rollouts' starts), "
                      "the reward's squared error, and the final held-out world-model loss:", "",
                      "| objective | embedding | h | z | both | " + " | ".join(f"imagined k={k}" for k in HORIZONS)
                      + " | reward error k=1 | reward error k=15 | held-out loss | minutes per run |",
                      "| --- |" + " --- |" * (4 + len(HORIZONS) + 4)]
            for row in models:
                lines.append(f"| {row['cell']} | {fmt(row['r2']['overall_embed'])} | {fmt(row['r2']['overall_deter'])} | "
                             f"{fmt(row['r2']['overall_stoch'])} | "
                             f"{fmt(row['r2']['overall'])} | " + " | ".join(fmt(row['horizon'].get(k, (np.nan,) * 3))
                                                                              for k in HORIZONS)
                             + f" | {fmt(row['reward'].get(1, (np.nan,) * 3), 3)} | {fmt(row['reward'].get(15, (np.nan,) * 3), 3)}"
                             f" | {fmt(row['heldout_loss'], 1)} | {fmt(row['minutes'], 1)} |")
            lines += ["", f"![probe of {dataset}]({folder}probe_{dataset}.png)", ""]
            curves = [row for row in rows if "overall" in row["curves"]]
            if curves:
                steps = sorted({n for row in curves for n in row["curves"]["overall"]})
                lines += ["Overall R² over training, from each run's checkpoints (learning speed and plateau):", "",
                          "| objective | " + " | ".join(f"{n:,} updates" for n in steps) + " |",
                          "| --- |" + " --- |" * len(steps)]
                lines += [f"| {row['cell']} | " + " | ".join(fmt(row['curves']['overall'].get(n, (np.nan,) * 3)) for n in steps) + " |"
                          for row in curves]
                lines += ["", f"![probe over training of {dataset}]({folder}probe_curve_{dataset}.png)", ""]
                counted = [g for g in groups if g not in not_counted]
                by_group = [(row, g) for g in counted for row in curves if g in row["curves"]]
                if by_group:
                    lines += ["Each counted group over training, from (h, z) (a claim about one quantity reads its own row):", "",
                              "| group | objective | " + " | ".join(f"{n:,} updates" for n in steps) + " |",
                              "| --- | --- |" + " --- |" * len(steps)]
                    lines += [f"| {g} | {row['cell']} | " + " | ".join(fmt(row['curves'][g].get(n, (np.nan,) * 3))
                                                                        for n in steps) + " |" for row, g in by_group]
                    lines += [""]
        return "\n".join(lines)


def summarise(runs: list[ProbedRun], reps: int) -> list[dict]:
    """Per dataset and cell: mean and interval over seeds of every number the report shows."""
    rows = []
    for dataset in sorted({r.dataset for r in runs}):
        here = [r for r in runs if r.dataset == dataset]
        groups = sorted({k for r in here for k in r.r2 if k != "overall" and not k.endswith(FEATURE_SUFFIXES)
                         and np.isfinite(r.r2[k])})  # a group that never varies in the dataset has no R²
        free = {cell: float(np.mean([r.r2["overall"] for r in here if r.cell == cell]))
                for cell in {r.cell for r in here} if free_anchor(cell)}
        best_cell = max(free, key=free.get) if free else None
        best_free = free[best_cell] if free else np.nan
        not_counted = next((r.not_counted for r in here if r.not_counted), {})
        for cell in cell_order({r.cell for r in here}):
            seeds = [r for r in here if r.cell == cell]
            keys = [*groups, "overall", *(f"overall{suffix}" for suffix in FEATURE_SUFFIXES)]
            curves = [overall_curve(r.rollout) for r in seeds if r.rollout]
            horizon = {k: interval([c[k] for c in curves if len(c) > k], reps) for k in HORIZONS
                       if any(len(c) > k for c in curves)}
            rows.append({
                "dataset": dataset, "cell": cell, "seeds": len(seeds), "groups": groups, "not_counted": not_counted,
                "best_free": (best_cell, best_free),
                "r2": {key: interval([r.r2.get(key, np.nan) for r in seeds], reps) for key in keys},
                "gain": (interval([r.r2["overall"] - best_free for r in seeds], reps) if not cell.startswith("anchor_")
                         else (np.nan,) * 3),
                "horizon": horizon,
                "reward": {k: interval([r.reward_mse[k] for r in seeds if len(r.reward_mse) > k], reps) for k in (1, 15)},
                "heldout_loss": interval([r.heldout_loss for r in seeds], reps),
                "curves": {name: {n: interval([r.curves[name][n] for r in seeds if n in r.curves.get(name, {})], reps)
                                  for n in sorted({n for r in seeds for n in r.curves.get(name, {})})}
                           for name in ("overall", *groups) if any(name in r.curves for r in seeds)},
                "minutes": interval([r.minutes for r in seeds], reps),
            })
    return rows


def plot(rows: list[dict], runs: list[ProbedRun], dataset: str, path: Path) -> None:
    """R² per group for each cell (bars with the seed interval), and overall R² against horizon."""
    here = [row for row in rows if row["dataset"] == dataset]
    groups = [*here[0]["groups"], "overall"]
    fig = new_figure(14, 4.6)
    bars, curves = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.85 / len(here)
    colours = colormaps["tab10"]
    for i, row in enumerate(here):
        means = np.array([max(row["r2"][g][0], R2_FLOOR) for g in groups])
        low = np.clip(means - np.array([max(row["r2"][g][1], R2_FLOOR) for g in groups]), 0, None)
        high = np.clip(np.array([max(row["r2"][g][2], R2_FLOOR) for g in groups]) - means, 0, None)
        anchor = row["cell"].startswith("anchor_")
        bars.bar(np.arange(len(groups)) + (i - (len(here) - 1) / 2) * width, means, width, yerr=(low, high),
                 label=row["cell"], color=colours(i % 10), alpha=0.45 if anchor else 0.95, hatch="//" if anchor else None,
                 error_kw={"lw": 0.8})
    labels = [f"{g}\n(= {here[0]['not_counted'][g]},\nnot counted)" if g in here[0]["not_counted"] else g for g in groups]
    bars.set_xticks(np.arange(len(groups)), labels, fontsize=8)
    bars.set(ylim=(R2_FLOOR, 1.05), ylabel="held-out R² (mean over seeds)", title=f"{dataset}: linear probe by state group")
    bars.axhline(0, color="grey", lw=0.8)
    bars.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))  # below the axes: many cells would cover the bars
    for i, row in enumerate(here):
        if row["cell"].startswith("anchor_") or not row["horizon"]:
            continue
        per_seed = [overall_curve(r.rollout) for r in runs if r.dataset == dataset and r.cell == row["cell"]]
        for curve in per_seed:  # one thin line per seed under the mean
            curves.plot(np.arange(len(curve)), np.maximum(curve, R2_FLOOR), color=colours(i % 10), lw=0.6, alpha=0.5)
        length = min(len(curve) for curve in per_seed)
        mean = np.mean([curve[:length] for curve in per_seed], 0)
        curves.plot(np.arange(length), np.maximum(mean, R2_FLOOR), color=colours(i % 10), lw=2, label=row["cell"])
    curves.set(ylim=(R2_FLOOR, 1.05), xlabel="imagined steps (0: the posterior)", ylabel="R² (mean over groups)",
               title="open loop: the probe on imagined states")
    curves.axhline(0, color="grey", lw=0.8)
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_curves(rows: list[dict], runs: list[ProbedRun], dataset: str, path: Path) -> None:
    """R² against updates, overall and for each counted group (one panel each): one line per cell
    (mean over seeds) with its seeds' band, and the free anchors as horizontal lines."""
    here = [r for r in rows if r["dataset"] == dataset]
    panels = ["overall", *(g for g in here[0]["groups"] if g not in here[0]["not_counted"]
                           and any(g in r["curves"] for r in here))]  # runs probed before wm logged groups: overall only
    steps = sorted({n for r in here for n in r["curves"].get("overall", {})})
    columns = min(3, len(panels))
    legend = 2.8  # inches right of the panels
    fig = new_figure(4.2 * columns + legend, 3.4 * -(-len(panels) // columns))
    grid = fig.subplots(-(-len(panels) // columns), columns, squeeze=False, sharey=True)
    colours = colormaps["tab10"]
    for axes, panel in zip(grid.flat, panels):
        for i, row in enumerate(r for r in here if r["curves"]):
            points = row["curves"].get(panel, {})
            if not points:
                continue
            mine = [r for r in runs if r.dataset == dataset and r.cell == row["cell"]]
            per_seed = [[r.curves.get(panel, {}).get(n, np.nan) for n in steps] for r in mine]
            axes.plot(steps, [points.get(n, (np.nan,))[0] for n in steps], marker="o", color=colours(i % 10), label=row["cell"])
            if len(per_seed) > 1:
                axes.fill_between(steps, np.nanmin(per_seed, 0), np.nanmax(per_seed, 0), color=colours(i % 10), alpha=0.2)
        for row in (r for r in here if free_anchor(r["cell"]) and not r["curves"]):
            colour, style = anchor_line(row["cell"])
            axes.axhline(row["r2"][panel][0], color=colour, ls=style, lw=1.2, label=f"{row['cell']} (free)")
        axes.set_xscale("log")
        axes.set_xticks(steps, [f"{n:,}" for n in steps])
        axes.minorticks_off()
        axes.set(xlabel="updates (log scale)", ylabel="held-out R² (mean over seeds)",
                 title=panel if panel == "overall" else f"{panel} (from h, z)")
        axes.axhline(0, color="grey", lw=0.8)
    for axes in grid.flat[len(panels):]:
        axes.set_visible(False)
    fig.legend(*grid.flat[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle(f"{dataset}: the probe over training (band: the seeds' range)")
    fig.tight_layout(rect=(0, 0, 1 - legend / (4.2 * columns + legend), 1))
    fig.savefig(path, dpi=110)


def write_rows(path: Path, rows: list[dict]) -> None:
    flat = []
    for row in rows:
        for key, (mean, low, high) in row["r2"].items():
            flat.append({"dataset": row["dataset"], "objective": row["cell"], "seeds": row["seeds"], "quantity": f"r2/{key}",
                         "mean": mean, "ci_low": low, "ci_high": high})
        for k, (mean, low, high) in row["horizon"].items():
            flat.append({"dataset": row["dataset"], "objective": row["cell"], "seeds": row["seeds"],
                         "quantity": f"r2_imagined/k={k}", "mean": mean, "ci_low": low, "ci_high": high})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)


def make_probe_report(client: MlflowClient, experiment_id: str, experiment: str, out: Path, reps: int, command: str,
                      skip_tag: str) -> ProbeReport:
    runs = load_probed_runs(client, experiment_id, skip_tag)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs, reps)
    for dataset in sorted({r.dataset for r in runs}):
        plot(rows, runs, dataset, out / f"probe_{dataset}.png")
        if any(row["curves"] for row in rows if row["dataset"] == dataset):
            plot_curves(rows, runs, dataset, out / f"probe_curve_{dataset}.png")
    write_rows(out / "probe.csv", rows)
    report = ProbeReport(experiment, command, runs, rows, reps)
    (out / "report.md").write_text(report.markdown())
    return report

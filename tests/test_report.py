"""The report tool on a real MLflow store: its aggregates against a direct computation, the
published DreamerV3 overlay, and the report run it logs (the store of real fits is in test_sweep)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from wm.envs import make_env
from wm.reference import FOLDER, REFERENCE_METHOD
from wm import report
from wm.report import REPORT_TAG, main, make_report

TASKS = ("dmc-walker_walk", "dmc-cheetah_run", "dmc-reacher_easy")
OBJECTIVES = {"barlow": "wm.objectives.Barlow", "reconstruction": "wm.objectives.Reconstruction"}
SEEDS = 4
FRAMES = (0, 50_000, 100_000)


def final_return(task: int, objective: int, seed: int) -> float:
    """Known final returns, spread over [0, 1000] without ties."""
    return float((137 * task + 311 * objective + 71 * seed) % 997 + 0.5 * objective)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store holding a sweep's runs as the fit logs them: its params, and eval
    returns against env frames that end at known final returns."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("dmc")
    for t, task in enumerate(TASKS):
        for o, (objective, class_path) in enumerate(OBJECTIVES.items()):
            for seed in range(SEEDS):
                run = client.create_run(experiment_id, run_name=f"{task}-{objective}-s{seed}")
                final = final_return(t, o, seed)
                client.log_batch(run.info.run_id, params=[
                    Param("env.task", task), Param("model.objective.class_path", class_path), Param("seed_everything", str(seed))],
                    metrics=[Metric("eval/return", final * (i + 1) / len(FRAMES), 0, frames) for i, frames in enumerate(FRAMES)])
                client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def test_aggregates_match_a_direct_computation(store, tmp_path):
    report = make_report(store, "dmc", tmp_path, reps=4000, log=False)
    aggregates = report.aggregates
    assert aggregates.tasks == sorted(TASKS) and aggregates.seeds == SEEDS
    rng = np.random.default_rng(1)
    for o, objective in enumerate(OBJECTIVES):
        # seeds x tasks, in the report's task order, normalised by the DMC maximum of 1000
        x = np.array([[final_return(TASKS.index(task), o, s) / 1000 for task in aggregates.tasks] for s in range(SEEDS)])
        np.testing.assert_allclose(aggregates.scores[objective], x)

        def direct(sample):
            flat = np.sort(sample.ravel())
            quarter = flat.size // 4  # 12 scores: the IQM is the mean of the middle 6
            return np.array([flat.mean(), np.median(flat), flat[quarter:flat.size - quarter].mean(),
                             np.maximum(1.0 - flat, 0.0).mean()])

        np.testing.assert_allclose(aggregates.points[objective], direct(x), rtol=1e-12)
        # Stratified bootstrap: seeds resampled with replacement within each task.
        resampled = np.array([direct(x[rng.integers(0, SEEDS, (SEEDS, len(TASKS))), np.arange(len(TASKS))])
                              for _ in range(4000)])
        low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
        np.testing.assert_allclose(aggregates.intervals[objective][0], low, atol=0.02)
        np.testing.assert_allclose(aggregates.intervals[objective][1], high, atol=0.02)
        assert (aggregates.intervals[objective][1] - aggregates.intervals[objective][0] > 0.01).all()
    table = (tmp_path / "report.md").read_text()
    iqm = aggregates.points["barlow"][2]
    assert "| barlow | " in table and f"{iqm:.3f} [" in table
    for name in ("curves.png", "aggregates.png", "profiles.png", "final.csv", "aggregates.csv", "runs.csv"):
        assert (tmp_path / name).stat().st_size > 1000 or name.endswith(".csv"), name


def test_the_published_dreamerv3_curve_is_drawn_for_a_dmc_task(store, tmp_path):
    report = make_report(store, "dmc", tmp_path, reps=100, log=False)
    reference = report.curves["dmc-walker_walk"][REFERENCE_METHOD]
    assert reference.seeds == 10 and reference.steps[-1] <= FRAMES[-1] * 1.05
    # binned over the runs' own 105k frames, not the published 1M: a curve, not a point or two
    assert len(reference.steps) >= 10 and reference.steps[0] < 0.1 * FRAMES[-1]
    # The table's DreamerV3 column: each published seed's mean within +-20k frames of the last
    # evaluation, averaged over seeds, read here straight from the shipped file.
    with gzip.open(FOLDER / "dmc_vision-dreamerv3.json.gz", "rt") as f:
        runs = [r for r in json.load(f) if r["task"] == "dmc_walker_walk"]
    expected = np.mean([np.mean([y for x, y in zip(r["xs"], r["ys"]) if abs(x - FRAMES[-1]) <= 20_000]) for r in runs])
    row = next(r for r in report.rows if r["task"] == "dmc-walker_walk" and r["objective"] == "barlow")
    assert row["dreamerv3_at_frames"] == pytest.approx(expected)
    assert 500 < expected < 700  # DreamerV3 at 100k frames of walker_walk: about 625
    # The overlay, like our curves, is the mean over seeds: between the seeds' own extremes.
    assert all(np.isfinite(reference.low)) and (reference.low <= reference.mean).all()


def test_the_command_logs_a_report_run_that_the_next_report_skips(store, tmp_path, capsys):
    assert main(["--experiment", "dmc", "--tracking-uri", store, "--out", str(tmp_path / "a"), "--reps", "200"]) == 0
    assert "# Report: experiment `dmc`" in capsys.readouterr().out
    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("dmc").experiment_id
    reports = [r for r in client.search_runs([experiment_id]) if REPORT_TAG in r.data.tags]
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert {"report/report.md", "report/curves.png", "report/aggregates.csv"} <= logged
    again = make_report(store, "dmc", tmp_path / "b", reps=100, log=False)
    assert len(again.results) == len(TASKS) * len(OBJECTIVES) * SEEDS  # the report run is not a result


def test_bad_input_is_refused_with_the_key(store, tmp_path, capsys):
    assert main(["--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    assert "--experiment 'nope': no such experiment" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["--experiment", "dmc", "--tracking-uri", missing, "--out", str(tmp_path)]) == 2
    assert "no such MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_random_baselines_and_a_results_page_kept_around_its_prose(tmp_path, capsys):
    """Two experiments of one store into one markdown page: the prose around the generated section
    stays, the section is replaced on the next run, figures are linked relative to the page, and
    the random-policy column is the mean return of uniformly random episodes of the task, over a frame budget."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for experiment, task in (("cpu-toy", "toy-catch"), ("cpu-small-target", "toy-catch_small")):
        experiment_id = client.create_experiment(experiment)
        for seed in range(2):
            run = client.create_run(experiment_id, run_name=f"{task}-barlow-s{seed}")
            client.log_batch(run.info.run_id, params=[
                Param("env.task", task), Param("model.objective.class_path", "wm.objectives.Barlow"),
                Param("seed_everything", str(seed)), Param("env.action_repeat", "1")],
                metrics=[Metric("eval/return", 0.5 + 0.1 * seed, 0, frames) for frames in (1000, 2000)]
                + [Metric("episode/return", value, 0, frames) for value, frames in ((-1.0, 500), (0.5, 1000), (0.25, 2000))]
                + [Metric("episode/count", count, 0, frames) for count, frames in ((30, 500), (8, 1000), (4, 2000))])
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\nprose before\n\n<!-- begin: written by python -m wm.report; edits between these "
                    "lines are replaced -->\nold\n<!-- end: written by python -m wm.report -->\n\nprose after\n")
    args = ["--experiment", "cpu-toy", "cpu-small-target", "--tracking-uri", uri, "--out", str(tmp_path / "docs" / "results"),
            "--markdown", str(page), "--random-frames", "300", "--reps", "100", "--no-log"]
    assert main(args) == 0
    text = page.read_text()
    assert text.startswith("# Results\n\nprose before\n") and text.endswith("\nprose after\n") and "\nold\n" not in text
    assert "## Report: experiment `cpu-toy`" in text and "## Report: experiment `cpu-small-target`" in text
    for link in ("results/cpu-toy/curves.png", "results/cpu-small-target/curves.png"):
        assert f"({link})" in text and (page.parent / link).is_file()
    # the random column: whole episodes of uniformly random actions until 300 frames, played here independently
    for task in ("toy-catch", "toy-catch_small"):
        env = make_env(task, action_repeat=1, seed=0)
        returns, frames = [], 0
        while frames < 300:
            env.reset()
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total, done, frames = total + reward, terminated or truncated, frames + 1
            returns.append(total)
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} | barlow | 2 | 2000 |"))
        assert row.split(" | ")[-2] == f"{np.mean(returns):.2f} ({len(returns)})"
        # training: the last 10 episodes reach back over whole logging intervals, 4 + 8 episodes here
        assert row.split(" | ")[-3] == f"{(4 * 0.25 + 8 * 0.5) / 12:.1f}"
        assert -1.0 < np.mean(returns) < 0.0 and len(returns) > 10  # a random paddle misses most balls
    assert main(args) == 0 and page.read_text() == text  # run again: the same page, prose kept once
    # a page without the markers is refused before anything is written
    other = tmp_path / "other.md"
    other.write_text("my notes\n")
    capsys.readouterr()
    assert main([*args[:5], "--out", str(tmp_path / "none"), "--markdown", str(other)]) == 2
    assert "without the generated-section markers" in capsys.readouterr().err
    assert other.read_text() == "my notes\n" and not (tmp_path / "none").exists()


def test_named_generated_sections_are_written_independently(tmp_path):
    """One page, two reports: each --section replaces only the text between its own markers."""
    page = tmp_path / "results.md"
    default, probes = report.markers(), report.markers("probes")
    page.write_text(f"# Results\n{default[0]}\nold RL\n{default[1]}\nprose between\n{probes[0]}\nold probes\n{probes[1]}\nthe last line\n")
    report.write_generated_section(page, "new probes", "probes")
    report.write_generated_section(page, "new RL")
    text = page.read_text()
    assert "new RL" in text and "new probes" in text and "old" not in text
    assert text.index("new RL") < text.index("prose between") < text.index("new probes") < text.index("the last line")
    with pytest.raises(ValueError, match=r"(?s)without the generated-section markers.*\[other\]"):
        report.markdown_template(page, "other")

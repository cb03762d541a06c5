"""Sweeps: expansion into runs, the SLURM script, and a real local sweep into one experiment,
which the report tool then reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from wm import report
from wm.sweep import main, slurm_script, sweep_commands

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs/quickstart.yaml"
TINY = ["--data.batch_size", "2", "--data.sequence_length", "8", "--env.prefill", "16", "--env.train_ratio", "16",
        "--env.total_steps", "24", "--env.eval_episodes", "1", "--trainer.enable_progress_bar", "false"]


def test_expands_tasks_objectives_seeds(tmp_path):
    commands = sweep_commands(QUICK, ["toy-catch", "toy-point_reach"], ["barlow", "mudreamer", "none"], [0, 1],
                              tmp_path, "", ["--trainer.devices", "1"])
    assert len(commands) == 12
    runs = {(c[c.index("--env.task") + 1], Path(c[c.index("--config", 5) + 1]).stem, c[c.index("--seed_everything") + 1])
            for c in commands}
    assert ("toy-point_reach", "mudreamer", "1") in runs and len(runs) == 12
    first = commands[0]
    assert first[first.index("--env.task") + 1] == "toy-catch"
    assert str(REPO / "configs/objective/barlow.yaml") in first
    assert first[first.index("--run.tracking_uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert first[-2:] == ["--trainer.devices", "1"]
    with pytest.raises(ValueError, match="unknown objectives \\['dino'\\]"):
        sweep_commands(QUICK, [], ["dino"], [0], tmp_path, "", [])


def test_slurm_script_runs_one_command_per_array_task(tmp_path):
    script = tmp_path / "sweep.sbatch"
    assert main(["--config", str(QUICK), "--objectives", "barlow", "none", "--seeds", "0", "1", "2",
                 "--root", str(tmp_path / "runs"), "--slurm", str(script), "--slurm-option=--gres=gpu:1"]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-5" in text and "#SBATCH --gres=gpu:1" in text
    assert 'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"' in text
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
    body = text[text.index("COMMANDS=(") : text.index(")\neval")]
    assert body.count("-m wm fit") == 6 and body.count("--ckpt_path last") == 6
    assert "'echo '\"'\"'a b'\"'\"''" in slurm_script([["echo", "a b"]], "x", [])  # quoted for bash
    # the array tasks start together: their shared store is made first, so none races to make it
    assert MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").search_experiments()


def test_local_sweep_fills_one_experiment(tmp_path):
    root = tmp_path / "runs"
    code = main(["--config", str(QUICK), "--objectives", "barlow", "none", "--seeds", "3", "--root", str(root), "--parallel", "2", "--", *TINY])
    assert code == 0
    # two at a time: each run's output is in its own log
    logs = sorted(p.name for p in (root / "logs").iterdir())
    assert logs == ["toy-catch-barlow-s3.log", "toy-catch-none-s3.log"]
    assert all((root / "logs" / name).stat().st_size > 0 for name in logs)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["toy-catch-barlow-s3", "toy-catch-none-s3"]
    assert {r.data.params["model.objective.class_path"] for r in runs} == {"wm.objectives.Barlow", "wm.objectives.NoObjective"}
    assert all(r.data.params["seed_everything"] == "3" for r in runs)
    assert all(client.list_artifacts(r.info.run_id) for r in runs)
    # Run again, the sweep resumes its runs: finished ones end at once, still one MLflow run each.
    assert main(["--config", str(QUICK), "--objectives", "barlow", "--seeds", "3", "--root", str(root), "--", *TINY]) == 0
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # The report reads the sweep's runs: one row per objective, toy-catch normalised, a report run.
    made = report.make_report(f"sqlite:///{root / 'mlflow.db'}", "quickstart", tmp_path / "report", reps=200)
    assert [(row["task"], row["objective"], row["seeds"]) for row in made.rows] == [("toy-catch", "barlow", 1), ("toy-catch", "none", 1)]
    returns = {r.info.run_name: client.get_metric_history(r.info.run_id, "eval/return")[-1].value for r in runs}
    assert [row["return_mean"] for row in made.rows] == [returns["toy-catch-barlow-s3"], returns["toy-catch-none-s3"]]
    assert made.aggregates.tasks == ["toy-catch"] and (tmp_path / "report" / "curves.png").is_file()
    assert client.get_run(made.run_id).data.tags[report.REPORT_TAG] == "1"

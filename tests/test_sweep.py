"""Sweeps: expansion into runs, the SLURM script, and a real local sweep into one experiment,
which the report tool then reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from wm import report
from wm.run.cli import main as wm_main
from wm.envs import available_tasks
from wm.objectives import objective_name
from wm.reference import published_runs
from wm.sweep import expected_gpu_hours, main, slurm_script, sweep_commands

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
    # the seed is the run's one seed (env and replay seeds derive from it); devices do not change what is trained
    assert "--env.seed" not in first and "--data.seed" not in first and "--run.variant" not in first
    assert first[first.index("--run.name") + 1] == "toy-catch-barlow-s0"
    # Overrides that change training tag the runs' variant and names: stable for the same overrides,
    # different for others; overrides that a resume may change (wm.run.identity.RESUMABLE) tag nothing.
    def names(extra):
        return [c[c.index("--run.name") + 1] for c in sweep_commands(QUICK, [], ["barlow"], [0, 1], tmp_path, "", extra)]
    assert names(["--env.total_steps", "99", "--trainer.enable_progress_bar=false"]) == ["toy-catch-barlow-s0", "toy-catch-barlow-s1"]
    tagged = names(["--model.optimizer.lr", "1e-4", "--env.eval_every", "5"])
    assert tagged == names(["--model.optimizer.lr", "1e-4"]) and tagged != names(["--model.optimizer.lr=2e-4"])
    assert [name[: -len("-s0")] for name in tagged] == [tagged[0][:-3]] * 2 and tagged[0].startswith("toy-catch-barlow-")
    variant = sweep_commands(QUICK, [], ["barlow"], [0], tmp_path, "", ["--model.optimizer.lr", "1e-4"])[0]
    assert variant[variant.index("--run.variant") + 1] == tagged[0].removeprefix("toy-catch-").removesuffix("-s0")
    with pytest.raises(ValueError, match="unknown objectives \\['dino'\\]"):
        sweep_commands(QUICK, [], ["dino"], [0], tmp_path, "", [])
    with pytest.raises(ValueError, match="unknown tasks \\['toy-cach'\\]; valid: toy-point_reach, toy-catch, "):
        sweep_commands(QUICK, ["toy-cach"], ["barlow"], [0], tmp_path, "", [])


PAPER = sorted((REPO / "configs/paper").glob("*.yaml"))
# DMC: the 20 tasks of DreamerV3's published vision curves; distractors: DreamerPro's natural-background six
DMC20 = sorted({run["task"].removeprefix("dmc_") for run in published_runs("dmc_vision-dreamerv3.json.gz")})
DREAMERPRO_NATURAL = ["ball_in_cup_catch", "cartpole_swingup", "cheetah_run", "finger_spin", "reacher_easy", "walker_run"]


def test_each_objective_config_names_its_runs_after_its_file():
    """A sweep names a run's log after the objective config's file; the fit names the run after the
    config's variant, or the objective: the two must agree."""
    for config in sorted((REPO / "configs/objective").glob("*.yaml")):
        data = yaml.safe_load(config.read_text())
        variant = (data.get("run") or {}).get("variant") or objective_name(data["model"]["objective"]["class_path"])
        assert variant == config.stem, config


def test_gpu_hours_scale_the_published_wall_clock_by_update_count():
    # Published: 1M env steps of walker-walk, action repeat 2, train ratio 512, B16 T64, so 250k updates,
    # took 4.4 h (R2-Dreamer) and 7.0 h (DreamerV3 with its decoder) on one RTX 3080 Ti.
    dmc = REPO / "configs/dmc.yaml"
    assert expected_gpu_hours(dmc, "barlow") == pytest.approx(4.4)
    assert expected_gpu_hours(dmc, "reconstruction") == pytest.approx(7.0)
    assert expected_gpu_hours(dmc, "mudreamer") == pytest.approx(4.4)
    assert expected_gpu_hours(dmc, "barlow_b8") == pytest.approx(8.8)  # B = 8: twice the updates
    assert expected_gpu_hours(dmc, "dreamerpro") == pytest.approx(10.4)  # its own published time
    assert expected_gpu_hours(dmc, "infonce") == pytest.approx(4.4)
    # Atari 100k: 400k frames / action repeat 4 * train ratio 128 / 1024 = 12,500 updates
    assert expected_gpu_hours(REPO / "configs/atari100k.yaml", "barlow") == pytest.approx(4.4 * 12_500 / 250_000)
    assert expected_gpu_hours(REPO / "configs/cpu/toy.yaml", "barlow") is None  # size1M: no published figure


@pytest.mark.parametrize("preset", PAPER, ids=[p.stem for p in PAPER])
def test_paper_presets_are_one_command_with_their_gpu_hours(preset, capsys):
    assert main(["--preset", str(preset), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    commands = out.splitlines()
    tasks = sorted({c.split("--env.task ")[1].split()[0] for c in commands})
    objectives = {Path(c.split(" --config ")[2].split()[0]).stem for c in commands}
    seeds = {c.split("--seed_everything ")[1].split()[0] for c in commands}
    papers = {"barlow", "reconstruction", "mudreamer", "none", "barlow_augment", "barlow_b8"}
    # both papers ran DreamerPro on DMC, DMC-Subtle and the moving backgrounds
    expected = papers | {"dreamerpro"} if preset.stem in ("dmc", "dmc_subtle", "dmc_distracting") else papers
    assert objectives == expected
    assert seeds == {"0", "1", "2", "3", "4"} and len(commands) == len(tasks) * len(expected) * 5
    expected_tasks = {
        "dmc": sorted(f"dmc-{t}" for t in DMC20),
        "dmc_subtle": available_tasks(["dmc_subtle"]),
        "dmc_distracting": sorted(f"dmc_distracting-{t}" for t in DREAMERPRO_NATURAL),
        "atari100k": available_tasks(["atari"]),
        "metaworld": available_tasks(["metaworld"]),
    }[preset.stem]
    assert tasks == sorted(expected_tasks)
    # the total the preset's header states is the one the sweep prints
    stated = preset.read_text().split("Expected: about ")[1].split(" GPU-hours")[0]
    assert f"about {stated} GPU-hours" in err and f"({len(commands):,} runs;" in err
    assert f"| `configs/paper/{preset.name}` | {len(commands):,} | about {stated} |" in (REPO / "README.md").read_text()


def test_a_preset_gives_defaults_and_refuses_unknown_keys(tmp_path, capsys):
    preset = REPO / "configs/paper/dmc_subtle.yaml"
    assert main(["--preset", str(preset), "--objectives", "barlow", "--seeds", "7", "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 5 and all("--seed_everything 7 " in c and "objective/barlow.yaml" in c for c in commands)
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: configs/dmc.yaml\nseed: [0]\n")
    with pytest.raises(SystemExit, match="unknown keys \\['seed'\\]; a preset has config, tasks, objectives, seeds"):
        main(["--preset", str(bad), "--dry-run"])
    with pytest.raises(SystemExit, match="give --config .* or --preset"):
        main(["--dry-run"])


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


@pytest.mark.slow  # two parallel fits and a report, about 40 s
def test_local_sweep_fills_one_experiment(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    code = main(["--config", str(QUICK), "--objectives", "barlow", "barlow_augment", "--seeds", "3", "--root", str(root), "--parallel", "2", "--", *TINY])
    assert code == 0
    # The overrides after -- change what the runs train: their names carry a tag of them.
    tag = next(root.glob("toy-catch-barlow-*-s3")).name.split("-")[-2]
    assert len(tag) == 6 and sorted(p.name for p in root.glob("toy-catch-*")) == \
        [f"toy-catch-barlow-{tag}-s3", f"toy-catch-barlow_augment-{tag}-s3"]
    # two at a time: each run's output is in its own log
    logs = sorted(p.name for p in (root / "logs").iterdir())
    assert logs == [f"toy-catch-barlow-{tag}-s3.log", f"toy-catch-barlow_augment-{tag}-s3.log"]
    assert all((root / "logs" / name).stat().st_size > 0 for name in logs)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"toy-catch-barlow-{tag}-s3", f"toy-catch-barlow_augment-{tag}-s3"]
    # the ablation is a Barlow run with augmentation, named and reported as its own cell
    params = {r.info.run_name: r.data.params for r in runs}
    assert {p["model.objective.class_path"] for p in params.values()} == {"wm.objectives.Barlow"}
    assert params[f"toy-catch-barlow_augment-{tag}-s3"]["model.objective.init_args.augment"] == "True"
    assert params[f"toy-catch-barlow-{tag}-s3"]["model.objective.init_args.augment"] == "False"
    assert all(r.data.params["seed_everything"] == "3" for r in runs)
    assert all(client.list_artifacts(r.info.run_id) for r in runs)
    # Run again, the sweep resumes its runs: finished ones end at once, still one MLflow run each.
    assert main(["--config", str(QUICK), "--objectives", "barlow", "--seeds", "3", "--root", str(root), "--", *TINY]) == 0
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # Run again with another learning rate: a new run beside the first, which it leaves as it was.
    assert main(["--config", str(QUICK), "--objectives", "barlow", "--seeds", "3", "--root", str(root), "--", *TINY,
                 "--model.optimizer.lr", "1e-3"]) == 0
    after = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])}
    (new,) = set(after) - {r.info.run_name for r in runs}
    assert new.startswith("toy-catch-barlow-") and new != f"toy-catch-barlow-{tag}-s3" and after[new].info.status == "FINISHED"
    assert after[new].data.params["model.optimizer.lr"] == "0.001"
    assert after[f"toy-catch-barlow-{tag}-s3"].data.params["model.optimizer.lr"] == "0.0003"
    assert after[f"toy-catch-barlow-{tag}-s3"].data.metrics == {r.info.run_name: r for r in runs}[f"toy-catch-barlow-{tag}-s3"].data.metrics
    # `test` from anywhere with only the checkpoint finds its run in the sweep's shared store.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    wm_main(["test", "--ckpt_path", str(root / f"toy-catch-barlow_augment-{tag}-s3/checkpoints/last.ckpt"),
             "--env.eval_episodes", "2", "--env.eval_videos", "0"])
    tested = client.get_run(after[f"toy-catch-barlow_augment-{tag}-s3"].info.run_id)
    assert tested.data.metrics["test/episodes"] == 2 and tested.info.status == "FINISHED"
    assert not any(elsewhere.iterdir()), "no store or run folder made where the command ran"
    # The report reads the sweep's runs: one row per variant, toy-catch normalised, a report run.
    made = report.make_report(f"sqlite:///{root / 'mlflow.db'}", "quickstart", tmp_path / "report", reps=200)
    other = new.split("-")[-2]
    assert sorted((row["task"], row["objective"], row["seeds"]) for row in made.rows) == [
        ("toy-catch", f"barlow-{other}", 1), ("toy-catch", f"barlow-{tag}", 1), ("toy-catch", f"barlow_augment-{tag}", 1)]
    returns = {name: client.get_metric_history(r.info.run_id, "eval/return")[-1].value for name, r in after.items()}
    by_cell = {row["objective"]: row["return_mean"] for row in made.rows}
    assert by_cell[f"barlow-{tag}"] == returns[f"toy-catch-barlow-{tag}-s3"]
    assert by_cell[f"barlow_augment-{tag}"] == returns[f"toy-catch-barlow_augment-{tag}-s3"]
    assert made.aggregates.tasks == ["toy-catch"] and (tmp_path / "report" / "curves.png").is_file()
    assert client.get_run(made.run_id).data.tags[report.REPORT_TAG] == "1"

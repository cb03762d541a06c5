"""`python -m wm.probe study`: one study group from its config (configs/probe/*.yaml), checked
whole before anything is collected, trained or logged.

A study config names an MLflow `experiment` and its `datasets` (each a `wm.probe collect`), the
`objectives` and `seeds` to train on each (`wm.probe train` with the `train` arguments), the
objectives also trained `blind` (with `blind_seeds`), the checkpoints probed over training
(`curve`, in updates) and the `eval` arguments of every probe.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from wm.probe.commands import PROBED_TAG, PROBED_UPDATES_TAG, anchor_name, distinct_cores, eval_parser
from wm.probe.dataset import Collection, ProbeDataset, collect
from wm.probe.offline import TRAIN_DEFAULTS
from wm.run.command import CheckpointError, read_checkpoint
from wm.run.files import atomic_write
from wm.run.identity import run_name
from wm.run.tracking import create_store, sqlite_uri
from wm.run.validation import closest, refuse, task_problems
from wm.sweep import OBJECTIVE_CONFIGS, objective_configs, read_yaml, run_locally

REQUIRED = ("experiment", "datasets", "objectives", "seeds")
OPTIONAL = ("root", "data", "blind", "blind_seeds", "curve", "parallel", "workers", "train", "eval")
DATASET_REQUIRED = ("task", "frames")
DATASET_OPTIONAL = ("name", "action_repeat", "time_limit", "seed", "policy", "epsilon", "heldout_every", "video_dir")


def whole_number(value, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def key_problems(given: dict, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> list[str]:
    known, what = [*required, *optional], f"a study{' dataset' if where else ''}"
    problems = [f"{where}{key}: not a key of {what}.{closest(str(key), known)} The keys: {', '.join(known)}."
                for key in given if key not in known]
    return problems + [f"{where}{key}: missing; {what} needs {' and '.join(required)}." for key in required if key not in given]


def train_setting(train: list[str], key: str):
    """What `wm.probe train` takes for a dotted `key` from a study's `train` arguments, read in
    order as the CLI does: `--key value` (or `--key=value`), or a `--config` file that sets it, the
    last one winning; else its default."""
    value = TRAIN_DEFAULTS.get(key)
    for flag, argument in pairs(train):
        if flag == "--config" and Path(argument).is_file():
            found = read_yaml(Path(argument))
            for part in key.split("."):
                found = found.get(part) if isinstance(found, dict) else None
            value = value if found is None else found
        elif flag == f"--{key}":
            value = yaml.safe_load(argument)
    return value


def pairs(arguments: list[str]) -> list[tuple[str, str]]:
    """(flag, value) of command-line arguments, `--flag value` and `--flag=value` alike."""
    split = [part for argument in arguments
             for part in (argument.split("=", 1) if argument.startswith("--") and "=" in argument else [argument])]
    return [(flag, value) for flag, value in zip(split, split[1:]) if flag.startswith("--")]


def dataset_problems(spec, i: int) -> list[str]:
    where = f"datasets[{i}]."
    if not isinstance(spec, dict):
        return [f"datasets[{i}]={spec!r}: a dataset is a mapping with a task and frames, e.g. "
                "{task: dmc-cartpole_swingup, frames: 20000}."]
    problems = key_problems(spec, DATASET_REQUIRED, DATASET_OPTIONAL, where)
    if "task" in spec:
        problems += task_problems(spec["task"], f"{where}task")
    problems += [f"{where}{key}={spec[key]!r} must be a whole number >= {low}; fix it in the study config."
                 for key, low in (("frames", 1), ("action_repeat", 1), ("time_limit", 1), ("heldout_every", 2), ("seed", 0))
                 if spec.get(key) is not None and not whole_number(spec[key], low)]
    epsilon = spec.get("epsilon", 0.0)
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon <= 1:
        problems.append(f"{where}epsilon={epsilon!r} must be a share of random actions between 0 and 1.")
    for key in ("policy", "video_dir"):
        if spec.get(key) is not None and not Path(spec[key]).exists():
            problems.append(f"{where}{key}={spec[key]!r}: no such {'checkpoint' if key == 'policy' else 'folder'}; "
                            "give an existing path or leave the key out.")
    return problems


def study_problems(study) -> list[str]:
    """Every problem of a study config, each naming its key, what is wrong and the fix."""
    if not isinstance(study, dict):
        return [f"a study config is a mapping of {', '.join((*REQUIRED, *OPTIONAL))}; this one is {type(study).__name__}."]
    problems = key_problems(study, REQUIRED, OPTIONAL, "")
    valid = objective_configs()
    for key in ("objectives", "blind"):
        names = study.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"{key}={names!r} must be a list of objective names, e.g. [barlow, reconstruction].")
            continue
        problems += [f"{key}: {name!r} is not an objective.{closest(name, valid)} The objectives (configs/objective/): "
                     f"{', '.join(valid)}." for name in names if name not in valid]
    for key in ("seeds", "blind_seeds"):
        seeds = study.get(key, [0])
        if not isinstance(seeds, list) or not seeds or not all(whole_number(s, 0) for s in seeds) or len(set(seeds)) < len(seeds):
            problems.append(f"{key}={seeds!r} must be a list of distinct whole numbers >= 0, e.g. [0, 1, 2].")
    if "blind_seeds" in study and not study.get("blind"):
        problems.append("blind_seeds is given but blind is not: name the objectives to train blind (blind: [barlow]) "
                        "or leave blind_seeds out.")
    datasets = study.get("datasets", [{}])
    if not isinstance(datasets, list) or not datasets:
        problems.append("datasets must be a list of at least one dataset, e.g. [{task: dmc-cartpole_swingup, frames: 20000}].")
    else:
        for i, spec in enumerate(datasets):
            problems += dataset_problems(spec, i)
        names = [spec.get("name", spec.get("task")) for spec in datasets if isinstance(spec, dict)]
        problems += [f"datasets: two datasets share the folder {name!r}; give one of them its own name (name: ...)."
                     for name in sorted({n for n in names if names.count(n) > 1})]
    for key in ("train", "eval"):
        if not isinstance(study.get(key, []), list):
            problems.append(f"{key}={study[key]!r} must be a list of command-line arguments, e.g. [--trainer.max_steps, \"1000\"].")
    problems += [f"{key}={study[key]!r} must be a whole number >= 1." for key in ("parallel", "workers")
                 if key in study and not whole_number(study[key], 1)]
    return problems + curve_problems(study)


def curve_problems(study: dict) -> list[str]:
    """A curve point the training never checkpoints would be found missing only after every run."""
    curve = study.get("curve")
    if curve is None:
        return []
    if not isinstance(curve, list) or not curve or not all(whole_number(n, 1) for n in curve):
        return [f"curve={curve!r} must be a list of update counts >= 1, e.g. [250, 500, 1000]."]
    train = [str(a) for a in study.get("train", [])] if isinstance(study.get("train", []), list) else []
    missing = [f"--config {path}" for flag, path in pairs(train) if flag == "--config" and not Path(path).is_file()]
    if missing:
        return [f"train: {', '.join(missing)}: no such file (paths are relative to where the study runs)."]
    updates, every = train_setting(train, "trainer.max_steps"), train_setting(train, "run.checkpoint_every")
    if not (whole_number(updates, 1) and whole_number(every, 1)):
        return []  # not numbers: `wm.probe train` refuses them, before it creates a run
    unreached = [n for n in curve if n > updates or n % every]
    if unreached:
        return [f"curve: no checkpoint at {', '.join(map(str, unreached))} updates: a run trains {updates} updates "
                f"(trainer.max_steps) and keeps one every {every} (run.checkpoint_every). Probe multiples of {every} up to "
                f"{updates}, or change those in train."]
    return []


def study_main(argv: list[str]) -> None:
    """One study group: collect its datasets (once), train every objective and seed on each, probe
    every finished run, and the anchors; all in one MLflow experiment for `python -m wm.report`."""
    parser = argparse.ArgumentParser(prog="python -m wm.probe study", description=study_main.__doc__)
    parser.add_argument("--config", type=Path, required=True, help="a study config, e.g. configs/probe/dmc.yaml")
    parser.add_argument("--parallel", type=int, default=None, help="training runs at once (default: the config's)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--probe-only", action="store_true",
                        help="train nothing: probe the runs that have finished and add the anchors (a long study seen midway)")
    args = parser.parse_args(argv)
    if args.parallel is not None and args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: give at least 1 (training runs at once)")
    study = yaml.safe_load(args.config.read_text())
    refuse(study_problems(study), f"the study config {args.config}")
    experiment, root = study["experiment"], Path(study.get("root", f"runs/{study['experiment']}"))
    data_root = Path(study.get("data", "data/probe"))
    seeds, objectives = study["seeds"], study["objectives"]
    started = time.perf_counter()
    datasets = []
    for spec in study["datasets"]:
        folder = data_root / spec.get("name", spec["task"])
        if not (folder / "dataset.json").exists() and not args.dry_run:
            collect(Collection(spec["task"], spec["frames"], spec.get("action_repeat", 2), spec.get("time_limit"),
                               spec.get("seed", 0), spec.get("policy"), spec.get("epsilon", 0.0),
                               spec.get("heldout_every", 5), spec.get("video_dir")), folder, study.get("workers", 2))
        datasets.append(folder)
    uri = sqlite_uri(root / "mlflow.db")
    runs = {}  # run name -> (its dataset folder, its training command)
    # `blind`: objectives also trained blind (every image a constant), the anchor of what the actions
    # and rewards alone teach the RSSM: cells `anchor_blind_<objective>`, with `blind_seeds` (default: every seed).
    blind_seeds = study.get("blind_seeds", seeds)
    cells = [(objective, objective, [], seeds) for objective in objectives]
    cells += [(objective, f"anchor_blind_{objective}", ["--model.blind", "true", "--run.variant", f"anchor_blind_{objective}"],
               blind_seeds) for objective in study.get("blind", [])]
    for folder in datasets:
        for objective, cell, extra, cell_seeds in cells:
            for seed in cell_seeds:
                name = run_name(folder.name, cell, seed)
                runs[name] = (folder, [sys.executable, "-m", "wm.probe", "train", *map(str, study.get("train", [])),
                                       "--config", str(OBJECTIVE_CONFIGS / f"{objective}.yaml"), *extra, "--data.dataset",
                                       str(folder), "--seed_everything", str(seed), "--run.name", name,
                                       "--run.root", str(root), "--run.experiment", experiment,
                                       "--run.tracking_uri", uri, "--ckpt_path", "last"])
    if args.dry_run:
        print("\n".join(shlex.join(command) for _, command in runs.values()))
        return
    root.mkdir(parents=True, exist_ok=True)
    create_store(root / "mlflow.db")
    (root / "logs").mkdir(exist_ok=True)
    # A study run again (with more objectives or seeds) trains, probes and anchors only what it has
    # not yet: a finished run is not resumed, which would only move its end, unless the study's
    # updates were raised since (trainer.max_steps): then it is extended from its last checkpoint.
    client = MlflowClient(uri)
    target = train_setting([str(a) for a in study.get("train", [])], "trainer.max_steps")
    finished = finished_runs(runs_of(client, experiment), root, target)
    to_train = [] if args.probe_only else [command for name, (_, command) in runs.items() if name not in finished]
    failed = run_locally(to_train, args.parallel or study.get("parallel", 1), root / "logs") if to_train else 0
    known = runs_of(client, experiment)  # after training: what it finished
    done = {run.info.run_name: run.data.tags for run in known}
    ended = {run.info.run_name for run in known if run.info.status == "FINISHED"}
    finished = finished_runs(known, root, target)
    # The probes of the finished runs not yet probed at their updates (a run stopped midway is probed
    # once it has finished, an extended one again), then the anchors not yet probed: `wm.probe eval`
    # processes, as many at a time as training runs (logs in <root>/logs/<run>.probe.log).
    evals = {}  # log name -> the eval's arguments
    evaluation = [str(a) for a in study.get("eval", [])]
    for name, (folder, _) in runs.items():
        checkpoint = root / name / "checkpoints" / "last.ckpt"
        tagged = (done.get(name, {}).get(PROBED_TAG), done.get(name, {}).get(PROBED_UPDATES_TAG))
        if name in finished and tagged != (str(folder.resolve()), str(finished[name])):
            curve = ["--curve", *map(str, study["curve"])] if "curve" in study else []
            evals[f"{name}.probe"] = ["--ckpt", str(checkpoint), "--data", str(folder), *evaluation, *curve]
    probed = len(evals)
    for folder in datasets:
        common = ["--data", str(folder), "--experiment", experiment, "--root", str(root), *evaluation]
        anchors = [["--anchor", "true"], ["--anchor", "actions"], *(["--anchor", "noise", "--seed", str(seed)] for seed in seeds),
                   *(["--anchor", "untrained", "--objective", objective, "--seed", str(seeds[0])]  # one seed: the floor
                     for objective in distinct_cores(objectives))]
        dataset = ProbeDataset(folder)
        for anchor in anchors:
            name = anchor_name(eval_parser().parse_args([*common, *anchor]), dataset)
            if name not in ended:  # new, or a probe that did not end (killed midway, or by a wm whose anchor runs never ended)
                evals[f"{name}.probe"] = [*common, *anchor]
    failed_evals = run_locally([[sys.executable, "-m", "wm.probe", "eval", *argv] for argv in evals.values()],
                               args.parallel or study.get("parallel", 1), root / "logs", names=list(evals), what="probes")
    summary = {"experiment": experiment, "store": uri, "datasets": [str(d) for d in datasets],
               "seconds": round(time.perf_counter() - started), "failed": failed, "failed_probes": failed_evals}
    text = json.dumps(summary, indent=1).encode()
    atomic_write(root / "study.json", lambda f: f.write(text))
    unfinished = [name for name in runs if name not in finished]
    if unfinished:
        print(f"not finished, so not probed: {', '.join(unfinished)} (the study run again trains them)")
    print(f"study {experiment}: {len(runs)} runs ({len(runs) - len(to_train)} already finished or not trained), "
          f"{probed} probed, in {summary['seconds'] / 60:.0f} min; "
          f"report it with: python -m wm.report --experiment {experiment} --tracking-uri {uri} --out {root / 'report'}")


def finished_runs(runs: list, root: Path, updates) -> dict[str, int]:
    """The runs that finished their training, with the updates their last checkpoint took: FINISHED
    in MLflow with a last.ckpt of at least `updates` (fewer: the study was extended since)."""
    finished = {}
    for run in (r for r in runs if r.info.status == "FINISHED"):
        taken = trained_updates(root / run.info.run_name / "checkpoints" / "last.ckpt")
        if taken is not None and (not whole_number(updates, 1) or taken >= updates):
            finished[run.info.run_name] = taken
    return finished


def trained_updates(checkpoint: Path) -> int | None:
    """The updates a checkpoint's run had taken (None: no checkpoint, or one that does not load)."""
    try:
        return int(read_checkpoint(checkpoint)["global_step"])
    except CheckpointError:  # missing or damaged: `wm.probe train --ckpt_path last` says which and what to do
        return None


def runs_of(client: MlflowClient, experiment: str) -> list:
    """Every MLflow run of `experiment` (none before it exists)."""
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=50_000) if found else []

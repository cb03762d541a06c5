"""The command lines of `python -m wm.probe` collect and eval; `train` is wm.probe.offline's, `study` wm.probe.study's."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from wm.run.tracking import create_store, ensure_experiment, sqlite_file, sqlite_uri
from wm.probe import evaluate
from wm.probe.dataset import Collection, ProbeDataset, collect
from wm.probe.figures import plot_probe
from wm.run.identity import RECORD_KEY, run_name
from wm.sweep import OBJECTIVE_CONFIGS, objective_configs

ANCHORS = ("true", "noise", "untrained", "actions")
GAIN_KEY = "probe_gain/over_actions"  # a probed run's overall R² minus its dataset's actions anchor
PROBED_TAG = "wm.probe.dataset"  # on a run whose checkpoint was probed: the dataset it was probed on
PROBED_UPDATES_TAG = "wm.probe.updates"  # ... and the updates its checkpoint had taken (an extended run is probed again)
ANCHOR_TAG = "wm.probe.anchor"


# ------------------------------------------------------------------------------------ collect
def collect_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m wm.probe collect", description="record episodes with their true state")
    parser.add_argument("--task", required=True, help="any task of wm.envs, e.g. dmc-cartpole_swingup")
    parser.add_argument("--frames", type=int, required=True, help="env frames to collect (whole episodes: a little more)")
    parser.add_argument("--out", type=Path, required=True, help="the dataset's folder")
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--time-limit", type=int, default=None, help="agent steps per episode (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="episode i resets with seed + i")
    parser.add_argument("--policy", default=None, help="a checkpoint whose policy acts (default: random actions)")
    parser.add_argument("--epsilon", type=float, default=0.0, help="share of random actions with --policy")
    parser.add_argument("--heldout-every", type=int, default=5, help="every Nth episode is held out")
    parser.add_argument("--video-dir", default=None, help="background videos of dmc_distracting tasks")
    parser.add_argument("--workers", type=int, default=1, help="processes that play episodes side by side")
    args = parser.parse_args(argv)
    dataset = collect(Collection(args.task, args.frames, args.action_repeat, args.time_limit, args.seed, args.policy,
                                 args.epsilon, args.heldout_every, args.video_dir), args.out, args.workers)
    splits = dataset.info["splits"]
    print(f"{dataset.folder}: {splits['train']['episodes']} train and {splits['heldout']['episodes']} held-out episodes "
          f"({splits['train']['frames'] + splits['heldout']['frames']:,} frames) in {dataset.info['seconds']:.0f} s; "
          f"true-state groups: {', '.join(f'{g} ({d})' for g, d in dataset.groups.items())}")
    anchor = dataset.info["action_anchor"]
    print(f"  the actions alone (the last {anchor['lags']} and the time step) give overall R² {anchor['overall_r2']:.2f} of "
          f"the state: " + ", ".join(f"{g} {r2:.2f}" for g, r2 in anchor["r2"].items()))


# --------------------------------------------------------------------------------------- eval
def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wm.probe eval", description="linear probes of the latent state")
    parser.add_argument("--data", type=Path, required=True, help="a dataset made by `python -m wm.probe collect`")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", type=Path, help="a checkpoint of `python -m wm.probe train` or `python -m wm fit`")
    what.add_argument("--anchor", choices=ANCHORS, help="the true state, noise, an untrained model, "
                      "or the recorded actions alone (the last K and the time step)")
    parser.add_argument("--objective", default="barlow", help="--anchor untrained: an objective config's name")
    parser.add_argument("--size", default="size1M", help="--anchor untrained (and noise: its feature width)")
    parser.add_argument("--seed", type=int, default=0, help="latent sampling, rollout starts; anchors' weights or noise")
    parser.add_argument("--observe", type=int, default=5, help="steps a rollout's start has observed, at least")
    parser.add_argument("--horizon", type=int, default=15, help="imagined steps")
    parser.add_argument("--out", type=Path, default=None, help="CSV and figure folder (default: <run folder>/probe)")
    parser.add_argument("--experiment", default="probe", help="anchors: the MLflow experiment of their runs")
    parser.add_argument("--root", type=Path, default=Path("runs/probe"), help="anchors: their store's folder")
    parser.add_argument("--tracking-uri", default="", help="anchors: their store (default: <root>/mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="write the CSV and figure only")
    parser.add_argument("--curve", type=int, nargs="*", default=None, metavar="UPDATES",
                        help="--ckpt of `wm.probe train`: also probe its updates=N checkpoints (these N, or all), "
                             "logged as probe/curve/overall/r2 against N")
    return parser


def objective_module(name: str):
    """The objective an objective config (configs/objective/<name>.yaml) builds, and its run variant."""
    path = OBJECTIVE_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no objective config {path}; choose from {', '.join(objective_configs())}")
    import importlib

    spec = yaml.safe_load(path.read_text())["model"]["objective"]
    module, cls = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**(spec.get("init_args") or {}))


def anchor_result(args, dataset: ProbeDataset) -> evaluate.ProbeResult:
    if args.anchor == "untrained":
        from wm.probe.offline import OfflineWorldModel

        torch.manual_seed(args.seed)
        info = dataset.info
        model = OfflineWorldModel(dataset.observation_shapes, info["action_dim"], info["discrete"],
                                  objective_module(args.objective), args.size)
        return evaluate.probe_world_model(model.world_model.eval(), dataset, args.observe, args.horizon, args.seed)
    if args.anchor == "actions":
        return evaluate.action_anchor(dataset)
    if args.anchor == "true":
        train, held = (evaluate.true_state_features(dataset, split) for split in ("train", "heldout"))
    else:
        from wm.model.sizes import model_size

        width = model_size(args.size).feat_dim
        train, held = (evaluate.noise_features(dataset, split, width, args.seed) for split in ("train", "heldout"))
    return evaluate.fit_probes(train, held, dataset, names=("both",))


def log_result(uri: str, run_id: str, result: evaluate.ProbeResult, files: list[Path], dataset: ProbeDataset,
               updates: int | None = None) -> None:
    """The probe's numbers into an MLflow run (the rollout curves with the horizon as the step);
    `updates`: those of the checkpoint probed."""
    client, now = MlflowClient(uri), int(time.time() * 1000)
    points = [Metric(key, value, now, 0) for key, value in evaluate.metrics(result).items()]
    for group, curve in result.rollout_r2.items():
        points += [Metric(f"probe/rollout/{group}/r2", value, now, k) for k, value in enumerate(curve)]
    points += [Metric("probe/rollout/reward_mse", value, now, k) for k, value in enumerate(result.reward_mse)]
    for start in range(0, len(points), 500):
        client.log_batch(run_id, metrics=points[start : start + 500])
    client.set_tag(run_id, PROBED_TAG, str(dataset.folder.resolve()))
    if updates is not None:
        client.set_tag(run_id, PROBED_UPDATES_TAG, str(updates))
    client.set_tag(run_id, evaluate.NOT_COUNTED_TAG, json.dumps(result.not_counted))
    if result.action_lags is not None:
        client.log_param(run_id, "anchor.action_lags", result.action_lags)
    for path in files:
        client.log_artifact(run_id, str(path), "probe")


def distinct_cores(objectives: list[str]) -> list[str]:
    """The first of the objectives of each distinct core (encoder and posterior norms): an
    untrained model is probed before any objective's network has acted, so objectives that build
    the same core have the same untrained anchor (and the same weights, seed for seed)."""
    first: dict[tuple[str, str], str] = {}
    for name in objectives:
        objective = objective_module(name)
        first.setdefault((objective.encoder_norm, objective.posterior_norm), name)
    return list(first.values())


def anchor_variant(args) -> str:
    """`anchor_<kind>`, `anchor_untrained_<objective>`: the anchor's cell in a report."""
    return f"anchor_{args.anchor}" + (f"_{args.objective}" if args.anchor == "untrained" else "")


def anchor_name(args, dataset: ProbeDataset) -> str:
    return run_name(dataset.name, anchor_variant(args), args.seed)


def anchor_run(args, dataset: ProbeDataset) -> tuple[str, str]:
    """(tracking URI, run id) of the anchor's MLflow run: the one of its name, evaluated again
    (its numbers replaced), or a new one; one name, one run, so a report counts it once."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(args.root / "mlflow.db")
    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        create_store(db)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(uri, args.experiment)
    name = anchor_name(args, dataset)
    existing = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}'", max_results=1)
    if existing:
        return uri, existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={ANCHOR_TAG: args.anchor})
    params = {"anchor": args.anchor, "data.dataset": str(dataset.folder.resolve()), "seed_everything": args.seed,
              "run.variant": anchor_variant(args), "model.size": args.size}
    if args.anchor == "untrained":
        params["objective"] = args.objective
    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return uri, run.info.run_id


def eval_main(argv: list[str]) -> None:
    args = eval_parser().parse_args(argv)
    started = time.perf_counter()
    if args.ckpt is not None:  # the checkpoint first: a damaged one is refused before the dataset is read
        world_model, checkpoint = evaluate.load_world_model(args.ckpt)
    dataset = ProbeDataset(args.data)
    if args.ckpt is not None:
        result = evaluate.probe_world_model(world_model, dataset, args.observe, args.horizon, args.seed,
                                            evaluate.blind_keys_of(checkpoint))
        record = checkpoint.get(RECORD_KEY) or {}
        name = args.ckpt.resolve().parent.parent.name
        out = args.out or args.ckpt.resolve().parent.parent / "probe"
    else:
        result = anchor_result(args, dataset)
        name = anchor_name(args, dataset)
        out = args.out or args.root / "anchors"
    stem = f"{name}_on_{dataset.name}"
    files = [out / f"{stem}.csv", out / f"{stem}.png"]
    evaluate.write_csv(files[0], result)
    plot_probe(result, files[1], f"{name} on {dataset.name}")
    print(f"{name} on {dataset.name} ({time.perf_counter() - started:.0f} s): overall R² {result.overall():.3f}; "
          + ", ".join(f"{g} {result.r2['both', g]:.3f}" for g in dataset.groups))
    gain = None
    if args.ckpt is not None:  # what the model adds to what the actions alone tell (the dataset's card, or measured here)
        card = dataset.info.get("action_anchor") or {"overall_r2": evaluate.action_anchor(dataset).overall()}
        gain = result.overall() - card["overall_r2"]
        print(f"  gain over the actions anchor ({card['overall_r2']:.3f}): {gain:+.3f}")
    if result.not_counted:
        print("  not in overall: " + ", ".join(f"{g} (a linear map of {o})" for g, o in result.not_counted.items()))
    if result.action_lags is not None:
        print(f"  the last {result.action_lags} actions and the time step (K chosen by cross-validation on the train split)")
    if "embed" in {f for f, _ in result.r2}:
        print("  overall R² by features: " + ", ".join(f"{f} {result.overall(f):.3f}" for f in evaluate.FEATURES))
    if result.rollout_r2:
        curve = evaluate.overall_curve(result.rollout_r2)
        print("  imagined, R² at horizon " + ", ".join(f"{k}: {curve[k]:.3f}" for k in range(0, len(curve), 5)))
    print(f"  {files[0]}\n  {files[1]}")
    curve = probe_curve(args, dataset) if args.ckpt is not None and args.curve is not None else {}
    if args.no_log:
        return
    if args.ckpt is not None:
        if not record.get("run_id"):
            print("  not logged: the checkpoint records no MLflow run (written by an older wm)")
            return
        uri, run_id = record["config"]["run"]["tracking_uri"], record["run_id"]
    else:
        uri, run_id = anchor_run(args, dataset)
    log_result(uri, run_id, result, files, dataset, checkpoint.get("global_step") if args.ckpt is not None else None)
    if gain is not None:
        MlflowClient(uri).log_metric(run_id, GAIN_KEY, gain)
    if curve:
        now = int(time.time() * 1000)
        MlflowClient(uri).log_batch(run_id, metrics=[Metric(f"probe/curve/{key}", r2, now, updates)
                                                     for updates, point in curve.items() for key, r2 in point.items()])
    if args.ckpt is None:  # an anchor's run is this command's own (a checkpoint's is its training's): done, it ends here
        MlflowClient(uri).set_terminated(run_id, "FINISHED")
    print(f"  logged to MLflow run {run_id} in {uri}")


def probe_curve(args, dataset: ProbeDataset) -> dict[int, dict[str, float]]:
    """R² of the run's `updates=N.ckpt` checkpoints: learning speed and plateau. N -> metric -> R²
    (`overall/r2` and `overall/r2_<feature>` per feature set, `<group>/r2` from (h, z)); printed as it goes."""
    def updates(path: Path) -> int:
        return int(path.stem.partition("=")[2])

    found = {updates(p): p for p in args.ckpt.resolve().parent.glob("updates=*.ckpt") if p.stem.partition("=")[2].isdigit()}
    wanted = sorted(found if not args.curve else set(args.curve) & set(found))
    missing = sorted(set(args.curve or ()) - set(found))
    if not found:
        print(f"  curve: {args.ckpt.parent} holds no updates=N.ckpt checkpoint (`wm.probe train` writes them)")
    elif missing:
        print(f"  curve: no checkpoint at {', '.join(map(str, missing))} updates (the run has {sorted(found)})")
    curve = {}
    for n in wanted:
        world_model, checkpoint = evaluate.load_world_model(found[n])
        result = evaluate.probe_world_model(world_model, dataset, args.observe, 0, args.seed, evaluate.blind_keys_of(checkpoint))
        curve[n] = {f"overall/r2{'' if feature == 'both' else f'_{feature}'}": result.overall(feature)
                    for feature in evaluate.FEATURES}
        curve[n] |= {f"{group}/r2": r2 for (feature, group), r2 in result.r2.items() if feature == "both" and math.isfinite(r2)}
        print(f"  curve: {n:,} updates: overall R² " + ", ".join(f"{f} {result.overall(f):.3f}" for f in evaluate.FEATURES)
              + "; (h, z) " + ", ".join(f"{g} {result.r2['both', g]:.3f}" for g in dataset.groups), flush=True)
    return curve

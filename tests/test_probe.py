"""Representation probes (wm.probe): the true state the collector records, the ridge probe against
maps known in advance, offline world-model training on a dataset, probing an offline and a fit's
checkpoint into their MLflow runs, the anchors, and the report of a study."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.test_training import TINY
from wm.run.cli import main as fit_main
from wm.envs import make_env
from wm.envs.toy import Catch
from wm.probe import evaluate
from wm.probe.commands import eval_main
from wm.probe.dataset import Collection, ProbeDataset, collect
from wm.probe.offline import main as train_main
from wm.probe.ridge import fit_ridge, r2_score

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config", str(REPO / "configs/probe/train.yaml"), "--trainer.max_steps", "40", "--trainer.val_check_interval",
         "20", "--data.sequence_length", "8", "--data.batch_size", "8", "--data.validation_batches", "4",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.checkpoint_every", "20"]


@pytest.fixture(scope="module")
def catch(tmp_path_factory) -> ProbeDataset:
    """Random-policy toy Catch, 3000 frames: about 400 train and 100 held-out episodes."""
    return collect(Collection("toy-catch", 3000, action_repeat=1), tmp_path_factory.mktemp("data") / "catch")


@pytest.fixture(scope="module")
def offline(catch, tmp_path_factory) -> Path:
    """A Barlow world model trained offline for 40 updates on the Catch dataset: its run root."""
    root = tmp_path_factory.mktemp("runs")
    train_main([*TRAIN, "--data.dataset", str(catch.folder), "--run.root", str(root)])
    return root


def test_the_collected_state_is_the_simulators(catch):
    """Catch's ball and paddle, read back from the stored frames by their colours, are the recorded
    true state, for every step; episodes are split whole, every fifth held out."""
    steps = catch.steps("train")
    image, ball, paddle = steps["image"].numpy(), steps["state.ball"].numpy(), steps["state.paddle"].numpy()
    cell = 64 // Catch.GRID
    for t in range(0, 60):
        rows, cols = np.nonzero((image[t] == Catch.BALL_COLOUR).all(-1))
        assert (cols.mean() // cell, rows.mean() // cell) == tuple(ball[t]), t
        paddle_cols = np.nonzero((image[t][-1] == Catch.PADDLE_COLOUR).all(-1))[0] // cell  # the bottom row
        assert paddle_cols.mean() == paddle[t][0], t
    info = catch.info
    assert info["splits"]["heldout"]["episodes"] * 5 == pytest.approx(info["splits"]["train"]["episodes"] + info["splits"]["heldout"]["episodes"], abs=5)
    first = steps["is_first"]
    assert first[0] and (steps["action"][first] == 0).all() and (steps["reward"][first] == 0).all()
    assert catch.groups == {"ball": 2, "paddle": 1} and catch.info["discrete"] and catch.info["action_dim"] == 3


@pytest.mark.slow  # a DMC collection
def test_the_collected_state_of_a_dmc_task_replays_in_the_simulator(tmp_path):
    """cartpole: the recorded qpos and qvel of an episode are what the simulator holds when the
    recorded actions are played again from the same seed."""
    dataset = collect(Collection("dmc-cartpole_swingup", 2000, action_repeat=2, time_limit=30, heldout_every=2), tmp_path / "cp")
    steps = dataset.steps("train")
    env = make_env("dmc-cartpole_swingup", 2, 30)
    try:
        env.reset(seed=0)  # episode 0, reset with the collection's seed + 0
        physics = env.unwrapped._env.physics
        for t in range(0, 12):
            if t:
                env.step(steps["action"][t].numpy())
            np.testing.assert_allclose(physics.data.qpos, steps["state.qpos"][t].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(physics.data.qvel, steps["state.qvel"][t].numpy(), rtol=1e-5, atol=1e-6)
        assert set(dataset.groups) >= {"qpos", "qvel", "position", "velocity", "contact"}
    finally:
        env.close()


def test_ridge_recovers_a_known_linear_map_and_nothing_from_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 20, generator=generator)
    true_map = torch.randn(20, 4, generator=generator)
    y = x @ true_map + 0.01 * torch.randn(3000, 4, generator=generator)
    first = torch.zeros(3000, dtype=torch.bool)
    first[::50] = True  # 60 episodes of 50 steps
    train, held = slice(0, 2500), slice(2500, None)
    probe = fit_ridge(x[train], y[train], first[train])
    assert probe.score(x[held], y[held]) > 0.999
    prediction = probe.predict_standardised(x[held]) * probe.y_scale + probe.y_mean
    torch.testing.assert_close(prediction.float(), (x[held] @ true_map), atol=0.05, rtol=0)
    assert probe.penalty <= 1e-2, "an exact map needs almost no penalty"
    noise = torch.randn(3000, 20, generator=generator)
    useless = fit_ridge(noise[train], y[train], first[train])
    assert abs(useless.score(noise[held], y[held])) < 0.02
    # R² against numpy's, computed here: 1 - SSE / SST pooled over the columns
    t, p = y[held].double(), probe.predict_standardised(x[held]) * probe.y_scale + probe.y_mean
    expected = 1 - ((t - p) ** 2).sum().item() / ((t - t.mean(0)) ** 2).sum().item()
    assert float(r2_score(t, p)) == pytest.approx(expected)
    # A target that does not vary has no R²: exactly constant, or constant up to rounding (a contact
    # group that is 0 at every step of a late horizon gave -8e31 before this was caught).
    constant = torch.zeros(100, 2, dtype=torch.float64)
    assert torch.isnan(r2_score(constant, torch.randn(100, 2, dtype=torch.float64)))
    assert torch.isnan(r2_score(constant + 1e-17 * torch.randn(100, 2, dtype=torch.float64), constant))
    small = 1e-3 * torch.randn(100, 2, dtype=torch.float64)  # small, but varying: scored
    assert float(r2_score(small, small)) == 1.0


def test_offline_training_lowers_the_held_out_loss_and_is_a_run(offline):
    client = MlflowClient(f"sqlite:///{offline / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    assert run.info.run_name == "catch-barlow-s0" and run.info.status == "FINISHED"
    held_out = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "heldout/loss"), key=lambda m: m.step)]
    assert len(held_out) >= 2 and held_out[-1] < held_out[0], held_out
    assert run.data.params["model.objective.class_path"] == "wm.objectives.Barlow"
    assert {p.name for p in (offline / "catch-barlow-s0/checkpoints").glob("*.ckpt")} >= {"last.ckpt"}
    # a resume with another learning rate is refused, as a fit's
    from wm.run.command import CheckpointError

    with pytest.raises(CheckpointError, match=r"model.optimizer.lr: 0.0003 \(checkpoint\) -> 0.001 \(now\)"):
        train_main([*TRAIN, "--data.dataset", str(Path(run.data.params["data.dataset"])), "--run.root", str(offline),
                    "--ckpt_path", "last", "--model.optimizer.lr", "1e-3"])


def test_a_finished_offline_training_extended_trains_on_from_its_last_checkpoint(catch, tmp_path, capsys):
    """More updates for a finished run: the same run folder and MLflow run, its checkpoints kept, the
    bar counted in updates, and the training minutes of both sessions, not the time between them."""
    from wm.probe.report import training_minutes

    args = [*TRAIN, "--data.dataset", str(catch.folder), "--run.root", str(tmp_path), "--trainer.max_steps", "20"]
    train_main(args)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (first,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    time.sleep(2)  # the stop between the sessions, which the minutes must not count
    capsys.readouterr()
    train_main([*args, "--trainer.max_steps", "40", "--ckpt_path", "last", "--trainer.enable_progress_bar", "true"])
    out = capsys.readouterr().out
    assert "World model trained: catch-barlow-s0" in out and "updates: 40 of 40" in out
    assert re.search(r"Training: 100%.*\| 40/40 updates", out), "the bar counts updates from the resumed run's"
    checkpoints = tmp_path / "catch-barlow-s0" / "checkpoints"
    assert {p.name for p in checkpoints.glob("updates=*.ckpt")} == {"updates=20.ckpt", "updates=40.ckpt"}
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 40
    (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "heldout/loss")) == [19, 39]
    minutes = client.get_metric_history(run.info.run_id, "train/minutes")
    assert sorted(m.step for m in minutes) == [20, 40] and minutes[0].value < minutes[1].value
    wall = (run.info.end_time - first.info.start_time) / 60000
    assert training_minutes(run) == max(m.value for m in minutes) < wall - 1.5 / 60, "the stop is not counted"
    # the run's other settings stay refused, with every key a probe resume may change named
    from wm.run.command import CheckpointError

    with pytest.raises(CheckpointError, match="trainer.max_steps"):
        train_main([*args, "--trainer.max_steps", "60", "--ckpt_path", "last", "--data.batch_size", "4"])


@pytest.mark.slow  # probes and rollouts
def test_probe_eval_logs_into_the_checkpoints_run_and_the_rollout_degrades_with_the_horizon(offline, catch, capsys):
    checkpoint = offline / "catch-barlow-s0/checkpoints/last.ckpt"
    eval_main(["--ckpt", str(checkpoint), "--data", str(catch.folder), "--observe", "1", "--horizon", "5", "--curve"])
    client = MlflowClient(f"sqlite:///{offline / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id], filter_string="attributes.run_name = 'catch-barlow-s0'")
    metrics = run.data.metrics
    assert {"probe/ball/r2", "probe/paddle/r2", "probe/overall/r2", "probe/ball/r2_deter", "probe/overall/r2_stoch",
            "probe/overall/r2_embed"} <= set(metrics)
    assert metrics["probe/paddle/r2"] > 0.5 and run.info.status == "FINISHED"
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "probe/curve/overall/r2")}
    assert sorted(curve) == [20, 40] and curve[40] == pytest.approx(metrics["probe/overall/r2"], abs=0.02)
    for group in ("ball", "paddle"):  # each group over training too, from (h, z)
        points = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"probe/curve/{group}/r2")}
        assert sorted(points) == [20, 40] and points[40] == pytest.approx(metrics[f"probe/{group}/r2"], abs=0.02)
    ball = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "probe/rollout/ball/r2"), key=lambda m: m.step)]
    reward = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "probe/rollout/reward_mse"), key=lambda m: m.step)]
    assert len(ball) == 6 and ball[-1] < ball[0], ball  # imagined states lose what observed ones hold
    assert reward[-1] > reward[0], reward
    folder = offline / "catch-barlow-s0/probe"
    rows = list(csv.DictReader((folder / "catch-barlow-s0_on_catch.csv").open()))
    assert {row["kind"] for row in rows} == {"probe", "overall", "rollout", "reward_mse"}
    assert (folder / "catch-barlow-s0_on_catch.png").is_file()
    printed = capsys.readouterr().out
    assert "overall R²" in printed and "gain over the actions anchor" in printed
    (run,) = client.search_runs([run.info.experiment_id], filter_string="attributes.run_name = 'catch-barlow-s0'")
    assert run.data.metrics["probe_gain/over_actions"] == pytest.approx(
        run.data.metrics["probe/overall/r2"] - catch.info["action_anchor"]["overall_r2"], abs=1e-6)


def test_the_action_anchor_reads_a_state_that_is_a_linear_map_of_the_last_actions(tmp_path, capsys):
    """A dataset built here: the state is a fixed linear map of the last three actions, the image
    noise. The actions anchor reaches R² of about 1, noise features about 0."""
    from wm.probe.dataset import write_dataset

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3 * 2, 4))

    def episode(steps: int) -> dict[str, np.ndarray]:
        action = rng.uniform(-1, 1, (steps, 2)).astype(np.float32)
        action[0] = 0.0  # no action leads to the first observation
        lagged = np.concatenate([np.concatenate([np.zeros((lag, 2)), action[: steps - lag]]) for lag in range(3)], 1)
        flags = np.zeros(steps, bool)
        return {"image": rng.integers(0, 255, (steps, 8, 8, 3), dtype=np.uint8), "action": action,
                "reward": np.zeros(steps, np.float32), "is_first": np.eye(1, steps, dtype=bool)[0], "is_last": flags,
                "is_terminal": flags, "state.linear": (lagged @ weights).astype(np.float32)}

    dataset = write_dataset(tmp_path / "linear", {"train": [episode(60) for _ in range(20)], "heldout": [episode(60) for _ in range(5)]},
                            {"task": "built-in-the-test", "policy": "random", "epsilon": 0.0, "discrete": False})
    assert dataset.info["action_anchor"]["r2"]["linear"] > 0.99 and dataset.info["action_anchor"]["lags"] >= 4
    noise = evaluate.fit_probes(*(evaluate.noise_features(dataset, split, 64, 0) for split in ("train", "heldout")),
                                dataset, names=("both",))
    assert abs(noise.overall()) < 0.05


def test_the_datasets_card_says_what_the_actions_alone_tell(catch):
    card = catch.info["action_anchor"]
    assert card["lags"] in evaluate.ACTION_LAGS and card["r2"]["paddle"] > 0.9
    assert card["overall_r2"] == pytest.approx(np.mean(list(card["r2"].values())), abs=1e-3)
    assert catch.info["policy"] == "random" and catch.info["epsilon"] == 0.0


@pytest.mark.slow  # two short trainings, one of them compiled (about a minute on 2 cores)
def test_a_compiled_offline_training_computes_what_the_eager_one_does(catch, tmp_path):
    """`--model.compile true` compiles the world model's regions (as a fit's update) and trains the
    same: with eager's random draws (`fallback_random`) the logged losses of the first updates match."""
    from wm.run.tracking import sqlite_uri

    losses = {}
    for compiled in (False, True):
        root = tmp_path / str(compiled)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._inductor.config.patch(fallback_random=True):
            train_main([*TRAIN, "--data.dataset", str(catch.folder), "--run.root", str(root), "--trainer.max_steps", "4",
                        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", "--model.compile", str(compiled).lower()])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, graphs  # the filtering step, the encoder and the objective: compiled or not
        client = MlflowClient(sqlite_uri(root / "mlflow.db"))
        (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["model.compile"] == str(compiled)
        losses[compiled] = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                                    key=lambda m: m.step)]
    assert len(losses[False]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)


def test_a_collection_mixes_a_checkpoints_policy_with_random_actions_as_its_card_says(tmp_path):
    """`collect --policy CKPT --epsilon e`: the policy acts, a share e of steps act at random. The
    policy here is built to choose one action (its output layer's bias), so the share of that
    action measures the mix: about 1 - 2e/3 on Catch's 3 actions (up to the actor's 1% unimix)."""
    from wm.agent.agent import Agent
    from wm.objectives import make_objective

    env = make_env("toy-catch", 1)
    shapes = {k: space.shape for k, space in env.observation_space.spaces.items()}
    env.close()
    agent = Agent(shapes, 3, discrete=True, objective=make_objective("barlow"), size="size1M")
    with torch.no_grad():
        agent.actor_critic.actor.out.weight.zero_()
        agent.actor_critic.actor.out.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))  # action 1, nearly always
    checkpoint = tmp_path / "policy.ckpt"
    torch.save({"hyper_parameters": dict(agent.hparams), "state_dict": agent.state_dict()}, checkpoint)
    shares = {}
    for epsilon in (0.0, 0.6):
        data = collect(Collection("toy-catch", 1500, action_repeat=1, policy=str(checkpoint), epsilon=epsilon),
                       tmp_path / f"eps{epsilon}")
        assert data.info["policy"] == str(checkpoint) and data.info["epsilon"] == epsilon
        actions = np.concatenate([data.steps(split)["action"][~data.steps(split)["is_first"]].numpy()
                                  for split in ("train", "heldout")])
        shares[epsilon] = float((actions.argmax(-1) == 1).mean())
    assert shares[0.0] > 0.98, shares
    assert abs(shares[0.6] - (1 - 0.6 * 2 / 3)) < 0.06, shares  # 0.6, within the binomial spread of ~1,500 steps


def test_a_blind_model_trains_and_is_probed_on_one_constant_image(catch, tmp_path):
    """What goes into the encoder of a blind model, in its update and in its probe: grey only."""
    from wm.probe.offline import BLIND_VALUE, OfflineWorldModel, blinded

    info = catch.info
    model = OfflineWorldModel(catch.observation_shapes, info["action_dim"], info["discrete"], blind=True)
    seen = []
    model.world_model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]["image"]))
    window = {k: v[:8][None] for k, v in catch.steps("train").items() if not k.startswith("state.")}
    assert window["image"].float().std() > 0
    model.world_model.loss(blinded(window, model.blind_keys))
    evaluate.probe_world_model(model.world_model.eval(), catch, observe_steps=1, horizon=1,
                               blind_keys=evaluate.blind_keys_of({"hyper_parameters": dict(model.hparams)}))
    assert seen and all(bool((images == BLIND_VALUE).all()) for images in seen)
    assert model.hparams["blind"] is True


def test_held_out_distracting_episodes_replay_on_backgrounds_the_training_never_shows(tmp_path):
    from wm.probe.dataset import play_episodes

    collection = Collection("dmc_distracting-cartpole_swingup", 40, action_repeat=2, time_limit=10, heldout_every=2)
    dataset = collect(collection, tmp_path / "distracting")
    assert dataset.info["heldout_backgrounds"].startswith("eval clips")
    held = dataset.steps("heldout")
    (on_train,), _ = play_episodes(collection, 0, 0, [1], split="train")  # the second episode is held out
    (on_eval,), _ = play_episodes(collection, 0, 0, [1], split="eval")
    assert torch.equal(held["image"][:11], torch.as_tensor(on_eval["image"]))
    np.testing.assert_array_equal(held["state.qpos"][:11].numpy(), on_train["state.qpos"])  # same seed, same actions
    assert not np.array_equal(on_train["image"], on_eval["image"])


@pytest.mark.parametrize("task", ["dmc-cartpole_swingup", "dmc-cheetah_run", "dmc_subtle-ball_in_cup_catch",
                                  "dmc_subtle-reacher_hard", "dmc_distracting-cartpole_swingup",
                                  "dmc_distracting-reacher_easy"])
def test_the_studies_dmc_tasks_start_each_episode_from_another_state(task):
    """A random initial state: the actions alone cannot give the state away from the first step; nor
    the small object's place (reacher's target is drawn anew each episode and never moves)."""
    env = make_env(task, time_limit=5)
    starts = []
    for seed in range(3):
        env.reset(seed=seed)
        starts.append(env.unwrapped.true_state())
    env.close()
    for group in {"qpos", "object"} & set(starts[0]):
        assert all(not np.allclose(starts[0][group], other[group]) for other in starts[1:]), group


def test_the_action_history_holds_each_episodes_last_actions_and_its_time_step():
    """Computed step by step here: the newest action first, zeros before the episode's start."""
    from wm.probe.evaluate import action_history

    action = torch.arange(1.0, 15.0).reshape(7, 2)
    is_first = torch.tensor([True, False, False, False, True, False, False])
    features = action_history({"action": action, "is_first": is_first}, lags=3)
    start = [0, 0, 0, 0, 4, 4, 4]
    for t in range(7):
        expected = [action[t - lag] if t - lag >= start[t] else torch.zeros(2) for lag in range(3)]
        assert torch.equal(features[t], torch.cat([*expected, torch.tensor([t - start[t]], dtype=torch.float32)]).double())


def test_a_group_that_repeats_another_is_not_counted_twice():
    """cheetah's case: position is qpos without x, velocity is qvel; contacts are their own."""
    from wm.probe.evaluate import ProbeResult, duplicate_groups

    generator = torch.Generator().manual_seed(0)
    qpos, qvel, contacts = (torch.randn(500, 9, generator=generator), torch.randn(500, 9, generator=generator),
                            (torch.randn(500, 4, generator=generator) > 0).float())
    states = {"position": qpos[:, 1:] * 2.0, "qpos": qpos, "qvel": qvel, "velocity": qvel @ torch.randn(9, 9, generator=generator) + 1.0,
              "contacts": contacts, "first_joint": qpos[:, :1] + 0.1 * torch.randn(500, 1, generator=generator)}
    assert duplicate_groups(states) == {"position": "qpos", "velocity": "qvel"}, "near-copies (first_joint) still count"
    r2 = {("both", g): value for g, value in zip(states, (0.9, 0.5, 0.3, 0.3, 0.1, 0.6))}
    result = ProbeResult(r2, {}, duplicate_groups(states))
    assert result.overall() == pytest.approx((0.5 + 0.3 + 0.1 + 0.6) / 4)


def test_anchors_span_the_scale_from_noise_to_the_true_state(catch, tmp_path):
    """The actions anchor on random-policy Catch: the paddle is the integral of the actions (its
    start is fixed), the ball's row is the time step, its column is random: half of the ball."""
    root = tmp_path / "anchors"
    for anchor in ("true", "noise", "untrained", "actions"):
        eval_main(["--anchor", anchor, "--data", str(catch.folder), "--root", str(root), "--experiment", "anchors",
                   "--observe", "1", "--horizon", "3"])
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("anchors").experiment_id])
    assert {(r.info.status, r.info.end_time is not None) for r in found} == {("FINISHED", True)}, "an anchor's run ends"
    runs = {r.data.params["anchor"]: r.data.metrics for r in found}
    runs_before = {r.data.params["anchor"]: r for r in found}
    assert runs["true"]["probe/overall/r2"] > 0.999
    assert abs(runs["noise"]["probe/overall/r2"]) < 0.05
    assert 0.05 < runs["untrained"]["probe/overall/r2"] < runs["true"]["probe/overall/r2"]
    assert runs["actions"]["probe/paddle/r2"] > 0.9 and 0.3 < runs["actions"]["probe/ball/r2"] < 0.7
    eval_main(["--anchor", "actions", "--data", str(catch.folder), "--root", str(root), "--experiment", "anchors"])
    # evaluated again: the same run, so a report counts the anchor once
    (actions,) = client.search_runs([client.get_experiment_by_name("anchors").experiment_id], "params.anchor = 'actions'")
    assert int(actions.data.params["anchor.action_lags"]) in evaluate.ACTION_LAGS
    assert actions.info.run_name == "catch-anchor_actions-s0"
    assert actions.info.status == "FINISHED" and actions.info.end_time > runs_before["actions"].info.end_time


@pytest.mark.slow  # a fit, then probes
def test_a_fits_checkpoint_is_probed_in_its_own_run(catch, tmp_path):
    fit_main(["fit", *TINY, "--run.root", str(tmp_path), "--env.total_steps", "24"])
    checkpoint = tmp_path / "tiny/checkpoints/last.ckpt"
    world_model, _ = evaluate.load_world_model(checkpoint)
    result = evaluate.probe_world_model(world_model, catch, observe_steps=1, horizon=2)
    assert set(result.r2) == {(f, g) for f in evaluate.FEATURES for g in ("ball", "paddle")}
    eval_main(["--ckpt", str(checkpoint), "--data", str(catch.folder), "--observe", "1", "--horizon", "2"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.data.metrics["probe/overall/r2"] == pytest.approx(result.overall(), abs=1e-3)


def test_a_run_probed_again_is_reported_from_its_latest_evaluation(tmp_path):
    """`wm.probe eval` on a run it already probed logs every horizon again; the report reads the last."""
    from mlflow.entities import Metric

    from wm.run.tracking import create_store, sqlite_uri
    from wm.probe.report import latest_curve

    create_store(tmp_path / "mlflow.db")
    client = MlflowClient(sqlite_uri(tmp_path / "mlflow.db"))
    run_id = client.create_run(client.create_experiment("probed")).info.run_id
    first = [Metric("probe/rollout/contact/r2", value, 1000, k) for k, value in enumerate([0.5, 0.4, -8e31])]
    second = [Metric("probe/rollout/contact/r2", value, 2000, k) for k, value in enumerate([0.5, 0.4, float("nan")])]
    client.log_batch(run_id, metrics=first)
    client.log_batch(run_id, metrics=second)
    curve = latest_curve(client, run_id, "probe/rollout/contact/r2")
    assert len(curve) == 3 and curve[:2].tolist() == [0.5, 0.4] and np.isnan(curve[2])


def test_the_open_loop_mean_keeps_the_same_groups_at_every_horizon():
    """A group without an R² late in the rollouts leaves the whole mean curve, so it does not jump."""
    from wm.probe.evaluate import overall_curve

    rollout = {"position": np.array([0.6, 0.5, 0.4]), "velocity": np.array([0.4, 0.3, 0.2]),
               "contact": np.array([0.0, 0.0, np.nan]), "never_varies": np.full(3, np.nan)}
    curve = overall_curve(rollout)
    np.testing.assert_allclose(curve, [0.5, 0.4, 0.3])


def test_each_kind_of_free_anchor_has_its_own_line_in_the_curve_figures():
    """The actions and noise both lie near zero on some datasets: their lines must not look alike."""
    from wm.probe.report import ANCHOR_ORDER, anchor_line, free_anchor

    kinds = [kind for kind in ANCHOR_ORDER if free_anchor(kind)]
    lines = [anchor_line(kind) for kind in kinds]
    assert len({colour for colour, _ in lines}) == len({str(style) for _, style in lines}) == len(kinds) == 4
    assert anchor_line("anchor_blind_mudreamer") == anchor_line("anchor_blind")
    assert anchor_line("anchor_untrained_reconstruction") == anchor_line("anchor_untrained")


def test_probe_help_exits_0_and_a_missing_command_exits_2():
    import subprocess
    import sys

    helped = subprocess.run([sys.executable, "-m", "wm.probe", "--help"], capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0 and "usage: python -m wm.probe" in helped.stdout
    missing = subprocess.run([sys.executable, "-m", "wm.probe"], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "usage: python -m wm.probe" in missing.stderr


def test_a_study_trains_its_blind_anchors_with_their_own_seeds(tmp_path, capsys):
    """`blind_seeds` cuts the blind anchor's runs (one seed is the anchor's floor), not the objectives'."""
    import yaml

    from wm.probe.study import study_main

    study = {"experiment": "study", "root": str(tmp_path / "runs"), "data": str(tmp_path / "data"),
             "datasets": [{"task": "dmc_subtle-reacher_hard", "frames": 2000, "time_limit": 100}],
             "objectives": ["barlow", "reconstruction"], "seeds": [0, 1, 2], "blind": ["barlow"], "blind_seeds": [0]}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    study_main(["--config", str(config), "--dry-run"])
    names = [line.split("--run.name ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [f"dmc_subtle-reacher_hard-{objective}-s{seed}" for objective in ("barlow", "reconstruction")
                     for seed in (0, 1, 2)] + ["dmc_subtle-reacher_hard-anchor_blind_barlow-s0"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists(), "a dry run creates nothing"


STUDY_CONFIGS = sorted(p for p in (REPO / "configs/probe").glob("*.yaml") if p.name != "train.yaml")


@pytest.mark.parametrize("config", STUDY_CONFIGS, ids=[p.stem for p in STUDY_CONFIGS])
def test_every_shipped_study_config_passes_its_check(config):
    """A shipped study is whole: known keys, tasks and objectives, and a checkpoint at each curve point."""
    import yaml

    from wm.probe.study import study_problems

    assert study_problems(yaml.safe_load(config.read_text())) == []


def test_a_study_config_with_mistakes_is_refused_whole_before_anything_exists(tmp_path):
    """Each mistake named with its key and fix, in one error, before a dataset, run or store exists:
    a misspelled key would otherwise be ignored, and a curve point without a checkpoint found only
    after every run has trained."""
    import yaml

    from wm.probe.study import study_main
    from wm.run.validation import ConfigError

    study = {"experiment": "study", "root": str(tmp_path / "runs"), "data": str(tmp_path / "data"),
             "datasets": [{"task": "dmc-cartpole_swingup", "frames": 2000}, {"task": "dmc-cartpol_swingup", "frame": 2000}],
             "objectives": ["barlow", "barlw"], "seeds": [0, 1], "blind_seed": [0], "curve": [250, 300, 5000],
             "train": ["--config", str(REPO / "configs/probe/train.yaml"), "--trainer.max_steps=4000"]}  # the shipped use "--key value"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError) as refused:
        study_main(["--config", str(config)])
    lines = str(refused.value).splitlines()
    assert lines[0] == f"6 problems in the study config {config}:" and lines[-1] == "Nothing was created."
    expected = ["blind_seed: not a key of a study. Did you mean blind_seeds?",
                "datasets[1].frame: not a key of a study dataset. Did you mean frames?",
                "datasets[1].frames: missing",
                "datasets[1].task='dmc-cartpol_swingup' is not a task. Did you mean dmc-cartpole_swingup?",
                "objectives: 'barlw' is not an objective. Did you mean barlow?",
                # configs/probe/train.yaml keeps a checkpoint every 500 updates; 4,000 updates from the override
                "curve: no checkpoint at 250, 300, 5000 updates: a run trains 4000 updates (trainer.max_steps) and keeps "
                "one every 500 (run.checkpoint_every)."]
    assert sorted(lines[1:-1]) == sorted(next(line for line in lines[1:-1] if line.startswith(f"- {start}")) for start in expected)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow  # a study's training runs are subprocesses
def test_a_study_run_again_trains_and_probes_only_what_is_new(catch, tmp_path, capsys):
    """More seeds later: the finished run is neither trained nor probed again, so its minutes and
    its probe stay those of its own training."""
    import yaml

    from wm.run.tracking import sqlite_uri
    from wm.probe.study import runs_of, study_main

    study = {"experiment": "study", "root": str(tmp_path / "runs"), "data": str(catch.folder.parent),
             "datasets": [{"task": "toy-catch", "name": catch.folder.name, "frames": 3000}],
             "objectives": ["barlow"], "seeds": [0], "parallel": 1, "train": TRAIN,
             "eval": ["--observe", "2", "--horizon", "3"], "blind": ["barlow"], "curve": [20, 40]}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    study_main(["--config", str(config), "--probe-only"])  # a study seen before its runs finish: anchors only
    printed = capsys.readouterr().out
    assert "not finished, so not probed: catch-barlow-s0, catch-anchor_blind_barlow-s0" in printed
    assert not (tmp_path / "runs" / "catch-barlow-s0").exists(), "--probe-only trains nothing"
    assert "overall R²" in (tmp_path / "runs" / "logs" / "catch-anchor_noise-s0.probe.log").read_text()
    study_main(["--config", str(config)])
    client = MlflowClient(sqlite_uri(tmp_path / "runs" / "mlflow.db"))
    (first,) = [r for r in runs_of(client, "study") if r.info.run_name == "catch-barlow-s0"]
    config.write_text(yaml.safe_dump({**study, "seeds": [0, 1], "parallel": 2}))  # two trainings, then two probes, at once
    study_main(["--config", str(config)])
    printed = capsys.readouterr().out
    assert "study study: 4 runs (2 already finished or not trained), 2 probed" in printed
    assert re.search(r"^(\d+) of \1 probes finished$", printed, re.M), "the probes, counted as probes"
    logs = tmp_path / "runs" / "logs"
    assert "overall R²" in (logs / "catch-barlow-s1.probe.log").read_text()
    assert "overall R²" in (logs / "catch-anchor_noise-s1.probe.log").read_text()
    assert f"--out {tmp_path / 'runs' / 'report'}" in printed, "the report goes under the study's root, not the checkout"
    runs = {r.info.run_name: r for r in runs_of(client, "study")}
    assert runs["catch-barlow-s0"].info.end_time == first.info.end_time
    assert runs["catch-barlow-s1"].info.status == "FINISHED"
    # The blind model is an anchor run trained on constant images; every run's checkpoints are probed over training.
    blind = runs["catch-anchor_blind_barlow-s1"]
    assert blind.data.params["model.blind"] == "True" and blind.info.status == "FINISHED"
    curve = client.get_metric_history(blind.info.run_id, "probe/curve/overall/r2")
    assert sorted(m.step for m in curve) == [20, 40]
    assert abs(blind.data.metrics["probe/overall/r2_embed"]) < 0.02, "a constant image's embedding tells nothing"
    from wm.report import main as report_main

    report_main(["--experiment", "study", "--tracking-uri", sqlite_uri(tmp_path / "runs" / "mlflow.db"),
                 "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| objective | seeds |")][0]
    assert table.endswith("| overall | gain over the best free anchor |")
    best = max(runs[f"catch-anchor_{kind}-s0"].data.metrics["probe/overall/r2"] for kind in ("actions", "noise"))
    best = max(best, *(r.data.metrics["probe/overall/r2"] for name, r in runs.items()
                       if "anchor_blind" in name or "anchor_untrained" in name))
    barlow = np.mean([runs[f"catch-barlow-s{seed}"].data.metrics["probe/overall/r2"] for seed in (0, 1)])
    (row,) = [line for line in text.splitlines() if line.startswith("| barlow | 2 |")]
    assert row.split("|")[-2].strip().startswith(f"{barlow - best:.2f}"), (row, barlow, best)
    for cell in ("anchor_actions", "anchor_blind_barlow", "anchor_true", "anchor_noise"):
        assert f"| {cell} |" in text
    assert "| objective | 20 updates | 40 updates |" in text and (tmp_path / "report" / "probe_curve_catch.png").is_file()
    paddle = np.mean([max(client.get_metric_history(runs[f"catch-barlow-s{seed}"].info.run_id, "probe/curve/paddle/r2"),
                          key=lambda m: m.step).value
                      for seed in (0, 1)])  # one probe per run: its last point is 40 updates
    (row,) = [line for line in text.splitlines() if line.startswith("| paddle | barlow |")]
    assert row.split("|")[4].strip().startswith(f"{paddle:.2f}"), (row, paddle)
    # The study's updates raised: each finished run is extended from its last checkpoint, under its
    # own MLflow run, and probed again at its new end; nothing else is trained or probed.
    config.write_text(yaml.safe_dump({**study, "seeds": [0, 1], "parallel": 2, "curve": [20, 40, 60],
                                      "train": [*TRAIN, "--trainer.max_steps", "60"]}))
    study_main(["--config", str(config)])
    printed = capsys.readouterr().out
    assert "study study: 4 runs (0 already finished or not trained), 4 probed" in printed
    extended = {r.info.run_name: r for r in runs_of(client, "study")}
    for name in ("catch-barlow-s0", "catch-barlow-s1", "catch-anchor_blind_barlow-s0", "catch-anchor_blind_barlow-s1"):
        run = extended[name]
        assert run.info.run_id == runs[name].info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["wm.probe.updates"] == "60"
        assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "probe/curve/overall/r2")}) == [20, 40, 60]
    assert extended["catch-anchor_noise-s0"].info.end_time == runs["catch-anchor_noise-s0"].info.end_time
    study_main(["--config", str(config)])
    assert "study study: 4 runs (4 already finished or not trained), 0 probed" in capsys.readouterr().out
    # An anchor whose probe did not end (its process killed midway) is probed again by the next call, and ends.
    client.update_run(extended["catch-anchor_actions-s0"].info.run_id, status="RUNNING")
    study_main(["--config", str(config)])
    assert re.search(r"^1 of 1 probes finished$", capsys.readouterr().out, re.M)
    actions = {r.info.run_name: r for r in runs_of(client, "study")}["catch-anchor_actions-s0"]
    assert actions.info.status == "FINISHED" and actions.info.end_time > extended["catch-anchor_actions-s0"].info.end_time

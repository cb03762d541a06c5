"""Evaluation outside training: `python -m wm test` on a real run, the agent loaded from a
checkpoint, the parallel episode player and the videos."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from callbacks.evaluation import play_episodes
from wm.agent.agent import Agent
from wm.run.cli import CheckpointError, main
from wm.envs import make_vector_env
from wm.run.video import side_by_side, write_mp4

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(REPO / "configs/quickstart.yaml"),
    "--data.batch_size", "2", "--data.sequence_length", "8", "--data.capacity", "1000",
    "--env.prefill", "16", "--env.train_ratio", "16", "--env.eval_episodes", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.name", "tiny",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run of a short real fit on toy Catch, R2-Dreamer with a probe decoder."""
    root = tmp_path_factory.mktemp("runs")
    main(["fit", *TINY, "--run.root", str(root), "--env.total_steps", "40", "--model.objective.init_args.probe_decoder", "true"])
    return root


@pytest.mark.slow  # evaluation episodes with videos
def test_test_logs_its_episodes_into_the_run_and_leaves_it_finished(trained, tmp_path):
    run_dir = trained / "tiny"
    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    frames = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["callbacks"]
    frames = next(v for k, v in frames.items() if k.startswith("EnvLoop"))["env_steps"]
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*.ckpt")}

    with pytest.raises(CheckpointError, match="ckpt_path is not set: test plays a trained agent"):
        main(["test", *TINY, "--run.root", str(trained)])  # an untrained agent's episodes would enter the run
    main(["test", *TINY, "--run.root", str(trained), "--ckpt_path", "last",  # this run's last.ckpt
          "--model.objective.init_args.probe_decoder", "true",  # the run's own config
          "--env.eval_episodes", "5", "--env.num_envs", "3", "--env.eval_videos", "2"])

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED", "test only reads a run"
    metrics = {key: client.get_metric_history(run.info.run_id, key) for key in
               ("test/return", "test/return_std", "test/length", "test/episodes")}
    assert not client.get_metric_history(run.info.run_id, "test/success"), "Catch has no notion of success"
    assert all(len(points) == 1 and points[0].step == frames for points in metrics.values()), metrics
    assert metrics["test/episodes"][0].value == 5
    # Every episode is in a CSV artifact; the logged mean and spread are theirs.
    folder = Path(client.download_artifacts(run.info.run_id, "test", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO((folder / f"episodes_{frames:09d}.csv").read_text())))
    returns = np.array([float(r["return"]) for r in rows])
    assert len(rows) == 5 and set(returns) <= {-1.0, 1.0}  # Catch: one ball, caught or missed
    assert metrics["test/return"][0].value == pytest.approx(returns.mean())
    assert metrics["test/return_std"][0].value == pytest.approx(returns.std())
    assert metrics["test/length"][0].value == pytest.approx(np.mean([int(r["length"]) for r in rows]))
    # Two episodes side by side, each enlarged from 64 to 256 pixels, in an mp4.
    videos = Path(client.download_artifacts(run.info.run_id, "videos", str(tmp_path)))
    video = iio.imread(videos / f"test_{frames:09d}.mp4", plugin="pyav")
    assert video.shape[1:] == (256, 512, 3) and len(video) >= 2
    # What the agent predicts (truth / probe prediction / error rows) and where it looks.
    assert iio.imread(videos / f"openloop_{frames:09d}.mp4", plugin="pyav").shape[1:] == (768, 512, 3)
    saliency = iio.imread(videos / f"saliency_{frames:09d}.mp4", plugin="pyav")
    images = Path(client.download_artifacts(run.info.run_id, "images", str(tmp_path)))
    still = iio.imread(images / f"saliency_{frames:09d}.png")
    assert still.shape == saliency.shape[1:] and still.shape[1] > 2 * still.shape[0] >= 2 * 256  # two panels
    grid = iio.imread(images / f"openloop_{frames:09d}.png")  # time across, truth / prediction / error down
    assert grid.shape[1] > grid.shape[0] and grid.shape[2] in (3, 4)
    assert before == {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*.ckpt")}


def test_test_and_predict_need_only_the_checkpoint(trained, tmp_path, monkeypatch, capsys):
    """From another folder, with no config: the checkpoint says its task, model and MLflow run.
    A config that contradicts them is refused by name; how evaluation is done may change."""
    run_dir, last = trained / "tiny", trained / "tiny/checkpoints/last.ckpt"
    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)contradicts the checkpoint's task, model or run:\n  env.task: "
                                              r"'toy-catch' \(checkpoint\) -> 'toy-point_reach' \(now\)"):
        main(["test", "--ckpt_path", str(last), "--env.task", "toy-point_reach"])
    with pytest.raises(CheckpointError, match=r"model.size: 'size1M' \(checkpoint\) -> 'size12M' \(now\)"):
        main(["test", "--config", str(REPO / "configs/dmc.yaml"), "--ckpt_path", str(last)])
    assert client.get_run(run.info.run_id).data.metrics == run.data.metrics and not any(tmp_path.iterdir())

    main(["predict", "--ckpt_path", str(last), "--env.eval_episodes", "3", "--env.eval_videos", "2"])
    frames = torch.load(last, weights_only=True)["callbacks"]
    frames = next(v for k, v in frames.items() if k.startswith("EnvLoop"))["env_steps"]
    out = capsys.readouterr().out
    assert f"3 greedy episodes of {last} (toy-catch, at {frames:,} env frames): return" in out
    video = iio.imread(run_dir / "predictions" / f"last_{frames:09d}.mp4", plugin="pyav")
    assert video.shape[1:] == (256, 512, 3) and len(video) >= 2
    assert client.get_run(run.info.run_id).data.metrics == run.data.metrics, "predict logs nothing"
    with pytest.raises(SystemExit) as refused:  # no validation data in RL: not offered
        main(["validate", "--ckpt_path", str(last)])
    assert refused.value.code == 2 and "invalid choice: 'validate'" in capsys.readouterr().err


def test_an_agent_loads_from_a_checkpoint_ready_to_act(trained):
    path = trained / "tiny/checkpoints/last.ckpt"
    agent = Agent.from_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert agent.hparams["size"] == "size1M" and type(agent.world_model.objective).__name__ == "Barlow"
    for name, tensor in agent.state_dict().items():
        assert torch.equal(tensor, state["state_dict"][name]), name
    obs = {"image": torch.zeros(2, 64, 64, 3, dtype=torch.uint8), "is_first": torch.ones(2, dtype=torch.bool)}
    action, _ = agent.act(obs, mode="greedy")
    assert action.shape == (2, 3) and (action.sum(-1) == 1).all()  # Catch: one-hot over 3 moves


def test_play_episodes_counts_every_started_episode_and_records_first_to_last_frame():
    envs = make_vector_env("toy-catch", 2, 2, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        rng = np.random.default_rng(0)

        def act(obs, first, state):
            assert first.shape == (2,)
            return rng.integers(0, 3, 2), state

        episodes = list(play_episodes(envs, act, 5, seed=0, record=1))
    finally:
        envs.close()
    assert len(episodes) == 5 and all(e.ret in (-1.0, 1.0) for e in episodes)
    recorded = [e for e in episodes if e.frames is not None]
    assert len(recorded) == 1
    episode = recorded[0]
    assert len(episode.frames) == episode.length + 1  # the first observation, then one per step
    assert episode.frames[0].shape == (64, 64, 3) and not np.array_equal(episode.frames[0], episode.frames[-1])
    # One env still records `record` episodes: the first ones to start, one after another.
    envs = make_vector_env("toy-catch", 1, 2, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        episodes = list(play_episodes(envs, lambda obs, first, state: (rng.integers(0, 3, 1), state), 4, seed=1, record=3))
    finally:
        envs.close()
    assert [e.frames is not None for e in episodes] == [True, True, True, False]
    assert all(len(e.frames) == len(e.actions) == e.length + 1 for e in episodes[:3])


def test_videos_put_episodes_side_by_side_at_a_visible_size(tmp_path):
    short = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(3)]
    long = [np.full((16, 16, 3), 200, np.uint8)] * 5
    video = side_by_side([short, long], height=64)
    assert video.shape == (5, 64, 128, 3)
    assert (video[4, :, :64] == 20).all(), "an episode that ended holds its last frame"
    write_mp4(tmp_path / "v.mp4", video, fps=10)
    read = iio.imread(tmp_path / "v.mp4", plugin="pyav")
    assert read.shape == (5, 64, 128, 3) and abs(int(read[4, 32, 96, 0]) - 200) < 8


def test_test_of_a_copied_run_names_the_store_it_logs_into(trained, tmp_path, capsys):
    """A run folder copied with its store keeps, in its checkpoints, the original store: `test`
    refuses to guess which one, and logs where --run.tracking_uri says, saying so."""
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(trained, copy)
    last = copy / "tiny" / "checkpoints" / "last.ckpt"
    original = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    (run,) = original.search_runs([original.get_experiment_by_name("quickstart").experiment_id])
    before = original.get_run(run.info.run_id).data.metrics
    with pytest.raises(CheckpointError, match=rf"lies beside the store {copy / 'mlflow.db'}.*tracked in {trained / 'mlflow.db'}"):
        main(["test", "--ckpt_path", str(last), "--env.eval_episodes", "1", "--env.eval_videos", "0"])
    uri = f"sqlite:///{(copy / 'mlflow.db').resolve()}"
    main(["test", "--ckpt_path", str(last), "--env.eval_episodes", "1", "--env.eval_videos", "0", "--run.tracking_uri", uri])
    assert f"test results logged to MLflow run {run.info.run_id} (tiny) in {uri}" in capsys.readouterr().out
    assert MlflowClient(uri).get_metric_history(run.info.run_id, "test/return"), "logged into the copy's store"
    assert original.get_run(run.info.run_id).data.metrics == before, "the original store is untouched"

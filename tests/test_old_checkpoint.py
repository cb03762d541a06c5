"""A run written before wm/ was split into model/, agent/ and run/ (wm at commit d418d33, the last
commit of the flat layout) is still a run: its checkpoint loads as an agent, and `fit` resumes it
under its own MLflow run. The fixture is that run's folder and store, made by

    python -m wm fit --config configs/quickstart.yaml --data.batch_size 2 --data.sequence_length 8 \\
        --data.capacity 1000 --env.prefill 16 --env.train_ratio 16 --env.eval_episodes 1 --env.eval_videos 0 \\
        --trainer.log_every_n_steps 1 --trainer.enable_progress_bar false --trainer.enable_model_summary false \\
        --run.checkpoint_every 20 --run.name before-layout --run.root runs --env.total_steps 24

keeping last.ckpt and the replay files it names (8 MB compressed)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from wm.agent import Agent
from wm.run.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "run-before-layout.tar.xz"
ARGS = ["--config", str(REPO / "configs/quickstart.yaml"), "--data.batch_size", "2", "--data.sequence_length", "8",
        "--data.capacity", "1000", "--env.prefill", "16", "--env.train_ratio", "16", "--env.eval_episodes", "1",
        "--env.eval_videos", "0", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--run.checkpoint_every", "20", "--run.name", "before-layout"]


def unpack(folder: Path) -> Path:
    """The fixture's run root, unpacked into `folder`."""
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder / "runs"


def test_a_checkpoint_of_the_flat_layout_loads_and_its_run_resumes(tmp_path):
    root = unpack(tmp_path)
    last = root / "before-layout" / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    assert before["global_step"] == 8
    agent = Agent.from_checkpoint(last)
    obs = {"image": torch.zeros(2, 64, 64, 3, dtype=torch.uint8), "is_first": torch.ones(2, dtype=torch.bool)}
    action, _ = agent.act(obs, mode="greedy")
    assert action.shape == (2, 3)
    main(["fit", *ARGS, "--run.root", str(root), "--env.total_steps", "40", "--ckpt_path", "last"])
    after = torch.load(last, map_location="cpu", weights_only=True)
    assert after["global_step"] > before["global_step"], "the resume continued the run"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.run_id == (root / "before-layout" / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/updates")]
    assert len(steps) == len(set(steps)) and max(steps) >= 38, steps

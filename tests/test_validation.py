"""Bad config values are refused by the real CLI before anything is created: no run folder, no
MLflow store, and an existing run's files and MLflow status are left as they were."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace
from mlflow import MlflowClient

import callbacks.env_loop
import wm.envs
import wm.run.validation
from wm.run.cli import CheckpointError, main
from wm.run.validation import ConfigError, check_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs/quickstart.yaml")
TINY = [
    "--data.batch_size", "2", "--data.sequence_length", "8", "--data.capacity", "1000",
    "--env.prefill", "16", "--env.train_ratio", "16", "--env.total_steps", "24",
    "--env.eval_episodes", "0", "--env.eval_every", "0",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--run.name", "tiny",
]


def run_cli(root: Path, *extra: str, subcommand: str = "fit") -> None:
    main([subcommand, "--config", QUICKSTART, "--run.root", str(root), *extra])


# (arguments, what the message must say: the key with the value, and the fix)
BAD = {
    "batch_size": (["--data.batch_size", "0"], r"data\.batch_size=0 must be >= 1.*--data\.batch_size"),
    "capacity": (["--data.capacity", "100", "--data.sequence_length", "200"],
                 r"data\.capacity=100 is too small.*data\.sequence_length=200.*>= sequence_length x env\.num_envs = 200"
                 r".*Raise --data\.capacity or lower --data\.sequence_length"),
    "capacity_per_env": (["--data.capacity", "30", "--data.sequence_length", "16", "--env.num_envs", "2"],
                         r"data\.capacity=30 is too small: each of the 2 env streams keeps .* = 15 steps"),
    "num_envs": (["--env.num_envs", "0"], r"env\.num_envs=0 must be >= 1.*--env\.num_envs"),
    "action_repeat": (["--env.action_repeat", "0"], r"env\.action_repeat=0 must be >= 1"),
    "total_steps": (["--env.total_steps", "0"], r"env\.total_steps=0 must be >= 1"),
    "eval_episodes": (["--env.eval_episodes", "-1"], r"env\.eval_episodes=-1 must be >= 0"),
    "checkpoint_every": (["--run.checkpoint_every", "-5"], r"run\.checkpoint_every=-5 must be >= 0"),
    "time_limit": (["--env.time_limit", "0"], r"env\.time_limit=0 must be >= 1.*--env\.time_limit"),
    "train_ratio": (["--env.train_ratio", "0"], r"env\.train_ratio=0\.0 must be > 0.*--env\.train_ratio"),
    "prefill": (["--env.prefill", "20000"],
                r"env\.prefill=20000 is more than env\.total_steps=12000.*Lower --env\.prefill or raise --env\.total_steps"),
    "size": (["--model.size", "size3M"], r"model\.size=size3M is not a known size preset.*size1M, size12M"),
    "precision_16": (["--trainer.precision", "16-mixed"],
                     r"trainer\.precision=16-mixed: fp16 mixed precision does not run on CPU.*silently run bf16.*"
                     r"--trainer\.precision 32-true or bf16-mixed"),
    "precision_64": (["--trainer.precision", "64-true"], r"trainer\.precision=64-true is not supported on cpu.*32-true"),
    "precision_bf16_true": (["--trainer.precision", "bf16-true"], r"trainer\.precision=bf16-true is not supported"),
    "devices": (["--trainer.devices", "0"], r"trainer\.devices=0 is not valid on CPU.*positive integer or auto"),
    "single_device": (["--trainer.devices", "2", "--trainer.strategy", "single_device"],
                      r"trainer\.devices=2 with trainer\.strategy=single_device.*--trainer\.strategy ddp"),
    "accelerator_unknown": (["--trainer.accelerator", "hpu"], r"trainer\.accelerator=hpu is not a known accelerator.*cpu"),
    "storage": (["--data.storage", "cuda", "--data.memmap_dir", "/tmp/mm"], r"data\.memmap_dir=/tmp/mm .*--data\.storage cpu"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_before_anything_is_created(tmp_path, case):
    args, message = BAD[case]
    with pytest.raises(ConfigError, match=message) as refused:
        run_cli(tmp_path, *args)
    assert str(refused.value).endswith("Nothing was created.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("accelerator", ["cuda", "gpu"])
def test_unavailable_accelerator_is_refused(tmp_path, accelerator):
    with pytest.raises(ConfigError, match=rf"trainer\.accelerator={accelerator} but .* available on this machine.*"
                                          r"--trainer\.accelerator cpu \(or auto\)"):
        run_cli(tmp_path, "--trainer.accelerator", accelerator)
    assert list(tmp_path.iterdir()) == []


def test_other_subcommands_get_the_trainer_checks_only(tmp_path):
    """test and predict play a trained agent: the trainer's settings are checked, not training's;
    without a checkpoint they are refused before anything is made."""
    config = Namespace(trainer=Namespace(accelerator="cpu", precision="16", devices=1, strategy="auto"),
                       env=Namespace(prefill=-1, total_steps=10), model=Namespace(size="size1M"))
    for subcommand in ("test", "predict"):
        with pytest.raises(ConfigError, match=r"trainer\.precision=16") as refused:
            check_config(config, subcommand)
        assert "env.prefill" not in str(refused.value)
        with pytest.raises(CheckpointError, match="ckpt_path is not set"):
            run_cli(tmp_path, subcommand=subcommand)
    assert list(tmp_path.iterdir()) == []


def test_every_problem_is_reported_together(tmp_path):
    with pytest.raises(ConfigError) as refused:
        run_cli(tmp_path, "--data.batch_size", "0", "--data.capacity", "10", "--env.train_ratio", "0",
                "--model.size", "huge", "--trainer.precision", "16-mixed")
    lines = str(refused.value).splitlines()
    assert lines[0] == "5 problems in the config:" and lines[-1] == "Nothing was created."
    for key in ("data.batch_size=0", "data.capacity=10", "env.train_ratio=0.0", "model.size=huge", "trainer.precision=16-mixed"):
        assert sum(line.startswith(f"- {key}") for line in lines) == 1, key
    assert list(tmp_path.iterdir()) == []


def test_an_image_size_the_encoder_cannot_take_fails_before_the_run_folder(tmp_path, monkeypatch):
    # The env's shapes reach the model only when classes are instantiated; the model is built
    # before the trainer, whose construction creates the run folder and the MLflow run.
    monkeypatch.setattr(callbacks.env_loop, "make_env", functools.partial(wm.envs.make_env, image_size=40))
    with pytest.raises(ValueError, match=r"image 'image' of shape \(40, 40, 3\): height and width must be multiples of 16"):
        run_cli(tmp_path)
    assert list(tmp_path.iterdir()) == []


def file_hashes(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_refused_command_leaves_an_existing_run_untouched(tmp_path):
    run_cli(tmp_path, *TINY)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    before = file_hashes(tmp_path)
    assert "mlflow.db" in before and "tiny/checkpoints/last.ckpt" in before
    refused = (["--data.batch_size", "0"], ["--trainer.precision", "16-mixed"], ["--ckpt_path", "last", "--env.train_ratio", "0"])
    for bad in refused:
        with pytest.raises(ConfigError):
            run_cli(tmp_path, *TINY, *bad)
    assert file_hashes(tmp_path) == before
    [again] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"


def test_cuda_precisions_and_devices(monkeypatch):
    """The CUDA rules on a machine without CUDA: pretend one GPU without bf16 is there."""
    monkeypatch.setattr(wm.run.validation, "accelerator_available", lambda name: name in ("cpu", "cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def check(accelerator="auto", precision="32-true", devices=1):
        trainer = Namespace(accelerator=accelerator, precision=precision, devices=devices, strategy="auto")
        check_config(Namespace(trainer=trainer), "test")

    for precision in ("32-true", 32, "16-mixed", 16):
        check(precision=precision)  # "auto" picks cuda, where fp16 mixed precision runs
    check("gpu", devices="auto")
    with pytest.raises(ConfigError, match=r"trainer\.precision=bf16-mixed is not supported on cuda.*32-true or 16-mixed"):
        check(precision="bf16-mixed")
    with pytest.raises(ConfigError, match=r"trainer\.devices=2 but this machine has 1 CUDA devices"):
        check("cuda", devices=2)


@pytest.mark.parametrize("instructions", [False, True])
def test_bf16_falls_back_to_float32_where_it_is_not_faster(tmp_path, monkeypatch, capsys, instructions):
    """The shipped configs ask for bf16-mixed; on a CPU without bfloat16 instructions, or whose
    bfloat16 matmul measures no faster than float32's, the fit trains in 32-true, says why in one
    line, and logs the precision it used."""
    assert wm.run.validation.native_bf16("cpu") in (True, False)  # the real probe runs here
    assert wm.run.validation.cpu_bf16_speedup() > 0  # and the real measurement
    monkeypatch.setattr(wm.run.validation, "has_bf16_instructions", lambda: instructions)
    monkeypatch.setattr(wm.run.validation, "cpu_bf16_speedup", lambda: 0.5)  # as on one AVX512-BF16 CPU
    run_cli(tmp_path, *TINY, "--trainer.precision", "bf16-mixed")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trainer.precision=bf16-mixed")]
    why = "measured 0.50 times float32's speed here" if instructions else "this device has no native bfloat16"
    assert len(said) == 1 and why in said[0] and said[0].endswith("running in 32-true instead"), said
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])[0]
    assert run.data.params["trainer.precision"] == "32-true"


def test_bf16_where_it_is_measured_faster_is_kept_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wm.run.validation, "has_bf16_instructions", lambda: True)
    monkeypatch.setattr(wm.run.validation, "cpu_bf16_speedup", lambda: 2.4)  # this project's CPUs: 2 to 13 times
    run_cli(tmp_path, *TINY, "--trainer.precision", "bf16-mixed")
    assert "trainer.precision=bf16-mixed: a bfloat16 matmul measured 2.4 times float32's speed on this CPU" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])[0]
    assert run.data.params["trainer.precision"] == "bf16-mixed"
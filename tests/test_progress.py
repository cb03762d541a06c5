"""What a person sees in the terminal: the prefill and training bars over env frames with their
totals and ETAs, and the end-of-run summary, after a finished and after an interrupted real fit."""

from __future__ import annotations

import re
import signal
import time

import pytest

from wm.run.durations import CPU_SIZE12M_UPDATE_SECONDS
from tests.test_crash_safety import start, wait, wait_for
from tests.test_training import client_for
from wm.run.durations import format_duration

# Evaluations at 150 and 300 frames, then the final one when training ends, at 400 or a little more.
SHOWN = ("--trainer.enable_progress_bar", "true", "--env.prefill", "200", "--env.eval_every", "150")


@pytest.mark.slow  # a fit in a subprocess with a terminal, about 35 s
def test_a_finished_fit_shows_frame_bars_and_ends_with_a_summary(tmp_path):
    process = start(tmp_path, *SHOWN, "--env.total_steps", "400")
    assert wait(process, tmp_path) == 0
    out = (tmp_path / "fit.log").read_text()
    assert "Starting 1 env of toy-catch" in out
    assert re.search(r"Prefill \(random actions\): 100%\|.*\| 200/200 frames \[", out)
    # the training bar: frames out of the total, elapsed<remaining, and short fields
    bar = re.findall(r"Training: +\d+%\|.*?\| (\d+)/400 frames \[(\d\d:\d\d)<(\d\d:\d\d|\?), ([^\]]*)\]", out)
    assert bar, out[-3000:]
    assert int(bar[-1][0]) >= 400
    fields = dict(field.rsplit(" ", 1) for field in bar[-1][3].split(", "))
    assert list(fields) == ["fps", "upd/s", "return", "eval"]
    assert all(re.fullmatch(r"-?\d+\.\d+|-", value) for value in fields.values())
    assert "v_num" not in out and "env_steps=" not in out
    client, run = client_for(tmp_path / "tiny")
    final = client.get_metric_history(run.info.run_id, "eval/return")[-1]
    std = client.get_metric_history(run.info.run_id, "eval/return_std")[-1].value
    summary = out[out.index("Run finished: tiny"):]
    assert final.step >= 400, "the final evaluation, when training ended"
    assert f"final eval return: {final.value:.1f} ± {std:.1f} (std over 1 greedy episode, at {final.step:,} frames)" in summary
    assert re.search(r"env frames: 4\d\d of 400, updates: \d+", summary)
    assert f"run folder: {(tmp_path / 'tiny').resolve()}" in summary
    assert f"mlflow ui --backend-store-uri sqlite:///{(tmp_path / 'mlflow.db').resolve()}" in summary
    experiment = client.get_experiment(run.info.experiment_id)
    assert (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
            "/model-metrics?workflowType=machine_learning") in summary
    # the UI opens this experiment on its training runs, not on MLflow 3's GenAI overview
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow  # a size12M model
def test_an_interrupted_gpu_sized_fit_warns_at_start_and_prints_the_summary(tmp_path):
    """A size12M model on a CPU: the start warns how long the run would take, and Ctrl-C still
    ends with the summary and how to resume."""
    process = start(tmp_path, *SHOWN, "--model.size", "size12M", "--env.total_steps", "100000",
                    "--run.checkpoint_every", "100000")
    log = tmp_path / "fit.log"
    wait_for(lambda: "Training:" in log.read_text(), process, tmp_path)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    assert wait(process, tmp_path, timeout=120) == 128 + signal.SIGINT
    out = log.read_text()
    updates = 100_000 * 16 // (2 * 8)  # frames left at the start x train ratio / (B x T)
    low, high = (format_duration(updates * seconds) for seconds in CPU_SIZE12M_UPDATE_SECONDS)
    warning = re.search(r"this fit is sized for a GPU and runs on a CPU: ([\d,]+) updates of a size12M model are left.*?"
                        r"so this run would take (.+?) to (.+?) there", out, re.S)
    assert warning and int(warning[1].replace(",", "")) == updates, out[-3000:]
    assert out.index("this fit is sized for a GPU") < out.index("Prefill (random actions)")  # before any waiting
    assert warning[2] == low and warning[3] == high
    summary = out[out.index("Run interrupted (resume it with --ckpt_path last): tiny"):]
    assert re.search(r"env frames: [\d,]+ of 100,000", summary) and "mlflow ui --backend-store-uri" in summary


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (45, 750, 5 * 3600 + 120, 3 * 86400 + 4 * 3600 + 59)] == \
        ["45 s", "12 min 30 s", "5 h 02 min", "3 d 4 h"]

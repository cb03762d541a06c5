"""What a run is: its name, the record its checkpoints keep, and what may change when it is resumed
or evaluated.

Every checkpoint records its run (`RECORD_KEY`): the resolved config (every key, after the seeds
are derived and the tracking store is resolved), the MLflow run id and the tracking URI. A resume
compares the new config with the recorded one and refuses any change outside `RESUMABLE`, so a
run's name and MLflow run always mean one config. `test` and `predict` rebuild the config from the
record; they refuse a change to what defines the agent under evaluation (`fixed_for_evaluation`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

RECORD_KEY = "wm_run"

# The keys a resume may change, and why each does not change what the run trains.
RESUMABLE: dict[str, str] = {
    "env.total_steps": "extends (or shortens) the run; every frame is collected and trained as before",
    "env.eval_every": "evaluations only read the agent",
    "env.eval_episodes": "evaluations only read the agent",
    "env.eval_videos": "what evaluations record",
    "trainer.log_every_n_steps": "how often metrics are logged",
    "run.checkpoint_every": "how often checkpoints are kept",
    "trainer.enable_progress_bar": "what the terminal shows",
    "trainer.enable_model_summary": "what the terminal shows",
    "trainer.accelerator": "where the run computes (a requeued job may land on another machine)",
    "trainer.devices": "where the run computes (a requeued job may land on another machine)",
    "data.storage": "where the replay buffer lives, not what it holds",
    "data.memmap_dir": "where the replay buffer lives, not what it holds",
    "model.compile": "the compiled update computes what the eager one does (tests pin it)",
    "run.threads": "how many CPU threads compute the same update",
    "run.root": "where the run folder lies (a moved run); its checkpoints and replay are checked as always",
    "run.tracking_uri": "where the MLflow run is stored (a moved store); the run must be found there, or the "
                        "command is refused",
}

# What defines the agent that `test` and `predict` evaluate, and its run: the checkpoint's, never a config's.
EVALUATION_FIXED = ("env.task", "env.action_repeat", "env.time_limit", "env.video_dir", "model.",
                    "run.name", "run.variant", "run.experiment")


SEED_STREAMS = ("env", "data")  # what the run's one seed (seed_everything) seeds, besides torch's generators


def derived_seed(seed: int, stream: str) -> int:
    """The seed of one random stream of a run: `env` (env resets, random prefill actions and,
    offset by 10^6, the evaluation envs) or `data` (replay sampling). numpy's SeedSequence mixes
    the run's seed with the stream's index, so streams are independent of each other and of
    torch's generators, which Lightning seeds with the run's seed itself. The seed is below 2^30,
    leaving room for the offsets added to it (ranks, envs, episodes, restarts) under the 2^32 that
    simulators' own generators accept."""
    return int(np.random.SeedSequence([seed, SEED_STREAMS.index(stream)]).generate_state(1)[0] >> 2)


def fixed_for_evaluation(key: str) -> bool:
    """Whether `test` and `predict` must take `key` from the checkpoint (keys a resume may change are free)."""
    return key not in RESUMABLE and any(key == fixed or (fixed.endswith(".") and key.startswith(fixed)) for fixed in EVALUATION_FIXED)


def run_name(task: str, objective: str, seed: int | str) -> str:
    """`<task>-<variant or objective>-s<seed>`, with characters a folder name should not hold replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}-{objective}-s{seed}")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested mappings as dotted keys: {"model": {"size": "size1M"}} -> {"model.size": "size1M"}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def changed_keys(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, recorded value, current value) for every key that both configs set, differently.

    A key only one of them has is a setting added or removed between versions of wm, or an init
    argument of another objective class, whose `class_path` then differs."""
    old, new = flatten(recorded), flatten(current)
    return [(key, old[key], new[key]) for key in old if key in new and old[key] != new[key]]


def describe_changes(changes: list[tuple[str, object, object]]) -> str:
    return "\n".join(f"  {key}: {old!r} (checkpoint) -> {new!r} (now)" for key, old, new in changes)


def override_pairs(arguments: list[str]) -> list[tuple[str, str]]:
    """(key, value) of command-line overrides (`--key value` or `--key=value`); a `--config` file
    stands for its content, so an edited file counts as a change."""
    pairs, i = [], 0
    while i < len(arguments):
        token = arguments[i]
        i += 1
        if not token.startswith("--"):
            continue
        key, eq, value = token[2:].partition("=")
        if not eq and i < len(arguments) and not arguments[i].startswith("--"):
            value, i = arguments[i], i + 1
        if key == "config" and Path(value).is_file():
            value = Path(value).read_text()
        pairs.append((key, value))
    return pairs


def overrides_tag(arguments: list[str]) -> str:
    """A short stable tag of the overrides that change what a run trains (keys in RESUMABLE are
    left out), or "" when there are none: runs that differ by an override never share a name."""
    trained = [pair for pair in override_pairs(arguments) if pair[0] not in RESUMABLE]
    if not trained:
        return ""
    return hashlib.sha256(json.dumps(trained).encode()).hexdigest()[:6]

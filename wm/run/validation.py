"""Refuse bad config values before anything of a run exists.

`check_config` runs first thing in `WMCLI.before_instantiate_classes`: before any class is
instantiated, so before the run folder, the MLflow run or the replay buffer are created. It
collects every problem it finds and raises one `ConfigError` that lists them, one a line, each
naming the key, the value given, what is wrong and how to fix it.

What needs the built objects is checked where they are built, still before the trainer (and with
it the run folder and the MLflow run) is instantiated: LightningCLI instantiates the model, the
datamodule and the env callback first. An image size
the conv encoder cannot halve four times fails in `wm.model.encoder.check_image_shape`. A misspelled
task is named here with the closest valid one.
"""

from __future__ import annotations

import difflib
import functools
import time

import torch
from lightning.pytorch.accelerators import AcceleratorRegistry

from datamodules.replay_buffer import per_env_capacity
from wm.model.sizes import SIZES

NOTHING_CREATED = "Nothing was created."

# Lightning's aliases of precision values (lightning.fabric.connector._convert_precision_to_unified_args).
PRECISION_ALIASES = {32: "32-true", "32": "32-true", 16: "16-mixed", "16": "16-mixed", 64: "64-true", "64": "64-true",
                     "bf16": "bf16-mixed", None: "32-true"}
# Lightning's pick for accelerator "auto", in its order (lightning.fabric.utilities.device_parser).
AUTO_ORDER = ("tpu", "mps", "cuda")


class ConfigError(ValueError):
    """Config values that are certainly wrong, found before anything was created."""


def check_config(config, subcommand: str | None) -> None:
    """Raise a ConfigError listing every problem of `config` (the subcommand's namespace)."""
    problems = trainer_problems(config) + logger_problems(config) + model_problems(config)
    if subcommand == "fit":
        problems += env_and_data_problems(config)
    refuse(problems, "the config")


def refuse(problems: list[str], where: str) -> None:
    """Raise one ConfigError listing `problems` (found in `where`), if there are any."""
    if not problems:
        return
    if len(problems) == 1:
        raise ConfigError(f"{problems[0]} {NOTHING_CREATED}")
    lines = "\n".join(f"- {p}" for p in problems)
    raise ConfigError(f"{len(problems)} problems in {where}:\n{lines}\n{NOTHING_CREATED}")


def closest(value: str, valid: list[str]) -> str:
    """" Did you mean X?" for the valid value nearest a misspelled one, else ""."""
    match = difflib.get_close_matches(value, valid, n=1, cutoff=0.6)
    return f" Did you mean {match[0]}?" if match else ""


def task_problems(task, key: str = "env.task") -> list[str]:
    """An unknown task (given as `key`), named with the closest valid one (a suite whose simulator
    cannot load here is left to the env's own one-line error)."""
    from wm.envs import SUITES, available_tasks

    if not isinstance(task, str):
        return []
    suite = task.partition("-")[0]
    if suite not in SUITES:
        names = sorted(SUITES)
        return [f"{key}={task!r}: no suite {suite!r}.{closest(suite, names)} Suites: {', '.join(names)} "
                "(a task is <suite>-<name>, e.g. dmc-walker_walk)."]
    try:
        tasks = available_tasks([suite])
    except (RuntimeError, ImportError):
        return []
    if task in tasks:
        return []
    shown = ", ".join(tasks[:12]) + (f" and {len(tasks) - 12} more" if len(tasks) > 12 else "")
    return [f"{key}={task!r} is not a task.{closest(task, tasks)} The {suite} tasks: {shown}."]


# ----------------------------------------------------------------------------------- env and data
def env_and_data_problems(config) -> list[str]:
    problems = [*task_problems(config.get("env.task")),
        *at_least(config, 1, "data.batch_size", "data.sequence_length", "data.capacity", "env.num_envs",
                  "env.action_repeat", "env.total_steps"),
        *at_least(config, 0, "env.prefill", "env.eval_every", "env.eval_episodes", "run.checkpoint_every"),
    ]
    time_limit = config.get("env.time_limit")
    if time_limit is not None and time_limit < 1:
        problems.append(f"env.time_limit={time_limit} must be >= 1 agent steps, or null for the task's own episode "
                        "length. Set --env.time_limit to a positive number or leave it out.")
    ratio = config.get("env.train_ratio")
    if ratio is not None and not ratio > 0:
        problems.append(f"env.train_ratio={ratio} must be > 0: it is the replayed steps per agent step, and each "
                        "update is followed by batch_size x sequence_length / train_ratio agent steps. "
                        "Set --env.train_ratio to a positive number, e.g. 32.")
    capacity, length, envs = config.get("data.capacity"), config.get("data.sequence_length"), config.get("env.num_envs")
    if all(isinstance(v, int) and v > 0 for v in (capacity, length, envs)) and per_env_capacity(capacity, envs) < length:
        problems.append(
            f"data.capacity={capacity} is too small: each of the {envs} env streams keeps ceil(capacity / "
            f"env.num_envs) = {per_env_capacity(capacity, envs)} steps and must hold a full sequence "
            f"(data.sequence_length={length}), so capacity must be >= sequence_length x env.num_envs = "
            f"{length * envs}. Raise --data.capacity or lower --data.sequence_length."
        )
    prefill, total = config.get("env.prefill"), config.get("env.total_steps")
    if isinstance(prefill, int) and isinstance(total, int) and total > 0 and prefill > total:
        problems.append(f"env.prefill={prefill} is more than env.total_steps={total}: the run would end before "
                        "the first update. Lower --env.prefill or raise --env.total_steps.")
    problems += storage_problems(config)
    return problems


def at_least(config, minimum: int, *keys: str) -> list[str]:
    """`key=value must be >= minimum` for each key whose value is below it."""
    return [
        f"{key}={config.get(key)} must be >= {minimum}. Set --{key} to {minimum} or more."
        for key in keys
        if config.get(key) is not None and config.get(key) < minimum
    ]


def storage_problems(config) -> list[str]:
    storage = config.get("data.storage")
    if storage != "cuda":
        return []
    problems = []
    if not torch.cuda.is_available():
        problems.append("data.storage=cuda but CUDA is not available on this machine. Use --data.storage cpu.")
    if config.get("data.memmap_dir"):
        problems.append(f"data.memmap_dir={config.get('data.memmap_dir')} keeps the buffer in files on the CPU, "
                        "but data.storage=cuda. Use --data.storage cpu or leave --data.memmap_dir out.")
    return problems


def logger_problems(config) -> list[str]:
    logger = config.get("trainer.logger")
    if logger is None:
        return []
    return [f"trainer.logger={logger!r} is not supported: wm logs every run to MLflow, against env frames, and "
            "reads it back there (resume, test, wm.report). Choose the MLflow store with --run.tracking_uri (or "
            "MLFLOW_TRACKING_URI), e.g. a tracking server, and remove --trainer.logger."]


# ------------------------------------------------------------------------------------------ model
def model_problems(config) -> list[str]:
    size = config.get("model.size")
    if size is None or size in SIZES:
        return []
    return [f"model.size={size} is not a known size preset. Choose --model.size from {', '.join(SIZES)}."]


# ---------------------------------------------------------------------------------------- trainer
def trainer_problems(config) -> list[str]:
    accelerator = config.get("trainer.accelerator")
    if not isinstance(accelerator, str):  # an Accelerator given by class_path: Lightning checks it
        return []
    device, problems = resolve_accelerator(accelerator)
    if device is None:
        return problems
    problems += devices_problems(config, device) + precision_problems(config, device)
    return problems


def accelerator_available(name: str) -> bool:
    return AcceleratorRegistry[name]["accelerator"].is_available()


def resolve_accelerator(accelerator: str) -> tuple[str | None, list[str]]:
    """The device type `accelerator` runs on here, or None and why it cannot."""
    if accelerator == "auto":
        return next((n for n in AUTO_ORDER if n in AcceleratorRegistry and accelerator_available(n)), "cpu"), []
    if accelerator == "gpu":
        device = next((n for n in ("mps", "cuda") if accelerator_available(n)), None)
        if device is None:
            return None, ["trainer.accelerator=gpu but neither CUDA nor MPS is available on this machine. "
                          "Use --trainer.accelerator cpu (or auto)."]
        return device, []
    if accelerator not in AcceleratorRegistry:
        known = ", ".join(sorted([*AcceleratorRegistry.available_accelerators(), "gpu", "auto"]))
        return None, [f"trainer.accelerator={accelerator} is not a known accelerator. Choose one of {known}."]
    if not accelerator_available(accelerator):
        here = [n for n in sorted(AcceleratorRegistry.available_accelerators()) if accelerator_available(n)]
        what = "CUDA" if accelerator == "cuda" else accelerator.upper()
        return None, [f"trainer.accelerator={accelerator} but {what} is not available on this machine (available: "
                      f"{', '.join(here)}). Use --trainer.accelerator cpu (or auto)."]
    return accelerator, []


def devices_problems(config, device: str) -> list[str]:
    devices = config.get("trainer.devices")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if device == "cpu" and devices != "auto" and not (isinstance(devices, int) and devices > 0):
        return [f"trainer.devices={devices} is not valid on CPU: it is the number of processes. "
                "Set --trainer.devices to a positive integer or auto."]
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        return [f"trainer.devices={devices} is not valid. "
                "Set --trainer.devices to a positive integer, -1 (all) or auto."]
    if device == "cuda" and isinstance(devices, int) and devices > torch.cuda.device_count():
        return [f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA devices. "
                "Lower --trainer.devices (or use auto)."]
    strategy = config.get("trainer.strategy")
    if isinstance(devices, int) and devices > 1 and strategy == "single_device":
        return [f"trainer.devices={devices} with trainer.strategy=single_device would silently use one device. "
                "Use --trainer.strategy ddp (or auto), or --trainer.devices 1."]
    return []


def supported_precisions(device: str) -> list[str] | None:
    """The precision values this project runs on `device`; None: not checked here."""
    if device == "cpu":
        return ["32-true"] + (["bf16-mixed"] if torch.amp.is_autocast_available("cpu") else [])
    if device == "cuda":
        return ["32-true", "16-mixed"] + (["bf16-mixed"] if torch.cuda.is_bf16_supported() else [])
    return None


def has_bf16_instructions() -> bool:
    """Whether this CPU has bfloat16 matmul instructions (AVX512-BF16 or AMX)."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


@functools.cache
def cpu_bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """A float32 matmul's time over a bfloat16 one's on this CPU, with this process's threads
    (square `size`, best of `repeats`): whether the instructions are there is not whether torch's
    kernels use them (one AVX512-BF16 CPU ran an eager bf16 update 2-4x slower than fp32)."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


BF16_MARGIN = 1.2  # bf16 on a CPU only where its matmul measured this much faster than float32's


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 faster than float32, where bf16-mixed is the faster
    setting: Ampere or later GPUs; CPUs with AVX512-BF16 or AMX whose bf16 matmul also measured
    faster here (`cpu_bf16_speedup`)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        return has_bf16_instructions() and cpu_bf16_speedup() > BF16_MARGIN
    return False


def effective_precision(precision, device: str) -> str:
    """The one rule for `fit`, `test` and every `wm.bench` mode: bf16-mixed only where `device`
    computes bfloat16 natively, else 32-true (emulated bfloat16 is slower than float32). Other
    precisions are what they say (Lightning's aliases resolved)."""
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision == "bf16-mixed" and device in ("cpu", "cuda") and not native_bf16(device):
        return "32-true"
    return precision


def fallback_message(requested, effective: str, device: str = "cpu") -> str:
    if device == "cpu" and has_bf16_instructions():
        why = (f"this CPU has bfloat16 instructions, but a bfloat16 matmul measured {cpu_bf16_speedup():.2f} times "
               f"float32's speed here (under the {BF16_MARGIN} that pays for mixed precision)")
    else:
        why = "this device has no native bfloat16 (no AVX512-BF16 or AMX CPU, no Ampere or newer GPU) and would emulate it"
    return f"precision={requested}: {why}; running in {effective} instead"


def precision_choice(config) -> str | None:
    """What the precision rule decided for a config's bf16-mixed, in one line (the precision
    becomes float32 where bf16 is not faster, `effective_precision`), and sets it; None where
    there was nothing to decide."""
    accelerator = config.get("trainer.accelerator")
    precision = PRECISION_ALIASES.get(config.get("trainer.precision"), config.get("trainer.precision"))
    if not isinstance(accelerator, str) or precision != "bf16-mixed":
        return None
    device, _ = resolve_accelerator(accelerator)
    effective = effective_precision(precision, device)
    if effective != precision:
        config.trainer.precision = effective
        return fallback_message(precision, effective, device)
    if device == "cpu":
        return f"precision=bf16-mixed: a bfloat16 matmul measured {cpu_bf16_speedup():.1f} times float32's speed on this CPU"
    return None


def precision_problems(config, device: str) -> list[str]:
    given = config.get("trainer.precision")
    precision = PRECISION_ALIASES.get(given, given)
    supported = supported_precisions(device)
    if supported is None or precision in supported:
        return []
    choices = " or ".join(supported)
    if device == "cpu" and precision == "16-mixed":
        return [f"trainer.precision={given}: fp16 mixed precision does not run on CPU, Lightning would silently run "
                f"bf16-mixed while the logged param says 16-mixed. Use --trainer.precision {choices}."]
    return [f"trainer.precision={given} is not supported on {device} here. Use --trainer.precision {choices}."]

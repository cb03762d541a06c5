"""Updates whose loss or gradients are not finite are skipped, counted and named, through a real
Trainer: nothing of the model or the optimiser changes, and too many in a row stop the run. The
decision is made on the device (no host sync in the update); the host learns of it, warns and
stops at the log interval."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from wm.agent.agent import Agent, NonFiniteLossError
from wm.bench.update import RepeatBatch
from wm.objectives import Barlow, MuDreamer
from wm.model.optim import OptimizerConfig
from wm.agent.synthetic import random_batch

IMAGE = {"image": (64, 64, 3)}


def make_agent(objective=None, **kwargs) -> Agent:
    torch.manual_seed(0)
    return Agent(IMAGE, 3, objective=objective or Barlow(), size="size1M",
                 optimizer=OptimizerConfig(lr=1e-3, warmup=10), **kwargs)


def fit(agent: Agent, max_steps: int, *callbacks: L.Callback, log_every_n_steps: int = 1) -> L.Trainer:
    batch = random_batch(IMAGE, 3, False, 4, 12, torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=log_every_n_steps,
                        callbacks=list(callbacks))
    trainer.fit(agent, DataLoader(RepeatBatch(batch), batch_size=None))
    return trainer


def poison_objective(agent: Agent, term: str, calls: set[int] | None) -> None:
    """Multiply one objective term by NaN on the given calls (every call when None), keeping its graph."""
    count = iter(range(10**9))

    def hook(module, inputs, output):
        if calls is None or next(count) in calls:
            return {**output, term: output[term] * float("nan")}
        return output

    agent.world_model.objective.register_forward_hook(hook)


def same_optimizer_state(a: dict, b: dict) -> bool:
    """Bit-exact equality of two optimiser state dicts (per-parameter tensors and param groups)."""
    def same(x, y):
        return set(x) == set(y) and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)

    return a["param_groups"] == b["param_groups"] and set(a["state"]) == set(b["state"]) and all(
        same(a["state"][i], b["state"][i]) for i in a["state"]
    )


class Recorder(L.Callback):
    """Per batch: the output, whether the module state and the optimiser state came out bit-exact
    as they went in, the logged skip count and the agent's counters."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = pl_module.state_dict()  # parameters and buffers
        self.rows.append({
            "outputs": outputs,
            "changed": [k for k, v in self.state.items() if not torch.equal(state[k], v)],
            "optim_same": same_optimizer_state(self.optim, trainer.optimizers[0].state_dict()),
            "logged_skips": float(trainer.callback_metrics.get("train/skipped_updates", float("nan"))),
            "skipped_updates": pl_module.skipped_updates,
            "consecutive_skips": pl_module.consecutive_skips,
            "global_step": trainer.global_step,
            "grads": [n for n, p in pl_module.named_parameters() if p.grad is not None],
        })


@pytest.fixture(scope="module")
def skip_once(tmp_path_factory):
    """Updates good, NaN in the Barlow term (skipped), good; then a checkpoint of the run."""
    agent = make_agent()
    poison_objective(agent, "barlow", {1})
    recorder = Recorder()
    with pytest.warns(UserWarning, match=r"skipped") as warned:
        trainer = fit(agent, 3, recorder)
    path = tmp_path_factory.mktemp("ckpt") / "skip.ckpt"
    trainer.save_checkpoint(path)
    messages = [str(w.message) for w in warned if "skipped" in str(w.message)]
    return agent, recorder.rows, messages, path


def taken(rows: list[dict]) -> list[bool]:
    return [bool(r["outputs"]["taken"]) for r in rows]


def test_nan_loss_skips_the_update_and_names_the_term(skip_once):
    agent, rows, messages, _ = skip_once
    assert taken(rows) == [True, False, True]
    good, skipped, _ = rows
    assert not good["optim_same"] and good["changed"], "the first update changed nothing"
    assert not skipped["changed"], f"a skipped update changed {skipped['changed']}"
    assert skipped["optim_same"], "a skipped update changed the optimiser state"
    assert not skipped["grads"] and not good["grads"], "gradients left behind by an update"
    assert skipped["outputs"]["loss"].isnan()
    # global_step counts the updates made, skipped ones included (the skip is decided on the device)
    assert (good["global_step"], skipped["global_step"]) == (1, 2)
    assert (skipped["skipped_updates"], skipped["consecutive_skips"], skipped["logged_skips"]) == (1, 1, 1.0)
    assert good["logged_skips"] == 0.0
    assert len(messages) == 1
    message = messages[0]
    assert message.startswith("1 of the last 1 updates skipped, up to global step 2 (1 in a row, 1 in all); the last one: "), message
    assert "world_model/barlow" in message
    assert not any(t in message for t in ("world_model/reward", "world_model/dyn", "actor_critic/")), message
    assert "non-finite gradients in" in message and "world_model.objective.projector" in message
    assert "actor_critic.actor" not in message, "the actor's loss never saw the NaN"


def test_finite_update_after_a_skip_proceeds(skip_once):
    agent, rows, _, _ = skip_once
    after = rows[2]
    assert after["changed"] and not after["optim_same"]
    assert (after["skipped_updates"], after["consecutive_skips"], after["logged_skips"]) == (1, 0, 1.0)
    assert after["global_step"] == 3
    assert all(torch.isfinite(p).all() for p in agent.parameters())


def test_skips_are_reported_at_the_log_interval():
    """With log_every_n_steps=3 the host learns of a skip at the third update, not before."""
    agent = make_agent()
    poison_objective(agent, "barlow", {0})
    recorder = Recorder()
    with pytest.warns(UserWarning, match="skipped") as warned:
        fit(agent, 3, recorder, log_every_n_steps=3)
    assert taken(recorder.rows) == [False, True, True]
    assert [r["skipped_updates"] for r in recorder.rows] == [0, 0, 1]
    assert [r["logged_skips"] for r in recorder.rows][2] == 1.0
    message = next(str(w.message) for w in warned if "skipped" in str(w.message))
    assert message.startswith("1 of the last 3 updates skipped, up to global step 3 (0 in a row, 1 in all)"), message
    assert "world_model/barlow" in message


def test_skip_count_survives_a_checkpoint(skip_once):
    _, _, _, path = skip_once
    fresh = make_agent()
    fresh.on_load_checkpoint(torch.load(path, weights_only=False))
    assert (fresh.skipped_updates, fresh.consecutive_skips) == (1, 0)
    fresh.on_load_checkpoint({"hyper_parameters": dict(fresh.hparams)})  # a checkpoint from before the count
    assert fresh.skipped_updates == 0


def test_consecutive_skips_stop_the_run():
    agent = make_agent(max_consecutive_skips=2)
    poison_objective(agent, "barlow", None)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    with pytest.warns(UserWarning, match="skipped"):
        with pytest.raises(NonFiniteLossError, match=r"2 consecutive updates were skipped.*world_model/barlow") as error:
            fit(agent, 5)
    message = str(error.value)
    assert "checkpoints folder" in message and "learning rate" in message and "32-true" in message
    assert "rewards and observations" in message
    assert agent.skipped_updates == 2 and agent.global_step == 2
    assert all(torch.equal(agent.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        make_agent(max_consecutive_skips=0)


def test_non_finite_gradient_with_finite_loss_is_skipped_and_the_module_named():
    # MuDreamer: its BatchNorm statistics, updated by the forward pass, must be restored as well.
    agent = make_agent(MuDreamer())
    weight = agent.world_model.cont.out.weight
    calls = iter(range(10**9))
    weight.register_hook(lambda g: torch.full_like(g, float("inf")) if next(calls) == 1 else g)
    recorder = Recorder()
    with pytest.warns(UserWarning, match="skipped") as warned:
        fit(agent, 3, recorder)
    assert taken(recorder.rows) == [True, False, True]
    skipped = recorder.rows[1]
    assert not skipped["changed"] and skipped["optim_same"], skipped["changed"]
    assert skipped["outputs"]["loss"].isfinite()
    message = next(str(w.message) for w in warned if "skipped" in str(w.message))
    assert message.endswith("the last one: non-finite gradients in world_model.cont"), message

"""The compiled update (`model.compile`) against the eager one, and the update's host syncs.

- Dynamo traces the loss of every objective, for both action kinds, as one graph (no graph break).
- Compiled (inductor, `fullgraph=True`) and eager give the same losses and gradients within
  float32 reordering error, in both compile scopes (the cases are listed below): the same random
  draws are made (`fallback_random`), so any difference is the compiler's.
- torch.profiler sees no host sync in one training batch (eager and compiled).
- A compiled Trainer fit through the CLI runs, checkpoints and resumes, never compiles after its
  first update, and trains eagerly when the compile fails.
Models are tiny (a test-only size preset, 16x16 images) to keep compilation short.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_losses import TINY
from tests.test_training import TINY as TINY_FIT
from tests.test_training import client_for
from wm.agent.actor_critic import ActorCriticConfig
from wm.agent.agent import Agent
from wm.bench.update import RepeatBatch
from wm.run.cli import main
from wm.objectives import OBJECTIVES, make_objective
from wm.bench.profiling import HOST_SYNC_OPS, ProfileBatch, count_ops
from wm.model.sizes import SIZES
from wm.agent.synthetic import random_batch

SHAPES = {"image": (16, 16, 3), "vec": (5,)}
ACTIONS = 3
COMBINATIONS = [(name, discrete) for name in OBJECTIVES for discrete in (False, True)]
IDS = [f"{name}-{'discrete' if discrete else 'continuous'}" for name, discrete in COMBINATIONS]
# Tracing and counting syncs take a few seconds per pair: two pairs (both action kinds) by default, all with -m slow.
TRACED = [pytest.param(*case, id=name, marks=() if case in {("barlow", False), ("reconstruction", True)} else pytest.mark.slow)
          for case, name in zip(COMBINATIONS, IDS)]
# Each compiled-vs-eager case compiles its own update (15-70 s on 2 cores): the default suite compiles
# the default path (barlow, continuous actions, regions); -m slow compiles every objective once in
# regions and the four original ones in one graph ("update"), both action kinds in each scope.
DEFAULT_COMPILED = ("barlow", False, "regions")
ONCE_EACH = {("barlow", False), ("reconstruction", True), ("mudreamer", False), ("none", True), ("infonce", True),
             ("dreamerpro", False)}
SINGLE_GRAPH = {("barlow", False), ("reconstruction", True), ("mudreamer", False), ("none", True)}
COMPILED_CASES = [pytest.param(*case, scope, id=f"{name}-{scope}",
                               marks=() if (*case, scope) == DEFAULT_COMPILED else pytest.mark.slow)
                  for scope, cases in (("regions", ONCE_EACH), ("update", SINGLE_GRAPH))
                  for case, name in zip(COMBINATIONS, IDS) if case in cases]
# float32 sums reordered by the compiler, through the recurrences and their backward
RTOL, ATOL = 1e-4, 1e-5


def tiny_agent(monkeypatch, objective: str, discrete: bool, **kwargs) -> Agent:
    monkeypatch.setitem(SIZES, "sizeTiny", TINY)
    torch.manual_seed(0)
    return Agent(SHAPES, ACTIONS, discrete=discrete, objective=make_objective(objective), size="sizeTiny",
                 actor_critic=ActorCriticConfig(horizon=2), **kwargs)


def batch(discrete: bool) -> dict[str, torch.Tensor]:
    """Two sequences of 3 steps (an episode start at t = 0): the shortest that has a return."""
    return random_batch(SHAPES, ACTIONS, discrete, 2, 3, torch.Generator().manual_seed(1))


def loss_and_grads(agent: Agent, losses, data) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(123)
    total, metrics, _ = losses(data)
    agent.zero_grad(set_to_none=True)
    total.backward()
    grads = {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in metrics.items()}, grads


@pytest.mark.parametrize(("objective", "discrete"), TRACED)
def test_the_loss_traces_as_one_graph(monkeypatch, objective, discrete):
    agent = tiny_agent(monkeypatch, objective, discrete)
    explained = torch._dynamo.explain(agent.losses)(batch(discrete))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize(("objective", "discrete", "scope"), COMPILED_CASES)
def test_compiled_losses_and_gradients_equal_eager(monkeypatch, objective, discrete, scope):
    """Both compile scopes: the repeated blocks (the default) and the whole update as one graph."""
    eager_agent = tiny_agent(monkeypatch, objective, discrete)
    compiled_agent = copy.deepcopy(eager_agent)
    compiled_agent.hparams.update(compile=True, compile_scope=scope)
    data = batch(discrete)
    eager_metrics, eager_grads = loss_and_grads(eager_agent, eager_agent.losses, data)
    torch._dynamo.reset()
    compiled = compiled_agent.loss_function()
    assert (compiled == compiled_agent.losses) == (scope == "regions"), "regions compile the blocks inside losses"
    with torch._inductor.config.patch(fallback_random=True):  # eager's random draws
        compiled_metrics, compiled_grads = loss_and_grads(compiled_agent, compiled, data)
    assert eager_metrics.keys() == compiled_metrics.keys() and eager_grads.keys() == compiled_grads.keys()
    assert len(eager_grads) == len([p for p in eager_agent.parameters() if p.requires_grad])
    for name, value in eager_metrics.items():
        torch.testing.assert_close(compiled_metrics[name], value, rtol=RTOL, atol=ATOL, msg=name)
    for name, grad in eager_grads.items():
        assert grad.abs().max() > 0 or compiled_grads[name].abs().max() == 0, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)
    # the buffers a forward pass changes (MuDreamer's BatchNorm statistics) change alike
    for (name, a), b in zip(eager_agent.named_buffers(), compiled_agent.buffers()):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=name)


def test_profiler_counts_host_syncs():
    """The counter itself: .item(), bool() and boolean-mask indexing are seen, plain math is not."""
    x = torch.randn(8)
    with torch.profiler.profile() as clean:
        (x * 2).sum().exp()
    assert count_ops(clean.events()).syncs == {}
    with torch.profiler.profile() as syncing:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0].sum()
    syncs = count_ops(syncing.events()).syncs
    assert syncs.get("aten::_local_scalar_dense", 0) >= 2 and syncs.get("aten::nonzero", 0) == 1, syncs
    assert set(syncs) <= HOST_SYNC_OPS


def profile_update(agent: Agent, discrete: bool) -> ProfileBatch:
    """Profile the second of three Trainer updates (the first may build optimiser state); logs
    are read every 100 updates, so none of these reads them."""
    profiler = ProfileBatch(batch_idx=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=100,
                        callbacks=[profiler])
    trainer.fit(agent, DataLoader(RepeatBatch(batch(discrete)), batch_size=None))
    return profiler


@pytest.mark.parametrize(("objective", "discrete"), TRACED)
def test_an_update_makes_no_host_sync(monkeypatch, objective, discrete):
    counts = profile_update(tiny_agent(monkeypatch, objective, discrete), discrete).counts
    assert counts.syncs == {}, counts.syncs
    assert counts.aten_ops > 100  # the profile did cover the update


@pytest.mark.slow  # a compilation of its own (~30 s); the graph cannot hold a sync (fullgraph)
def test_a_compiled_update_makes_no_host_sync(monkeypatch):
    counts = profile_update(tiny_agent(monkeypatch, "barlow", False, compile=True), False).counts
    assert counts.syncs == {}, counts.syncs


@pytest.mark.slow  # a compile of its own, about 40 s
def test_a_compiled_fit_runs_and_resumes(tmp_path, monkeypatch):
    """The real CLI fit with --model.compile true (the tiny size, 3-step sequences), then a
    resume of it: the compiled update trains, checkpoints and continues the same run."""
    monkeypatch.setitem(SIZES, "sizeTiny", TINY)
    fit = ["fit", *TINY_FIT, "--run.root", str(tmp_path), "--model.compile", "true", "--model.size", "sizeTiny",
           "--model.actor_critic.horizon", "2", "--data.sequence_length", "3"]
    main([*fit, "--env.total_steps", "30"])
    _, first = client_for(tmp_path / "tiny")
    last = tmp_path / "tiny/checkpoints/last.ckpt"
    first_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    main([*fit, "--env.total_steps", "50", "--ckpt_path", "last"])
    client, second = client_for(tmp_path / "tiny")
    assert second.info.run_id == first.info.run_id and second.info.status == "FINISHED"
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] > first_step > 0
    assert resumed["hyper_parameters"]["compile"] is True
    losses = client.get_metric_history(second.info.run_id, "train/world_model/loss")
    assert max(m.step for m in losses) > first_step and all(math.isfinite(m.value) for m in losses)


class GraphCount(L.Callback):
    """Dynamo's count of graphs compiled so far, after every update (the instances a CLI fit
    makes from `--trainer.callbacks` are kept in `made`)."""

    made: list[GraphCount] = []

    def __init__(self):
        self.after: list[int] = []
        GraphCount.made.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.slow  # a compiled fit, about 25 s
def test_after_its_first_update_a_compiled_fit_never_compiles_again(tmp_path, monkeypatch):
    """Everything the compiled regions see is the same from the first update on (shapes, grad
    modes, the benchmark's recorder outside the graphs); acting and evaluating run eager."""
    monkeypatch.setitem(SIZES, "sizeTiny", TINY)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    GraphCount.made.clear()
    main(["fit", *TINY_FIT, "--run.root", str(tmp_path), "--model.compile", "true", "--model.size", "sizeTiny",
          "--model.actor_critic.horizon", "2", "--data.sequence_length", "3", "--env.total_steps", "40",
          "--env.eval_every", "20", "--trainer.callbacks", '[{"class_path": "tests.test_compile.GraphCount"}]'])
    (count,) = GraphCount.made
    assert len(count.after) >= 20 and count.after[0] > 0, count.after
    assert set(count.after) == {count.after[0]}, f"graphs compiled after the first update: {count.after}"


def test_a_compile_that_fails_trains_eagerly_with_a_one_line_warning(tmp_path, monkeypatch):
    """A compiler error (here a C++ build failure, as an AVX2 machine gave after 25 minutes) must
    not end the run: the update runs eagerly from then on, and the fit finishes."""
    import wm.agent.agent
    from tests.test_training import TINY

    def failing_compile(function, **kwargs):
        def compiled(*args):
            raise RuntimeError("CppCompileError: C++ compile error\n  g++ ... returned 1")
        return compiled

    monkeypatch.setattr(wm.agent.agent.torch, "compile", failing_compile)
    with pytest.warns(UserWarning, match=r"model.compile: compiling the update failed \(RuntimeError: CppCompileError: "
                                         r"C\+\+ compile error\); training eagerly") as warned:
        main(["fit", *TINY, "--run.root", str(tmp_path), "--env.total_steps", "24", "--model.compile", "true"])
    assert sum("compiling the update failed" in str(w.message) for w in warned) == 1, "said once"
    state = torch.load(tmp_path / "tiny/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 8, "every update ran, eagerly"

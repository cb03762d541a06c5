"""The agent on tensors: gradient flow, learning on a fixed batch through a real Trainer,
acting, checkpointed state and clear errors."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_losses import tiny_agent, tiny_batch, trainer
from wm.agent.agent import Agent
from wm.bench.update import RepeatBatch
from wm.objectives import Barlow, MuDreamer, NoObjective, ObjectiveInputs, Reconstruction
from wm.model.optim import OptimizerConfig
from wm.agent.synthetic import random_batch

IMAGE = {"image": (64, 64, 3)}
OBJECTIVES = {
    "reconstruction": Reconstruction,
    "barlow": Barlow,
    "mudreamer": MuDreamer,
    "none": NoObjective,
}


def make_agent(objective, discrete=False, shapes=IMAGE, action_dim=3, **kwargs) -> Agent:
    torch.manual_seed(0)
    return Agent(shapes, action_dim, discrete=discrete, objective=objective, size="size1M", **kwargs)


def batch_for(agent: Agent, batch=4, length=12, seed=0) -> dict[str, torch.Tensor]:
    shapes = {k: tuple(v) for k, v in agent.hparams.observation_shapes.items()}
    return random_batch(shapes, agent.action_dim, agent.discrete, batch, length, torch.Generator().manual_seed(seed))


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


def backward(agent: Agent, loss: torch.Tensor) -> None:
    agent.zero_grad(set_to_none=True)
    loss.backward()


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("discrete", [False, True])
def test_full_step_reaches_every_trainable_parameter(name, discrete):
    agent = make_agent(OBJECTIVES[name](), discrete)
    total, _, _ = agent.losses(batch_for(agent))
    backward(agent, total)
    missing = [n for n, p in agent.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    frozen = [n for n, p in agent.named_parameters() if not p.requires_grad]
    assert all(agent.get_parameter(n).grad is None for n in frozen)
    assert any("slow_critic" in n for n in frozen)
    # Zero-initialised output layers block the gradient to their trunk on the very first step
    # only; every other tensor gets a non-zero gradient.
    zero = [n for n, p in agent.named_parameters() if p.grad is not None and not p.grad.abs().sum()]
    assert all(".trunk." in n and any(h in n for h in ("reward", "critic", "value")) for n in zero), zero


def test_barlow_target_is_detached_from_encoder():
    agent = make_agent(Barlow())
    wm = agent.world_model
    batch = batch_for(agent)
    embed = wm.encoder({"image": batch["image"]})
    post, _, _ = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    zeros = torch.zeros_like(batch["reward"])

    def barlow(posterior):
        inputs = ObjectiveInputs(batch, embed, posterior, posterior.feat, batch["action"], zeros, zeros,
                                 batch["is_first"], batch["is_last"])
        return wm.objective(inputs)["barlow"]

    # Only the target view e_t depends on the encoder here: it must carry no gradient.
    backward(agent, barlow(post.map(torch.Tensor.detach)))
    assert all(g is None for g in grads_of(wm.encoder).values()), "Barlow target leaked into the encoder"
    assert all(g is not None for g in grads_of(wm.objective.projector).values())
    # With the latent view attached, the loss trains the RSSM and, through the posterior, the encoder.
    embed = wm.encoder({"image": batch["image"]})
    post, _, _ = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    backward(agent, barlow(post))
    assert all(g is not None for g in grads_of(wm.rssm.core).values())
    assert all(g is not None for g in grads_of(wm.encoder).values())


@pytest.mark.parametrize("name", ["barlow", "mudreamer", "none"])
def test_the_probe_decoder_trains_only_itself_and_changes_no_other_loss(name):
    """The same agent with and without `probe_decoder`, same weights, same batch, same random draws:
    every other loss term and every other parameter's gradient are equal; the probe learns."""
    plain = make_agent(OBJECTIVES[name]())
    probed = make_agent(OBJECTIVES[name](probe_decoder=True))
    missing, unexpected = probed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("world_model.objective.probe.") for k in missing)
    batch = batch_for(plain)
    outs = []
    for agent in (plain, probed):
        torch.manual_seed(1)
        outs.append(agent.world_model.loss(batch))
        backward(agent, outs[-1].loss)
    out_plain, out_probed = outs
    probe_terms = sorted(k for k in out_probed.terms if k.startswith("probe_"))
    assert probe_terms == ["probe_image"] and out_probed.terms["probe_image"] > 0
    for term, value in out_plain.terms.items():
        torch.testing.assert_close(out_probed.terms[term], value, rtol=0, atol=0, msg=term)
    torch.testing.assert_close(out_probed.loss, out_plain.loss + out_probed.terms["probe_image"])
    plain_grads = dict(plain.named_parameters())
    for parameter, p in probed.named_parameters():
        if parameter.startswith("world_model.objective.probe."):
            assert p.grad is not None and p.grad.abs().sum() > 0, parameter
        elif plain_grads[parameter].grad is None:
            assert p.grad is None, parameter
        else:
            torch.testing.assert_close(p.grad, plain_grads[parameter].grad, rtol=0, atol=0, msg=parameter)
    assert probed.world_model.objective.image_decoder() is probed.world_model.objective.probe
    assert plain.world_model.objective.image_decoder() is None


def test_mudreamer_heads_shape_the_representation_and_batchnorm_switch():
    agent = make_agent(MuDreamer())
    wm = agent.world_model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in wm.encoder.modules())
    assert (wm.kl_dyn, wm.kl_rep) == (0.95, 0.05)
    for term in ("value", "action"):
        out = wm.loss(batch_for(agent))
        backward(agent, out.terms[term])
        assert all(g is not None for g in grads_of(wm.encoder).values()), term
        assert all(g is None for g in grads_of(wm.objective.teacher).values())
    plain = make_agent(MuDreamer(batchnorm=False, value_head=False, action_head=False))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.world_model.encoder.modules())
    assert not list(plain.world_model.objective.parameters())


@pytest.mark.parametrize("place, encoder, posterior", [("encoder", True, False), ("posterior", False, True),
                                                       ("both", True, True), ("none", False, False),
                                                       (True, True, False), (False, False, False)])
def test_mudreamer_batchnorm_goes_where_the_switch_says(place, encoder, posterior):
    """The paper's "representation network" is the encoder or the posterior: either, both or neither
    gets BatchNorm, and only there; the posterior's normalises over the batch at every step."""
    wm = make_agent(MuDreamer(batchnorm=place)).world_model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in wm.encoder.modules()) == encoder
    norm = wm.rssm.post_out[0][0]
    assert isinstance(norm, torch.nn.BatchNorm1d) == posterior
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in
                   [*wm.rssm.core.modules(), *wm.rssm.prior.modules(), *wm.reward.modules(), *wm.cont.modules()])
    if posterior:  # in training, each step's posterior inputs are standardised over the batch
        captured = []
        norm.register_forward_hook(lambda module, inputs, output: captured.append((inputs[0], output)))
        batch = batch_for(make_agent(MuDreamer(batchnorm=place)))
        wm.loss(batch)
        assert len(captured) == batch["reward"].shape[1], "one normalisation per step"
        for x, out in captured:
            assert x.shape == (batch["reward"].shape[0], wm.rssm.size.hidden)
            torch.testing.assert_close(out, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5))
    with pytest.raises(ValueError, match="batchnorm='decoder'"):
        MuDreamer(batchnorm="decoder")


def inputs_of(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Record the positional inputs of every call of `module`."""
    return module.register_forward_pre_hook(lambda m, args: calls.append(args))


@pytest.mark.parametrize("discrete", [False, True])
def test_each_head_reads_the_tensor_the_method_says(discrete):
    """What goes into each head, not only what comes out: MuDreamer's inverse-dynamics head reads
    (e_t, s_{t-1}) with gradients into both, its value head s_t (all but the last step, whose
    return is not known) and its teacher s_t without gradients; the Barlow projector reads s_t of
    every step, the reward and continue heads s_t, the decoder (h_t, z_t)."""
    agent = make_agent(MuDreamer(), discrete)
    wm = agent.world_model
    embeds, inverse, value, teacher, reward, cont = [], [], [], [], [], []
    wm.encoder.register_forward_hook(lambda m, args, out: embeds.append(out))
    for module, calls in ((wm.objective.inverse, inverse), (wm.objective.value, value), (wm.objective.teacher, teacher),
                          (wm.reward, reward), (wm.cont, cont)):
        inputs_of(module, calls)
    out = wm.loss(batch_for(agent))
    feat, (embed,) = out.posterior.feat, embeds
    previous = torch.cat([torch.zeros_like(feat[:, :1]), feat[:, :-1]], 1)  # s_{t-1}: the zero state at t = 0
    (x,), = inverse
    torch.testing.assert_close(x, torch.cat([embed, previous], -1), rtol=0, atol=0)
    assert x.requires_grad and embed.requires_grad, "the action loss trains the encoder and the RSSM"
    (x,), = value
    torch.testing.assert_close(x, feat[:, :-1], rtol=0, atol=0)
    (x,), = teacher
    torch.testing.assert_close(x, feat, rtol=0, atol=0)
    for calls in (reward, cont):
        (x,), = calls
        torch.testing.assert_close(x, feat, rtol=0, atol=0)

    agent = make_agent(Barlow(), discrete)
    projected, embeds = [], []
    agent.world_model.encoder.register_forward_hook(lambda m, args, out: embeds.append(out))
    inputs_of(agent.world_model.objective.projector, projected)
    out = agent.world_model.loss(batch_for(agent))
    (x,), = projected
    torch.testing.assert_close(x, out.posterior.feat.reshape(-1, out.posterior.feat.shape[-1]), rtol=0, atol=0)
    assert x.requires_grad, "the Barlow loss trains the RSSM through the projector"

    agent = make_agent(Reconstruction(), discrete)
    decoded = []
    inputs_of(agent.world_model.objective.decoder, decoded)
    out = agent.world_model.loss(batch_for(agent))
    (deter, stoch), = decoded
    torch.testing.assert_close(deter, out.posterior.deter, rtol=0, atol=0)
    torch.testing.assert_close(stoch, out.posterior.stoch.flatten(-2), rtol=0, atol=0)


def test_none_has_no_projector_and_reconstruction_has_decoder():
    none = make_agent(NoObjective())
    assert not list(none.world_model.objective.parameters())
    assert set(none.parameter_counts()) == {"encoder", "rssm", "reward", "continue", "actor", "critic"}
    assert "decoder" in make_agent(Reconstruction()).parameter_counts()
    assert "projector" in make_agent(Barlow()).parameter_counts()


def test_actor_loss_does_not_reach_the_world_model():
    agent = make_agent(Barlow())
    batch = batch_for(agent)
    wm = agent.world_model.loss(batch)
    start = wm.posterior.map(lambda x: x.detach().flatten(0, 1))
    feat, action = agent.imagine(start)
    reward, cont = agent.world_model.predict_reward(feat), agent.world_model.predict_continue(feat)
    losses, _ = agent.actor_critic.imagination_loss(feat, action, reward, cont)
    backward(agent, losses["policy"] + losses["critic"])
    assert all(g is None for g in grads_of(agent.world_model).values())
    assert all(g is not None for g in grads_of(agent.actor_critic.actor).values())


def test_replay_value_loss_reaches_the_world_model():
    agent = make_agent(NoObjective())
    batch = batch_for(agent)
    out = agent.world_model.loss(batch)
    boot = torch.zeros_like(batch["reward"])
    repval = agent.actor_critic.replay_value_loss(out.posterior.feat, batch["reward"], out.cont, batch["is_last"], boot)
    backward(agent, repval)
    assert all(g is not None for g in grads_of(agent.world_model.rssm.core).values())
    assert all(g is None for g in grads_of(agent.actor_critic.actor).values())


class LossRecorder(L.Callback):
    """The logged world-model loss and objective terms of every update."""

    def __init__(self, terms: tuple[str, ...] = ()):
        self.terms = terms
        self.world_model: list[float] = []
        self.objective: dict[str, list[float]] = {term: [] for term in terms}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.world_model.append(float(trainer.callback_metrics["train/world_model/loss"]))
        for term in self.terms:
            self.objective[term].append(float(trainer.callback_metrics[f"train/world_model/{term}"]))


# Each objective's own loss terms: each must fall on a fixed batch, not only the total.
OWN_TERMS = {"reconstruction": ("recon_image",), "barlow": ("barlow",), "mudreamer": ("value", "action"), "none": ()}


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("discrete", [False, pytest.param(True, marks=pytest.mark.slow)])  # discrete: -m slow
def test_updates_on_a_fixed_batch_decrease_world_model_loss_and_each_objective_term(name, discrete):
    agent = make_agent(OBJECTIVES[name](), discrete, optimizer=OptimizerConfig(lr=1e-3, warmup=0))
    batch = batch_for(agent, batch=4, length=12)
    recorder = LossRecorder(OWN_TERMS[name])
    trainer(30, recorder).fit(agent, DataLoader(RepeatBatch(batch), batch_size=None))
    assert len(recorder.world_model) == 30 and agent.global_step == 30
    for term, losses in {"world_model/loss": recorder.world_model, **recorder.objective}.items():
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < first - 0.1 * abs(first), f"{term} {first:.4f} -> {last:.4f}: {[round(v, 4) for v in losses]}"


def test_dict_and_vector_observations():
    shapes = {"image": (64, 64, 3), "proprio": (5,)}
    agent = make_agent(Reconstruction(), shapes=shapes)
    total, metrics, _ = agent.losses(batch_for(agent))
    assert {"world_model/recon_image", "world_model/recon_proprio"} <= set(metrics)
    backward(agent, total)
    assert agent.world_model.encoder.mlp[0].weight.grad is not None
    vector_only = make_agent(Barlow(), shapes={"state": (7,)})
    assert vector_only.world_model.encoder.out_dim == 64
    total, _, _ = vector_only.losses(batch_for(vector_only))
    assert torch.isfinite(total)


def test_random_shift_switch_keeps_shape_and_changes_input():
    agent = make_agent(Barlow(augment=True))
    obs = {"image": batch_for(agent)["image"]}
    shifted = agent.world_model.objective.encoder_input(obs, ["image"])["image"]
    assert shifted.shape == obs["image"].shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, obs["image"])
    assert make_agent(Barlow()).world_model.objective.encoder_input(obs, ["image"]) is obs


@pytest.mark.parametrize("discrete", [False, True])
def test_act_keeps_one_state_per_env_and_resets_on_is_first(discrete):
    agent = make_agent(MuDreamer(), discrete, action_dim=4)
    n = 3
    obs = {"image": torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8), "is_first": torch.ones(n, dtype=torch.bool)}
    action, state = agent.act(obs)
    assert action.shape == (n, 4) and state.latent.deter.shape == (n, 512)
    if discrete:
        assert torch.equal(action.sum(-1), torch.ones(n)) and set(action.unique().tolist()) <= {0.0, 1.0}
    else:
        assert action.abs().max() <= 1.0
    assert agent.training, "act must restore training mode"
    # Greedy actions are a deterministic function of (obs, state) up to the sampled latent:
    # with is_first set everywhere the previous state is irrelevant.
    obs2 = dict(obs, is_first=torch.ones(n, dtype=torch.bool))
    torch.manual_seed(1)
    a1, s1 = agent.act(obs2, state, mode="greedy")
    torch.manual_seed(1)
    a2, s2 = agent.act(obs2, None, mode="greedy")
    assert torch.equal(a1, a2) and torch.equal(s1.latent.deter, s2.latent.deter)
    with pytest.raises(ValueError, match="mode"):
        agent.act(obs, mode="best")


def test_state_dict_holds_everything_a_resumed_run_needs(monkeypatch):
    shapes = {"image": (16, 16, 3)}  # an image, so that MuDreamer's encoder has BatchNorm statistics
    agent = tiny_agent(monkeypatch, MuDreamer(), shapes=shapes, optimizer=OptimizerConfig(lr=1e-3, warmup=10))
    keys = set(agent.state_dict())
    assert {"actor_critic.retnorm.low", "actor_critic.retnorm.high"} <= keys
    assert any(k.startswith("actor_critic.slow_critic.") for k in keys)
    assert any(k.startswith("world_model.objective.teacher.") for k in keys)
    assert any(k.endswith("running_mean") for k in keys)
    # Real updates change the normaliser, the slow critic, the teacher and the BatchNorm statistics;
    # a fresh agent loading the state computes the same losses. Two updates: the zero-initialised
    # reward head imagines returns of exactly 0 in the first.
    fit = trainer(2)
    fit.fit(agent, DataLoader(RepeatBatch(tiny_batch(shapes)), batch_size=None))
    assert agent.actor_critic.retnorm.high != 0
    clone = tiny_agent(monkeypatch, MuDreamer(), shapes=shapes)
    changed = [k for k, v in clone.state_dict().items() if not torch.equal(v, agent.state_dict()[k])]
    for prefix in ("actor_critic.retnorm.", "actor_critic.slow_critic.", "world_model.objective.teacher."):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert any(k.endswith("running_mean") for k in changed)
    clone.load_state_dict(agent.state_dict())
    agent.eval(), clone.eval()
    batch = tiny_batch(shapes, seed=1)
    torch.manual_seed(3)
    a, _, _ = agent.losses(batch)
    torch.manual_seed(3)
    b, _, _ = clone.losses(batch)
    assert torch.allclose(a, b)
    restored = clone.configure_optimizers()
    restored.load_state_dict(fit.optimizers[0].state_dict())
    assert restored.param_groups[0]["updates"] == 2


def test_hparams_are_plain_data():
    agent = make_agent(MuDreamer(value_head=False))
    hp = dict(agent.hparams)
    assert hp["objective"] == {
        "class_path": "wm.objectives.mudreamer.MuDreamer",
        "init_args": dict(
            value_head=False, action_head=True, batchnorm="both", value_scale=1.0, action_scale=1.0,
            head_layers=3, teacher_rate=0.02, lam=0.95, kl_dyn=0.95, kl_rep=0.05, augment=False, probe_decoder=False,
        ),
    }
    assert hp["size"] == "size1M" and hp["optimizer"]["lr"] == 4e-5


def test_size12M_parameter_counts_match_reference():
    """docs/algorithm.md §1 reference counts (R2-Dreamer, 64x64x3 image, 6-dim action), within 2%."""
    reference = {"rssm": 5.98e6, "encoder": 0.22e6, "reward": 0.72e6, "continue": 0.66e6, "projector": 2.62e6,
                 "actor": 0.79e6, "critic": 0.85e6}
    counts = Agent(IMAGE, 6, objective=Barlow(), size="size12M").parameter_counts()
    for name, expected in reference.items():
        assert abs(counts[name] - expected) / expected < 0.02, (name, counts[name])
    assert abs(sum(counts.values()) - 11.84e6) / 11.84e6 < 0.02
    decoder = Agent(IMAGE, 6, objective=Reconstruction(), size="size12M").parameter_counts()["decoder"]
    assert abs(decoder - 1.27e6) / 1.27e6 < 0.02


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown model size 'size3M'"):
        Agent(IMAGE, 2, size="size3M")
    with pytest.raises(ValueError, match="multiples of 16"):
        Agent({"image": (60, 60, 3)}, 2, size="size1M")
    with pytest.raises(ValueError, match="expected an image"):
        Agent({"grid": (4, 4)}, 2, size="size1M")
    agent = make_agent(Barlow())
    batch = batch_for(agent)
    batch["image"] = batch["image"].permute(0, 1, 4, 2, 3)  # channels first
    with pytest.raises(ValueError, match=r"trailing shape \(3, 64, 64\).*built for \(64, 64, 3\)"):
        agent.losses(batch)
    batch = batch_for(agent)
    del batch["image"]
    with pytest.raises(KeyError, match="missing keys \\['image'\\]"):
        agent.losses(batch)


@pytest.mark.parametrize("name", ["reconstruction", "mudreamer"])
def test_bf16_mixed_updates_are_finite(name):
    """Mixed precision through the Trainer (bf16 autocast works on the CPU too)."""
    agent = make_agent(OBJECTIVES[name](), optimizer=OptimizerConfig(warmup=0))
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[recorder])
    trainer.fit(agent, DataLoader(RepeatBatch(batch_for(agent)), batch_size=None))
    assert len(recorder.world_model) == 3 and all(np.isfinite(recorder.world_model))
    assert all(torch.isfinite(p).all() for p in agent.parameters())

"""The papers' baselines as objectives: InfoNCE and DreamerPro, their math against values computed
here with numpy, what goes into each of their networks, and their place in a world model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_agent import batch_for, make_agent
from wm.objectives import DreamerPro, InfoNCE
from wm.objectives.dreamerpro import cross_entropy, sequence_shift, sinkhorn
from wm.objectives.infonce import info_nce_loss


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------- InfoNCE
def test_info_nce_is_the_cross_entropy_of_each_step_against_its_own_embedding():
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    logits = queries @ keys.T  # raw dot products: the official code has no temperature
    expected = -np.mean(np_log_softmax(logits)[np.arange(12), np.arange(12)])
    got = info_nce_loss(torch.tensor(queries, dtype=torch.float32), torch.tensor(keys, dtype=torch.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    logits = unit(queries) @ unit(keys).T / 0.1
    expected = -np.mean(np_log_softmax(logits)[np.arange(12), np.arange(12)])
    got = info_nce_loss(torch.tensor(queries, dtype=torch.float32), torch.tensor(keys, dtype=torch.float32), 0.1)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_info_nce_projects_the_latent_state_against_the_detached_embedding(monkeypatch):
    """The projector reads s_t of every step (gradient to the RSSM); the keys are the embeddings,
    detached: the encoder learns only through the posterior."""
    import wm.objectives.infonce as infonce

    agent = make_agent(InfoNCE())
    objective, wm = agent.world_model.objective, agent.world_model
    seen, embeds, calls = [], [], []
    objective.projector.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    wm.encoder.register_forward_hook(lambda m, args, out: embeds.append(out))
    monkeypatch.setattr(infonce, "info_nce_loss", lambda q, k, t=None: calls.append((q, k, t)) or info_nce_loss(q, k, t))
    out = wm.loss(batch_for(agent))
    feat = out.posterior.feat
    (x,), (embed,), ((queries, keys, temperature),) = seen, embeds, calls
    torch.testing.assert_close(x, feat.reshape(-1, feat.shape[-1]), rtol=0, atol=0)
    assert x.requires_grad and queries.requires_grad
    torch.testing.assert_close(keys, embed.reshape(-1, embed.shape[-1]), rtol=0, atol=0)
    assert not keys.requires_grad and temperature is None
    torch.testing.assert_close(out.terms["infonce"], info_nce_loss(objective.projector(x), keys))
    assert objective.scales == {"infonce": 1.0} and not objective.augment


# ----------------------------------------------------------------------------------- DreamerPro
def np_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    q = np.exp(scores / epsilon).T
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * n
    return (q * n).T


def test_sinkhorn_spreads_the_samples_evenly_over_the_prototypes():
    rng = np.random.default_rng(1)
    scores = np.tanh(rng.normal(size=(40, 7)))  # cosines
    q = sinkhorn(torch.tensor(scores, dtype=torch.float32), epsilon=0.05, iterations=3).double().numpy()
    np.testing.assert_allclose(q, np_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q.sum(1), np.ones(40), rtol=1e-5)  # each sample's assignments sum to 1
    # the last step normalised the samples; the prototypes' shares (N / K each) hold after more iterations
    many = sinkhorn(torch.tensor(scores, dtype=torch.float32), 0.05, 200).double().numpy()
    np.testing.assert_allclose(many.sum(0), np.full(7, 40 / 7), rtol=1e-3)


def test_swapped_temporal_and_norm_losses_against_numpy():
    """A DreamerPro world model's losses recomputed here from the tensors its networks saw."""
    agent = make_agent(DreamerPro(num_prototypes=50, dim=8))
    objective, wm = agent.world_model.objective, agent.world_model
    captured = {}
    objective.obs_proj.register_forward_hook(lambda m, args, out: captured.update(obs=out))
    objective.feat_proj.register_forward_hook(lambda m, args, out: captured.update(feat=out))
    objective.target_obs_proj.register_forward_hook(lambda m, args, out: captured.update(target=out))
    out = wm.loss(batch_for(agent, batch=3, length=6))
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    prototypes = unit(objective.prototypes.weight.detach().double().numpy())
    obs, feat, target = (captured[k].detach().double().numpy() for k in ("obs", "feat", "target"))
    assert obs.shape == (6, 5, 8), "2 views x 3 sequences, the first of 6 steps left out"
    obs_logits, feat_logits = unit(obs) @ prototypes.T / 0.1, unit(feat) @ prototypes.T / 0.1
    scores = unit(target) @ prototypes.T
    q = [np_sinkhorn(scores[v * 3:(v + 1) * 3].reshape(-1, 50), 0.05, 3) for v in range(2)]
    o = [obs_logits[v * 3:(v + 1) * 3].reshape(-1, 50) for v in range(2)]
    f = [feat_logits[v * 3:(v + 1) * 3].reshape(-1, 50) for v in range(2)]
    ce = lambda target, logits: -np.mean((target * np_log_softmax(logits)).sum(-1))  # noqa: E731
    swav = 0.5 * (ce(q[1], o[0]) + ce(q[0], o[1]))
    temp = 0.5 * (ce(q[0], f[0]) + ce(q[1], f[1]))
    norm = np.mean((np.linalg.norm(obs, axis=-1) - 1) ** 2) + np.mean((np.linalg.norm(feat, axis=-1) - 1) ** 2)
    assert float(out.terms["swav"]) == pytest.approx(swav, rel=1e-4)
    assert float(out.terms["temp"]) == pytest.approx(temp, rel=1e-4)
    assert float(out.terms["norm"]) == pytest.approx(norm, rel=1e-4)
    assert objective.scales == {"swav": 1.0, "temp": 1.0, "norm": 1.0}


def test_dreamerpro_networks_read_what_the_method_says():
    """obs_proj reads the online embedding of both views (gradient to the encoder), feat_proj the
    latent feature of both (gradient to the RSSM), both from the second step on; the target
    encoder reads the augmented views the online encoder saw, with no gradient."""
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8))
    objective, wm = agent.world_model.objective, agent.world_model
    inputs = {}
    for name in ("obs_proj", "feat_proj", "target_encoder", "target_obs_proj"):
        getattr(objective, name).register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]}))
    seen = []
    wm.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    embeds = []
    wm.encoder.register_forward_hook(lambda m, args, out: embeds.append(out))
    out = wm.loss(batch_for(agent, batch=3, length=6))
    (embed,), (online_input,) = embeds, seen
    assert embed.shape[:2] == (6, 6), "two views of 3 sequences, observed as one batch"
    torch.testing.assert_close(inputs["obs_proj"], embed[:, 1:], rtol=0, atol=0)
    assert inputs["obs_proj"].requires_grad
    assert inputs["feat_proj"].shape == (6, 5, wm.size.feat_dim) and inputs["feat_proj"].requires_grad
    torch.testing.assert_close(inputs["feat_proj"][:3], out.posterior.feat[:, 1:], rtol=0, atol=0)
    assert inputs["target_encoder"] is online_input, "the target network sees exactly the online views"
    assert not inputs["target_obs_proj"].requires_grad
    assert out.posterior.deter.shape[0] == 3, "imagination and the replay go on from the first view"


def test_the_ema_target_follows_at_rate_005_only_on_taken_updates():
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8))
    objective = agent.world_model.objective
    with torch.no_grad():
        for p in [*agent.world_model.encoder.parameters(), *objective.obs_proj.parameters()]:
            p.add_(torch.randn_like(p))
    pairs = [*zip(objective.target_encoder.parameters(), agent.world_model.encoder.parameters()),
             *zip(objective.target_obs_proj.parameters(), objective.obs_proj.parameters())]
    before = [(t.detach().clone(), s.detach().clone()) for t, s in pairs]
    objective.after_update(torch.tensor(False))
    assert all(torch.equal(t, old) for (t, _), (old, _) in zip(pairs, before))
    objective.after_update(torch.tensor(True))
    for (t, _), (old, online) in zip(pairs, before):
        torch.testing.assert_close(t, 0.95 * old + 0.05 * online)
    assert float(objective.updates) == 1.0, "only taken updates count towards the prototypes' freeze"


def test_the_prototypes_are_frozen_for_the_first_10000_updates():
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8))
    objective, wm = agent.world_model.objective, agent.world_model
    for updates, trains in ((0, False), (9_999, False), (10_000, True)):
        objective.updates.fill_(updates)
        agent.zero_grad(set_to_none=True)
        out = wm.loss(batch_for(agent, batch=3, length=6))
        (out.terms["swav"] + out.terms["temp"]).backward()
        grad = objective.prototypes.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == trains, updates
        assert objective.obs_proj.weight.grad.abs().sum() > 0, "the projections train all along"


def test_each_sequence_is_shifted_once_by_at_most_3_pixels():
    """A bright dot on a dark frame: every step of a sequence moves it by the same vector, of at
    most 3 pixels per axis, and sequences get their own."""
    images = torch.zeros(16, 5, 32, 32, 3, dtype=torch.uint8)
    for t in range(5):
        images[:, t, 10 + t, 12, :] = 255  # the dot moves down one row per step
    shifted = sequence_shift(images, 3.0, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.float32 and shifted.shape == images.shape
    rows, cols = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
    mass = shifted[..., 0]
    centre_row = (mass * rows).sum((-1, -2)) / mass.sum((-1, -2))
    centre_col = (mass * cols).sum((-1, -2)) / mass.sum((-1, -2))
    move_row = centre_row - (10 + torch.arange(5.0))
    move_col = centre_col - 12
    for move in (move_row, move_col):
        assert (move - move[:, :1]).abs().max() < 1e-4, "one shift for all the steps of a sequence"
        assert move.abs().max() <= 3.0 + 1e-4
    assert len({round(float(m), 3) for m in move_col[:, 0]}) > 8, "each sequence its own shift"


def test_both_baselines_fit_in_a_world_model_and_are_named_everywhere():
    from wm.objectives import OBJECTIVES, objective_name
    from wm.sweep import objective_configs

    assert {"infonce", "dreamerpro"} <= set(objective_configs()) and {"infonce", "dreamerpro"} <= set(OBJECTIVES)
    assert objective_name("wm.objectives.DreamerPro") == "dreamerpro" and objective_name("wm.objectives.InfoNCE") == "infonce"
    for objective in (InfoNCE(), DreamerPro(num_prototypes=20, dim=8)):
        agent = make_agent(objective, discrete=True)
        total, metrics, posterior = agent.losses(batch_for(agent))
        total.backward()
        missing = [n for n, p in agent.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing and posterior.deter.shape[0] == 4
        assert isinstance(agent.world_model.objective, nn.Module)
    assert cross_entropy(torch.eye(3), torch.eye(3) * 50).item() < 1e-6


@pytest.mark.slow  # a fit each
@pytest.mark.parametrize("name", ["infonce", "dreamerpro"])
def test_a_short_real_fit_of_each_baseline_on_toy_catch(name, tmp_path):
    from mlflow import MlflowClient

    from tests.test_training import TINY
    from wm.cli import main

    config = str(Path(__file__).resolve().parents[1] / f"configs/objective/{name}.yaml")
    main(["fit", *TINY, "--config", config, "--run.root", str(tmp_path), "--env.total_steps", "30"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.objective.class_path"].lower().endswith(name)
    terms = {"infonce": ["infonce"], "dreamerpro": ["swav", "temp", "norm"]}[name]
    for term in terms:
        assert np.isfinite(client.get_metric_history(run.info.run_id, f"train/world_model/{term}")[-1].value), term

"""The papers' baselines as objectives: InfoNCE and DreamerPro, their math against values computed
here with numpy, what goes into each of their networks, and their place in a world model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.test_agent import batch_for, make_agent
from wm.bench.update import RepeatBatch
from wm.objectives import DreamerPro, InfoNCE
from wm.model.augment import sequence_shift
from wm.objectives.dreamerpro import cross_entropy, sinkhorn
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
    prototypes = unit(objective.prototypes.detach().double().numpy())
    obs, feat, target = (captured[k].detach().double().numpy() for k in ("obs", "feat", "target"))
    assert obs.shape == feat.shape == (6, 6, 8), "2 views x 3 sequences, every step"
    assert target.shape == (6, 5, 8), "the targets leave the first of 6 steps out"
    obs_logits, feat_logits = unit(obs[:, 1:]) @ prototypes.T / 0.1, unit(feat[:, 1:]) @ prototypes.T / 0.1
    scores = unit(target) @ prototypes.T
    q = [np_sinkhorn(scores[v * 3:(v + 1) * 3].reshape(-1, 50), 0.05, 3) for v in range(2)]
    o = [obs_logits[v * 3:(v + 1) * 3].reshape(-1, 50) for v in range(2)]
    f = [feat_logits[v * 3:(v + 1) * 3].reshape(-1, 50) for v in range(2)]
    ce = lambda target, logits: -np.mean((target * np_log_softmax(logits)).sum(-1))  # noqa: E731
    swav = 0.5 * (ce(q[1], o[0]) + ce(q[0], o[1]))
    temp = 0.5 * (ce(q[0], f[0]) + ce(q[1], f[1]))
    # the norm loss covers every step, the first included (the official code's)
    norm = np.mean((np.linalg.norm(obs, axis=-1) - 1) ** 2) + np.mean((np.linalg.norm(feat, axis=-1) - 1) ** 2)
    assert float(out.terms["swav"]) == pytest.approx(swav, rel=1e-4)
    assert float(out.terms["temp"]) == pytest.approx(temp, rel=1e-4)
    assert float(out.terms["norm"]) == pytest.approx(norm, rel=1e-4)
    assert objective.scales == {"swav": 1.0, "temp": 1.0, "norm": 1.0}


def record_encoder(agent) -> tuple[list, list]:
    """The world model's encoder's inputs and outputs, call by call."""
    inputs, outputs = [], []
    agent.world_model.encoder.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    agent.world_model.encoder.register_forward_hook(lambda m, args, out: outputs.append(out))
    return inputs, outputs


def test_the_world_model_trains_on_the_unshifted_batch_and_the_views_feed_only_the_prototypes():
    """The official R2-Dreamer code's structure: a clean pass (the batch as replayed) for the KL,
    reward and continue losses, the imagination starts and the replay context; a second pass over
    the 2B shifted views for the prototype losses alone."""
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8))
    objective, wm = agent.world_model.objective, agent.world_model
    batch = batch_for(agent, batch=3, length=6)
    inputs, outputs = record_encoder(agent)
    heads = {}
    wm.reward.register_forward_pre_hook(lambda m, args: None if "reward" in heads else heads.update(reward=args[0]))
    wm.cont.register_forward_pre_hook(lambda m, args: None if "continue" in heads else heads.update({"continue": args[0]}))
    projected = {}
    for name in ("obs_proj", "feat_proj", "target_encoder"):
        getattr(objective, name).register_forward_pre_hook(lambda m, args, name=name: projected.update({name: args[0]}))
    torch.manual_seed(5)  # the clean pass comes first: the same seed gives its latent samples again below
    out = wm.loss(batch)
    (clean, views), (clean_embed, views_embed) = inputs, outputs
    assert torch.equal(clean["image"], batch["image"]), "the first pass sees the batch unshifted"
    assert views["image"].shape[0] == 6 and not torch.equal(views["image"][:3], batch["image"])
    torch.manual_seed(5)
    expected, _, _ = wm.rssm.observe(clean_embed, batch["action"], batch["is_first"])
    torch.testing.assert_close(out.posterior.feat, expected.feat, rtol=0, atol=0)
    torch.testing.assert_close(heads["reward"], expected.feat, rtol=0, atol=0)
    torch.testing.assert_close(heads["continue"], expected.feat, rtol=0, atol=0)
    torch.testing.assert_close(projected["obs_proj"], views_embed, rtol=0, atol=0)
    assert projected["obs_proj"].requires_grad and projected["feat_proj"].requires_grad
    assert projected["feat_proj"].shape == (6, 6, wm.size.feat_dim)
    assert projected["target_encoder"] is views, "the target network sees exactly the shifted views"
    # The whole update: imagination starts from the clean posterior (B T starts), the replay gets it back.
    torch.manual_seed(5)
    total, _, posterior = agent.losses(batch)
    torch.testing.assert_close(posterior.deter, out.posterior.deter, rtol=0, atol=0)
    total.backward()
    assert objective.prototypes.grad is not None and objective.obs_proj.weight.grad.abs().sum() > 0


def test_train_on_views_trains_every_world_model_loss_on_both_views():
    """DreamerPro's own code: one pass over the two shifted views, every loss on both."""
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8, train_on_views=True))
    batch = batch_for(agent, batch=3, length=6)
    inputs, outputs = record_encoder(agent)
    heads = []
    agent.world_model.reward.register_forward_pre_hook(lambda m, args: heads.append(args[0]))
    out = agent.world_model.loss(batch)
    (seen,), (embed,) = inputs, outputs
    assert seen["image"].shape[0] == 6 and embed.shape[:2] == (6, 6)
    assert heads[0].shape[0] == 6, "the reward loss is taken over both views"
    assert out.posterior.deter.shape[0] == 3, "imagination and the replay go on from the first view"
    assert not torch.equal(seen["image"][:3], batch["image"])


def test_the_ema_target_follows_at_rate_005_only_on_taken_updates():
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8))
    objective = agent.world_model.objective
    with torch.no_grad():
        for p in [*agent.world_model.encoder.parameters(), *objective.obs_proj.parameters()]:
            p.add_(torch.randn_like(p))
        objective.prototypes.mul_(3.0)
    pairs = [*zip(objective.target_encoder.parameters(), agent.world_model.encoder.parameters()),
             *zip(objective.target_obs_proj.parameters(), objective.obs_proj.parameters())]
    before = [(t.detach().clone(), s.detach().clone()) for t, s in pairs]
    prototypes = objective.prototypes.detach().clone()
    objective.after_update(torch.tensor(False))
    assert all(torch.equal(t, old) for (t, _), (old, _) in zip(pairs, before))
    assert torch.equal(objective.prototypes, prototypes), "a skipped update changes nothing"
    objective.after_update(torch.tensor(True))
    for (t, _), (old, online) in zip(pairs, before):
        torch.testing.assert_close(t, 0.95 * old + 0.05 * online)
    assert float(objective.updates) == 1.0, "only taken updates count towards the prototypes' freeze"
    torch.testing.assert_close(objective.prototypes, prototypes / 3.0)


def test_the_prototypes_train_from_the_10000th_update_and_keep_unit_length():
    """Frozen while fewer than 10,000 updates came before the one being made (the official count);
    after an optimiser step past the freeze their rows are moved, and back at unit length."""
    agent = make_agent(DreamerPro(num_prototypes=20, dim=8))
    objective, wm = agent.world_model.objective, agent.world_model
    norms = objective.prototypes.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(20))
    for updates, trains in ((0, False), (9_998, False), (9_999, True)):
        objective.updates.fill_(updates)
        agent.zero_grad(set_to_none=True)
        out = wm.loss(batch_for(agent, batch=3, length=6))
        (out.terms["swav"] + out.terms["temp"]).backward()
        grad = objective.prototypes.grad
        assert (grad is not None and grad.abs().sum() > 0) == trains, updates
        assert objective.obs_proj.weight.grad.abs().sum() > 0, "the projections train all along"
    objective.updates.fill_(10_000)
    before = objective.prototypes.detach().clone()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(agent, DataLoader(RepeatBatch(batch_for(agent, batch=3, length=6)), batch_size=None))
    after = objective.prototypes.detach()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(20), rtol=0, atol=1e-6)


def test_a_shifted_one_pixel_dot_stays_one_pixel_of_the_same_value():
    """Whole-pixel shifts: a dot moves by the same integer vector at every step of its sequence,
    at most 3 pixels per axis, and keeps its value; each sequence gets its own vector."""
    images = torch.zeros(64, 5, 32, 32, 3, dtype=torch.uint8)
    for t in range(5):
        images[:, t, 10 + t, 12, :] = 200  # the dot moves down one row per step
    shifted = sequence_shift(images, 3, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    moves = set()
    for b in range(64):
        where = [(shifted[b, t, ..., 0] > 0).nonzero() for t in range(5)]
        assert all(len(w) == 1 for w in where), "one pixel stays one pixel"
        assert all(int(shifted[b, t, w[0, 0], w[0, 1], 0]) == 200 for t, w in enumerate(where)), "of the same value"
        vectors = {(int(w[0, 0]) - 10 - t, int(w[0, 1]) - 12) for t, w in enumerate(where)}
        assert len(vectors) == 1, "one shift for all the steps of a sequence"
        (move,) = vectors
        assert max(abs(move[0]), abs(move[1])) <= 3
        moves.add(move)
    assert len(moves) > 20, "each sequence its own shift"
    assert {dy for dy, _ in moves} == {dx for _, dx in moves} == set(range(-3, 4))


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
    from wm.run.cli import main

    config = str(Path(__file__).resolve().parents[1] / f"configs/objective/{name}.yaml")
    main(["fit", *TINY, "--config", config, "--run.root", str(tmp_path), "--env.total_steps", "30"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.objective.class_path"].lower().endswith(name)
    terms = {"infonce": ["infonce"], "dreamerpro": ["swav", "temp", "norm"]}[name]
    for term in terms:
        assert np.isfinite(client.get_metric_history(run.info.run_id, f"train/world_model/{term}")[-1].value), term

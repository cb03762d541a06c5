"""The losses of one update against numpy (float64) reimplementations written from the algorithm.

Networks are inputs here, never the subject: the heads' outputs are read (forward hooks) or the
heads are replaced by single linears whose outputs the test computes itself; everything after the
network output (returns, normalisation, weights, log-likelihoods, cross-entropies, KL, scales) is
recomputed in numpy and compared to the library, value and gradient. Models are tiny (a
test-only size preset, vector observations) so the file runs in seconds.
"""

from __future__ import annotations

import importlib
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_math import np_barlow, np_bins, np_kl, np_lambda_return, np_log_softmax, np_softmax, np_two_hot
from wm.agent.actor_critic import ActorCritic, ActorCriticConfig
from wm.agent.agent import Agent
from wm.bench.update import RepeatBatch
from wm.objectives import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    Barlow,
    MuDreamer,
    NoObjective,
    ObjectiveInputs,
    Reconstruction,
    make_objective,
)
from wm.model.optim import OptimizerConfig
from wm.model.rssm import State
from wm.model.sizes import SIZES, ModelSize
from wm.agent.synthetic import random_batch
from wm.agent.world_model import WorldModel, WorldModelConfig

# deter 16, 4 latents of 4 classes, 2 GRU blocks; depth 2 gives 8 decoder channels (8 blocks).
TINY = ModelSize(deter=16, hidden=8, classes=4, depth=2, units=16, stoch=4, blocks=2)
VECTOR = {"vec": (5,)}
UNIMIX = 0.01


def tiny_agent(monkeypatch, objective, shapes=VECTOR, action_dim=2, discrete=False, **kwargs) -> Agent:
    """A whole agent at the test-only size preset `sizeTiny`."""
    monkeypatch.setitem(SIZES, "sizeTiny", TINY)
    torch.manual_seed(0)
    return Agent(shapes, action_dim, discrete=discrete, objective=objective, size="sizeTiny", **kwargs)


def tiny_batch(shapes=VECTOR, action_dim=2, discrete=False, batch=2, length=4, seed=0) -> dict[str, torch.Tensor]:
    """random_batch: is_first at t = 0 and t = length / 2, is_last (and terminal) just before."""
    return random_batch(shapes, action_dim, discrete, batch, length, torch.Generator().manual_seed(seed))


def trainer(max_steps: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                     callbacks=list(callbacks))


class Outputs:
    """Records the outputs of modules (forward hooks); gradients are kept on those that have one."""

    def __init__(self, **modules: torch.nn.Module):
        self.calls: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        for name, module in modules.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.retain_grad()
            self.calls[name].append(output)

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        (output,) = self.calls[name]
        return output


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def np_unimix_log(raw: np.ndarray, unimix: float) -> np.ndarray:
    """log((1 - unimix) softmax(raw) + unimix / K) over the last axis."""
    return np.log((1.0 - unimix) * np_softmax(raw) + unimix / raw.shape[-1])


def np_two_hot_ce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cross-entropy of logits (..., 255) to the two-hot encoding of target (...)."""
    bins = np_bins()
    encoded = np.array([np_two_hot(v, bins) for v in target.ravel()]).reshape(*target.shape, len(bins))
    return -(encoded * np_log_softmax(logits)).sum(-1)


def np_two_hot_decode(logits: np.ndarray) -> np.ndarray:
    return np_softmax(logits) @ np_bins()


def np_policy_terms(raw: np.ndarray, action: np.ndarray, discrete: bool, unimix: float = UNIMIX):
    """log pi(a) and entropy, (...): categorical with unimix over one-hot actions, or the normal
    with mean tanh(mu) and std 0.9 sigmoid(x + 2) + 0.1 (dims independent)."""
    if discrete:
        logp = np_unimix_log(raw, unimix)
        return (action * logp).sum(-1), -(np.exp(logp) * logp).sum(-1)
    mu, x = np.split(raw, 2, -1)
    mean, std = np.tanh(mu), 0.9 / (1.0 + np.exp(-(x + 2.0))) + 0.1
    logp = -0.5 * ((action - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.sum(-1), (0.5 + 0.5 * math.log(2 * math.pi) + np.log(std)).sum(-1)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f at x (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


def linear(in_dim: int, out_dim: int, seed: int, bias: torch.Tensor | None = None) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_dim, in_dim, generator=g) * 0.3)
        layer.bias.copy_(torch.randn(out_dim, generator=g) * 0.3 if bias is None else bias)
    return layer


def centred_bias(seed: int) -> torch.Tensor:
    """Two-hot logits peaked a few bins from the centre: values of a few units, not 1e8."""
    g = torch.Generator().manual_seed(seed)
    centre = 127 + float(torch.randint(-6, 7, (), generator=g))
    return -0.5 * ((torch.arange(255.0) - centre) / 4.0) ** 2


# ----------------------------------------------------------------------------- actor-critic

N, H, F, A = 2, 3, 5, 3  # imagined trajectories, horizon, feature width, action dims


def actor_critic(discrete: bool, config: ActorCriticConfig) -> ActorCritic:
    """An ActorCritic whose actor, critic and slow critic are single linears (outputs computable
    in the test), the slow critic different from the critic."""
    ac = ActorCritic(F, A, discrete, TINY, config)
    ac.actor = linear(F, A if discrete else 2 * A, seed=1)
    ac.critic = linear(F, 255, seed=2, bias=centred_bias(2))
    ac.slow_critic = linear(F, 255, seed=3, bias=centred_bias(3)).requires_grad_(False)
    return ac


def imagined(discrete: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(N, H + 1, F, generator=g)
    if discrete:
        action = torch.nn.functional.one_hot(torch.randint(0, A, (N, H), generator=g), A).float()
    else:
        action = torch.rand(N, H, A, generator=g) * 2 - 1
    reward = torch.randn(N, H + 1, generator=g) * 3
    cont = 0.5 + 0.5 * torch.rand(N, H + 1, generator=g)
    return feat, action, reward, cont


def np_imagination(ac: ActorCritic, feat, action, reward, cont, discrete: bool, low: float, high: float) -> dict:
    """The actor-critic losses of an imagined rollout, from the algorithm:

    V = critic(s) decoded; R = lambda-returns bootstrapped from V; S = max(1, EMA of P95 - P5 of R,
    updated with these returns); adv = (R - V) / S; w_t = prod_{k <= t} c_k;
    policy = -mean(w (log pi(a) sg(adv) + eta H)); critic = mean(w (CE(R) + reg CE(V_slow))).
    """
    cfg = ac.config
    f, a, r, c = (np64(x) for x in (feat, action, reward, cont))
    heads = (ac.actor, ac.critic, ac.slow_critic)
    wa, ba, wc, bc, ws, bs = (np64(p) for head in heads for p in head.parameters())
    value = np_two_hot_decode(f @ wc.T + bc)
    ret = np_lambda_return(r, c, value, cfg.lam)
    p5, p95 = np.percentile(ret, [5, 95])
    low, high = (1 - cfg.retnorm_rate) * low + cfg.retnorm_rate * p5, (1 - cfg.retnorm_rate) * high + cfg.retnorm_rate * p95
    scale = max(cfg.retnorm_limit, high - low)
    adv = (ret - value[:, :-1]) / scale
    weight = np.cumprod(c, 1)[:, :-1]

    def policy(raw):
        logp, entropy = np_policy_terms(raw, a, discrete, cfg.policy_unimix)
        return -(weight * (logp * adv + cfg.entropy * entropy)).mean()

    def critic(logits):
        slow = np_two_hot_decode(f[:, :-1] @ ws.T + bs)
        return (weight * (np_two_hot_ce(logits, ret) + cfg.slow_reg * np_two_hot_ce(logits, slow))).mean()

    raw, logits = f[:, :-1] @ wa.T + ba, f[:, :-1] @ wc.T + bc
    return dict(ret=ret, low=low, high=high, scale=scale, raw=raw, logits=logits, policy=policy(raw), critic=critic(logits),
                policy_grad=numeric_grad(policy, raw), critic_grad=numeric_grad(critic, logits))


def test_actor_critic_defaults_are_the_reference_values():
    cfg = ActorCriticConfig()
    assert (cfg.horizon, cfg.lam, cfg.entropy, cfg.slow_rate, cfg.slow_reg) == (15, 0.95, 3e-4, 0.02, 1.0)
    assert (cfg.retnorm_rate, cfg.retnorm_limit, cfg.policy_unimix) == (0.01, 1.0, UNIMIX)


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("stored", [(-3.0, 5.0), (0.0, 0.0)], ids=["scale>1", "scale=limit"])
def test_imagination_loss_vs_numpy(discrete, stored):
    """Actor: REINFORCE with sg((R - V) / max(1, S)), entropy bonus, continuation weights; critic:
    two-hot CE to R plus the slow-critic regulariser; both values and their gradients w.r.t. the
    policy's and critic's outputs. An entropy scale far above 3e-4 makes that term's sign visible."""
    config = ActorCriticConfig(entropy=0.2, slow_reg=0.7)
    ac = actor_critic(discrete, config)
    ac.retnorm.low.fill_(stored[0])
    ac.retnorm.high.fill_(stored[1])
    feat, action, reward, cont = imagined(discrete)
    outputs = Outputs(actor=ac.actor, critic=ac.critic)
    losses, ret = ac.imagination_loss(feat, action, reward, cont)
    expected = np_imagination(ac, feat, action, reward, cont, discrete, *stored)

    np.testing.assert_allclose(np64(ret), expected["ret"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses["return_low"].item(), expected["low"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses["return_high"].item(), expected["high"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses["return_scale"].item(), expected["scale"], rtol=1e-5)
    assert (expected["scale"] > 5.0) if stored[1] else (expected["scale"] == 1.0)
    np.testing.assert_allclose(np64(outputs["actor"]), expected["raw"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses["policy"].item(), expected["policy"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses["critic"].item(), expected["critic"], rtol=1e-5, atol=1e-6)

    (losses["policy"] + losses["critic"]).backward()
    np.testing.assert_allclose(np64(outputs["actor"].grad), expected["policy_grad"], rtol=1e-4, atol=1e-7)
    critic_out = next(o for o in outputs.calls["critic"] if o.requires_grad)  # the value call is no-grad
    np.testing.assert_allclose(np64(critic_out.grad), expected["critic_grad"], rtol=1e-4, atol=1e-8)
    # Computing the losses changes no state: the training step stores the advanced normaliser.
    assert (ac.retnorm.low.item(), ac.retnorm.high.item()) == stored


def test_imagination_loss_stop_gradients():
    """The advantage and the critic's targets are constants: the policy loss gives the critic no
    gradient, the critic loss gives the actor none, the slow critic is never trained."""
    ac = actor_critic(False, ActorCriticConfig())
    losses, _ = ac.imagination_loss(*imagined(False))
    grads = torch.autograd.grad(losses["policy"], list(ac.critic.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(losses["critic"], list(ac.actor.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    assert not any(p.requires_grad for p in ac.slow_critic.parameters())


def test_replay_value_loss_vs_numpy():
    """Critic on a real (B, T) sequence: lambda-returns of real rewards and continues, bootstrapped
    from the given (imagined) returns, cut at is_last and not trained at the is_last step itself;
    plus the slow-critic regulariser. Its gradient reaches the features (the world model)."""
    config = ActorCriticConfig(slow_reg=0.7)
    ac = actor_critic(False, config)
    g = torch.Generator().manual_seed(4)
    b, t = 2, 6
    feat = torch.randn(b, t, F, generator=g, requires_grad=True)
    reward, boot = torch.randn(b, t, generator=g) * 3, torch.randn(b, t, generator=g) * 2
    last = torch.zeros(b, t, dtype=torch.bool)
    last[0, 2] = last[1, 4] = True
    cont = 0.997 * (1.0 - last.float())
    cont[1, 4] = 0.997  # a truncation: last but not terminal
    loss = ac.replay_value_loss(feat, reward, cont, last, boot)

    f, (wc, bc), (ws, bs) = np64(feat), map(np64, ac.critic.parameters()), map(np64, ac.slow_critic.parameters())
    ret = np_lambda_return(np64(reward), np64(cont), np64(boot), 0.95, last.numpy())
    logits = f[:, :-1] @ wc.T + bc
    slow = np_two_hot_decode(f[:, :-1] @ ws.T + bs)
    weight = 1.0 - last.numpy()[:, :-1]
    expected = (weight * (np_two_hot_ce(logits, ret) + 0.7 * np_two_hot_ce(logits, slow))).mean()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5, atol=1e-6)
    # the return of a step just before a cut is r + c * boot of the last step, nothing after it
    np.testing.assert_allclose(ret[0, 1], np64(reward)[0, 2] + 0.0 * np64(boot)[0, 2])
    np.testing.assert_allclose(ret[1, 3], np64(reward)[1, 4] + 0.997 * np64(boot)[1, 4])
    loss.backward()
    assert feat.grad[:, :-1].abs().sum() > 0 and feat.grad[:, -1].abs().sum() == 0
    assert feat.grad[0, 2].abs().sum() == 0  # the is_last step takes no loss


def test_agent_losses_wire_the_terms_together(monkeypatch):
    """Agent.losses: repval gets the real rewards, the continue targets, is_last and the imagined
    return of each posterior start as its bootstrap; the total is wm + policy + critic + 0.3 repval;
    and computing the losses leaves the return normaliser alone."""
    agent = tiny_agent(monkeypatch, Barlow())
    ac = agent.actor_critic
    ac.retnorm.low.fill_(-2.0)
    ac.retnorm.high.fill_(4.0)
    seen = {}
    imagination_loss, replay_value_loss = ac.imagination_loss, ac.replay_value_loss

    def spy_imagination(*args):
        losses, ret = imagination_loss(*args)
        seen["ret"] = ret
        return losses, ret

    def spy_replay(feat, reward, cont, last, boot):
        seen.update(reward=reward, cont=cont, last=last, boot=boot)
        return replay_value_loss(feat, reward, cont, last, boot)

    monkeypatch.setattr(ac, "imagination_loss", spy_imagination)
    monkeypatch.setattr(ac, "replay_value_loss", spy_replay)
    batch = tiny_batch()
    batch["is_terminal"][1] = False  # row 1's is_last is a truncation
    total, metrics, _ = agent.losses(batch)
    b, t = batch["reward"].shape
    assert seen["ret"].shape == (b * t, 15)
    assert torch.equal(seen["boot"], seen["ret"][:, 0].reshape(b, t))
    assert torch.equal(seen["reward"], batch["reward"]) and torch.equal(seen["last"], batch["is_last"])
    np.testing.assert_allclose(np64(seen["cont"]), (1 - 1 / 333) * (1 - batch["is_terminal"].double().numpy()), rtol=1e-6)
    wm, policy, critic, repval = (metrics[k].item() for k in ("world_model/loss", "actor_critic/policy",
                                                              "actor_critic/critic", "actor_critic/repval"))
    np.testing.assert_allclose(total.item(), wm + policy + critic + 0.3 * repval, rtol=1e-5, atol=1e-6)
    assert (ac.retnorm.low.item(), ac.retnorm.high.item()) == (-2.0, 4.0)


# ----------------------------------------------------------------------------- world model


def world_model(objective, config: WorldModelConfig | None = None, shapes=VECTOR, discrete=False) -> WorldModel:
    """A tiny world model whose prior and posterior are sharp enough for KLs around the free bits."""
    torch.manual_seed(0)
    wm = WorldModel(shapes, 2, discrete, TINY, objective, config)
    with torch.no_grad():
        wm.rssm.prior[-1].weight.mul_(3.0)
        wm.rssm.post_out[-1].weight.mul_(3.0)
    return wm


@pytest.mark.parametrize(
    "config",
    [WorldModelConfig(), WorldModelConfig(kl_dyn=0.8, kl_rep=0.3, pred_scale=0.6, discount_horizon=100.0, free_nats=1.5)],
    ids=["defaults", "custom"],
)
def test_world_model_loss_is_the_weighted_sum_of_its_parts(config):
    """total = kl_dyn mean max(free, KL[sg q || p]) + kl_rep mean max(free, KL[q || sg p])
    + pred (CE_reward + BCE_continue) + scale_BT L_BT, with the continue target (1 - 1/H)(1 - terminal).

    dyn and rep have equal values, so their weights are told apart by the gradient: the prior's
    logits learn from dyn only (kl_dyn); the total value then pins kl_rep."""
    wm = world_model(Barlow(), config)
    out_of = Outputs(prior=wm.rssm.prior, post=wm.rssm.post_out, reward=wm.reward, cont=wm.cont,
                     embed=wm.encoder, projector=wm.objective.projector)
    batch = tiny_batch()
    batch["is_terminal"][1] = False  # one truncation, one terminal
    out = wm.loss(batch)
    b, t = batch["reward"].shape
    c = config

    target = (1 - 1 / c.discount_horizon) * (1 - batch["is_terminal"].double().numpy())
    np.testing.assert_allclose(np64(out.cont), target, rtol=1e-6)
    post = np_unimix_log(np.stack([np64(x) for x in out_of.calls["post"]], 1).reshape(b * t, 4, 4), c.unimix)
    prior_raw = np64(out_of["prior"])

    def kl(raw):
        return np_kl(post, np_unimix_log(raw.reshape(b * t, 4, 4), c.unimix))

    kls = kl(prior_raw)
    assert (kls < c.free_nats).any() and (kls > c.free_nats).any(), kls  # both sides of the free bits
    dyn = rep = np.maximum(c.free_nats, kls).mean()
    reward = np_two_hot_ce(np64(out_of["reward"]), np64(batch["reward"])).mean()
    logit = np64(out_of["cont"])[..., 0]
    bce = (np.logaddexp(0, logit) - target * logit).mean()
    barlow = np_barlow(np64(out_of["projector"]), np64(out_of["embed"]).reshape(b * t, -1), 5e-4)
    for name, value in dict(dyn=dyn, rep=rep, reward=reward, barlow=barlow).items():
        np.testing.assert_allclose(out.terms[name].item(), value, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(out.terms["continue"].item(), bce, rtol=1e-5)
    total = c.kl_dyn * dyn + c.kl_rep * rep + c.pred_scale * (reward + bce) + 0.05 * barlow
    np.testing.assert_allclose(out.loss.item(), total, rtol=1e-5)

    out.loss.backward()
    dyn_grad = numeric_grad(lambda raw: c.kl_dyn * np.maximum(c.free_nats, kl(raw)).mean(), prior_raw)
    np.testing.assert_allclose(np64(out_of["prior"].grad), dyn_grad, rtol=1e-3, atol=1e-6)
    cont_grad = c.pred_scale * (1 / (1 + np.exp(-logit)) - target) / (b * t)
    np.testing.assert_allclose(np64(out_of["cont"].grad)[..., 0], cont_grad, rtol=1e-5, atol=1e-8)
    bins = np_bins()
    two_hot = np.array([np_two_hot(v, bins) for v in np64(batch["reward"]).ravel()]).reshape(b, t, -1)
    reward_grad = c.pred_scale * (np_softmax(np64(out_of["reward"])) - two_hot) / (b * t)
    np.testing.assert_allclose(np64(out_of["reward"].grad), reward_grad, rtol=1e-4, atol=1e-8)


def test_reconstruction_is_squared_error_summed_over_pixels():
    """Images: sum over H, W, C of (decoded - img / 255)^2; vectors: sum over dims of
    (decoded - symlog(x))^2; both averaged over (B, T) and scaled by the objective's scale."""
    shapes = {"image": (16, 16, 3), "vec": (3,)}
    wm = world_model(Reconstruction(scale=2.0), shapes=shapes)
    objective = wm.objective
    assert objective.scales == {"recon_image": 2.0, "recon_vec": 2.0}
    batch = tiny_batch(shapes)
    g = torch.Generator().manual_seed(5)
    stoch = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 4, 4), generator=g), 4).float()
    post = State(torch.randn(2, 4, 16, generator=g), stoch)
    zeros = torch.zeros(2, 4)
    inputs = ObjectiveInputs(batch, torch.zeros(2, 4, 1), post, post.feat, batch["action"], zeros, zeros,
                             batch["is_first"], batch["is_last"])
    decoded = objective.decoder(post.deter, post.stoch.flatten(-2))
    terms = objective(inputs)
    image = ((np64(decoded["image"]) - batch["image"].double().numpy() / 255.0) ** 2).sum((-3, -2, -1)).mean()
    x = batch["vec"].double().numpy()
    vec = ((np64(decoded["vec"]) - np.sign(x) * np.log1p(np.abs(x))) ** 2).sum(-1).mean()
    np.testing.assert_allclose(terms["recon_image"].item(), image, rtol=1e-5)
    np.testing.assert_allclose(terms["recon_vec"].item(), vec, rtol=1e-5)
    assert decoded["image"].shape == (2, 4, 16, 16, 3) and 0 < decoded["image"].min() < decoded["image"].max() < 1
    out = wm.loss(batch)
    core = wm.kl_dyn * out.terms["dyn"] + wm.kl_rep * out.terms["rep"] + out.terms["reward"] + out.terms["continue"]
    torch.testing.assert_close(out.loss, core + 2.0 * (out.terms["recon_image"] + out.terms["recon_vec"]))


# ----------------------------------------------------------------------------- MuDreamer


@pytest.mark.parametrize("discrete", [False, True])
def test_mudreamer_terms_vs_numpy(monkeypatch, discrete):
    """value: two-hot CE of the value head to lambda-returns of the real rewards and continue
    targets, bootstrapped from the EMA teacher, cut at is_last (no loss at the is_last step);
    action: NLL of a_{t-1} under the policy's family and unimix, averaged over steps that are not
    is_first. The teacher follows the value head at rate 0.02."""
    agent = tiny_agent(monkeypatch, MuDreamer(), discrete=discrete, actor_critic=ActorCriticConfig(policy_unimix=0.05))
    wm = agent.world_model
    objective = wm.objective
    assert objective.teacher_rate == 0.02 and objective.policy_unimix == 0.05
    with torch.no_grad():  # a value head and a teacher that differ, away from their zero init
        objective.value.out.bias.copy_(centred_bias(4))
        objective.value.out.weight.normal_(0.0, 0.05)
        objective.teacher.out.bias.copy_(centred_bias(5))
    out_of = Outputs(value=objective.value, teacher=objective.teacher, inverse=objective.inverse)
    batch = tiny_batch(discrete=discrete, length=6)
    batch["reward"] = batch["reward"] * 5
    batch["is_terminal"][1] = False  # row 1's is_last is a truncation: only the cut stops its return
    torch.manual_seed(0)
    out = wm.loss(batch)

    reward, last = np64(batch["reward"]), batch["is_last"].numpy()
    cont = (1 - 1 / 333) * (1 - batch["is_terminal"].double().numpy())
    boot = np_two_hot_decode(np64(out_of["teacher"]))
    ret = np_lambda_return(reward, cont, boot, 0.95, last)
    value = ((1 - last[:, :-1]) * np_two_hot_ce(np64(out_of["value"]), ret)).mean()
    np.testing.assert_allclose(out.terms["value"].item(), value, rtol=1e-5)
    logp, _ = np_policy_terms(np64(out_of["inverse"]), np64(batch["action"]), discrete, unimix=0.05)
    valid = 1.0 - batch["is_first"].numpy()
    np.testing.assert_allclose(out.terms["action"].item(), -(valid * logp).sum() / valid.sum(), rtol=1e-5)
    # actions at is_first steps (none led there) do not count
    batch["action"][batch["is_first"]] = 1.0 if discrete else 0.9
    torch.manual_seed(0)
    again = wm.loss(batch).terms["action"]
    np.testing.assert_allclose(again.item(), out.terms["action"].item(), rtol=1e-6)

    teacher = [np64(p) for p in objective.teacher.parameters()]
    head = [np64(p) for p in objective.value.parameters()]
    objective.after_update(torch.tensor(True))
    for before, source, after in zip(teacher, head, objective.teacher.parameters()):
        np.testing.assert_allclose(np64(after), 0.98 * before + 0.02 * source, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- replay context


def test_replay_context_sets_the_state_before_t0_but_not_after_is_first(monkeypatch):
    """A sequence that does not start an episode starts from the stored latent (batch deter /
    stoch); one that starts an episode, and every step after an is_first, ignores it."""
    agent = tiny_agent(monkeypatch, NoObjective())
    batch = tiny_batch(length=5)  # is_first at t = 0 and t = 2
    batch["is_first"][0, 0] = False  # row 0 continues an episode
    g = torch.Generator().manual_seed(6)
    context = dict(batch, deter=torch.randn(2, 16, generator=g),
                   stoch=torch.nn.functional.one_hot(torch.randint(0, 4, (2, 4), generator=g), 4).float())
    torch.manual_seed(1)
    _, _, plain = agent.losses(batch)
    torch.manual_seed(1)
    _, _, stored = agent.losses(context)
    assert not torch.allclose(plain.deter[0, 0], stored.deter[0, 0])
    assert not torch.allclose(plain.deter[0, 1], stored.deter[0, 1])
    assert torch.equal(plain.deter[1, :2], stored.deter[1, :2])  # row 1 starts an episode at t = 0
    assert torch.equal(plain.deter[:, 2:], stored.deter[:, 2:]) and torch.equal(plain.stoch[:, 2:], stored.stoch[:, 2:])


# ----------------------------------------------------------------------------- acting, describe


@pytest.mark.parametrize("discrete", [False, True])
def test_greedy_act_is_the_policy_mode(monkeypatch, discrete):
    agent = tiny_agent(monkeypatch, NoObjective(), action_dim=3, discrete=discrete)
    with torch.no_grad():
        agent.actor_critic.actor.out.weight.mul_(300.0)  # away from the 0.01 output scale
    obs = {"vec": torch.randn(4, 5), "is_first": torch.ones(4, dtype=torch.bool)}
    action, state = agent.act(obs, mode="greedy")
    raw = np64(agent.actor_critic.actor(state.latent.feat))
    if discrete:
        expected = np.eye(3)[raw.argmax(-1)]
    else:
        expected = np.tanh(raw[:, :3])
        assert np.abs(expected).max() > 0.3
    np.testing.assert_allclose(np64(action), expected, rtol=1e-6, atol=1e-7)


def test_act_uses_batchnorm_running_statistics_without_toggling_the_agent(monkeypatch):
    """MuDreamer's BatchNorm acts with its running statistics, as in eval mode, while the agent
    stays in training mode and no module's train()/eval() is called."""
    shapes = {"image": (16, 16, 3)}
    agent = tiny_agent(monkeypatch, MuDreamer(), shapes=shapes)
    batchnorm = next(m for m in agent.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        batchnorm.running_mean.uniform_(-1, 1)
        batchnorm.running_var.uniform_(0.5, 2)
    obs = {"image": torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8), "is_first": torch.ones(3, dtype=torch.bool)}
    with torch.no_grad():
        train_embed = agent.world_model.encoder({"image": obs["image"]})  # (updates the running statistics)
        eval_embed = agent.world_model.encoder.eval()({"image": obs["image"]})
        agent.train()
    assert not torch.allclose(eval_embed, train_embed), "the statistics must matter for the test to mean anything"
    seen = []
    agent.world_model.encoder.register_forward_hook(lambda module, inputs, output: seen.append(output))

    def refuse(self, mode=True):
        raise AssertionError("act toggled train/eval")

    monkeypatch.setattr(torch.nn.Module, "train", refuse)
    agent.act(obs, mode="greedy")
    assert agent.training and batchnorm.training
    torch.testing.assert_close(seen[0], eval_embed)


@pytest.mark.parametrize(
    "objective",
    [Barlow(scale=0.1, off_diagonal=1e-3, augment=True), Reconstruction(scale=3.0), NoObjective(augment=True),
     MuDreamer(value_head=False, batchnorm=False, value_scale=0.5, teacher_rate=0.1, kl_dyn=0.9, kl_rep=0.1)],
    ids=lambda o: type(o).__name__,
)
def test_objective_describe_rebuilds_an_equal_objective(objective):
    description = objective.describe()
    module, name = description["class_path"].rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**description["init_args"])
    assert type(rebuilt) is type(objective) and rebuilt.describe() == description
    defaults = type(objective)().describe()["init_args"]
    assert any(description["init_args"][k] != v for k, v in defaults.items()), "the case exercises no argument"


def test_default_objective_is_one_constant(monkeypatch):
    assert OBJECTIVES[DEFAULT_OBJECTIVE] is Barlow
    agent = tiny_agent(monkeypatch, None)
    assert agent.hparams.objective == make_objective(DEFAULT_OBJECTIVE).describe()


# ----------------------------------------------------------------------------- the training step


class StepRecorder(L.Callback):
    """Per update: the slow networks and their sources before and after, the stored return
    normaliser and the logged learning rate and normaliser EMAs."""

    def __init__(self):
        self.rows: list[dict] = []

    @staticmethod
    def snapshot(agent: Agent) -> dict:
        ac, objective = agent.actor_critic, agent.world_model.objective
        return {
            "slow": [np64(p) for p in ac.slow_critic.parameters()],
            "critic": [np64(p) for p in ac.critic.parameters()],
            "teacher": [np64(p) for p in objective.teacher.parameters()],
            "value": [np64(p) for p in objective.value.parameters()],
            "retnorm": (ac.retnorm.low.item(), ac.retnorm.high.item()),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = self.snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(trainer.callback_metrics[f"train/{k}"])
                   for k in ("optimizer/lr", "actor_critic/return_low", "actor_critic/return_high")}
        self.rows.append({"before": self.before, "after": self.snapshot(pl_module), "metrics": metrics})


def test_training_step_updates_the_slow_networks_and_normaliser_and_logs_its_lr(monkeypatch):
    """Through a real Trainer: after each update slow = 0.98 slow + 0.02 critic (the updated
    critic), the MuDreamer teacher likewise, the return normaliser holds the EMAs that update
    used, and the logged learning rate is the one that update used (warm-up step k: lr k / 10)."""
    agent = tiny_agent(monkeypatch, MuDreamer(), optimizer=OptimizerConfig(lr=1e-2, warmup=10))
    recorder = StepRecorder()
    trainer(3, recorder).fit(agent, DataLoader(RepeatBatch(tiny_batch()), batch_size=None))
    assert len(recorder.rows) == 3
    for step, row in enumerate(recorder.rows, 1):
        before, after = row["before"], row["after"]
        for slow, source in (("slow", "critic"), ("teacher", "value")):
            assert not all(np.array_equal(a, b) for a, b in zip(before[source], after[source])), f"{source} did not train"
            for old, new_source, new in zip(before[slow], after[source], after[slow]):
                np.testing.assert_allclose(new, 0.98 * old + 0.02 * new_source, rtol=1e-5, atol=1e-8, err_msg=slow)
        np.testing.assert_allclose(row["metrics"]["optimizer/lr"], 1e-2 * step / 10, rtol=1e-6)
        logged = (row["metrics"]["actor_critic/return_low"], row["metrics"]["actor_critic/return_high"])
        np.testing.assert_allclose(after["retnorm"], logged, rtol=1e-6)
    # The first update imagines zero rewards and values (zero-initialised heads), the later ones do not.
    assert recorder.rows[-1]["after"]["retnorm"] != recorder.rows[-1]["before"]["retnorm"]

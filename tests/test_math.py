"""Unit tests pinning the math of docs/algorithm.md §1 and §2.

Every expected value is computed independently inside the test (numpy, float64, explicit loops
or closed forms), never by calling the library's own code path a second time.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from wm.model.distributions import (
    TwoHot,
    categorical_kl,
    continue_loss,
    continuous_policy,
    discrete_policy,
    onehot,
    sample_policy,
    symexp_bins,
    unimix_logits,
)
from wm.model.nets import BlockLinear, MaxPool2x2, RMSNorm, Upsample2x, _MaxPool2x2, _repeat_2x, init_fan_in_, symexp, symlog
from wm.objectives.barlow import barlow_twins_loss
from wm.objectives.mudreamer import action_nll
from wm.model.optim import LaProp
from wm.model.ema import ema_update_
from wm.model.returns import ReturnNormalizer, lambda_return, quantiles
from wm.model.rssm import BlockGRU
from wm.model.sizes import model_size
from wm.agent.world_model import kl_losses

TAKEN = torch.tensor(True)  # an update that was taken (not skipped for a non-finite value)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_bins() -> np.ndarray:
    z = np.linspace(-20.0, 20.0, 255)
    return np.sign(z) * np.expm1(np.abs(z))


# ----------------------------------------------------------------------------- symlog / symexp


def test_symlog_matches_numpy_formula():
    x = np.concatenate([-np.logspace(-6, 8, 50), [0.0], np.logspace(-6, 8, 50)])
    got = symlog(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, np.sign(x) * np.log1p(np.abs(x)), rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, np.sign(x) * np.log(1.0 + np.abs(x)), rtol=1e-9, atol=0)
    # identity to first order near zero, odd function
    assert symlog(torch.tensor(0.0)).item() == 0.0
    np.testing.assert_array_equal(got[:50], -got[51:])  # x[:50] == -x[51:]


def test_symexp_matches_numpy_formula_and_inverts_symlog():
    y = np.linspace(-25.0, 25.0, 201)
    got = symexp(torch.tensor(y, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, np.sign(y) * (np.exp(np.abs(y)) - 1.0), rtol=1e-12, atol=1e-15)
    x = torch.tensor(np.concatenate([-np.logspace(-6, 9, 40), [0.0], np.logspace(-6, 9, 40)]))
    np.testing.assert_allclose(symexp(symlog(x)).numpy(), x.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(symlog(symexp(torch.tensor(y))).numpy(), y, rtol=1e-12, atol=1e-15)
    # float32 round trip too
    xf = x.float()
    np.testing.assert_allclose(symexp(symlog(xf)).numpy(), xf.numpy(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- networks


def test_rmsnorm_matches_hand_formula():
    torch.manual_seed(0)
    norm = RMSNorm(7)
    assert norm.eps == 1e-4
    with torch.no_grad():
        norm.scale.copy_(torch.randn(7))
    x = torch.randn(3, 5, 7) * 0.05  # small inputs so that eps matters
    got = norm(x).detach().numpy().astype(np.float64)
    xn = x.numpy().astype(np.float64)
    scale = norm.scale.detach().numpy().astype(np.float64)
    expected = np.empty_like(xn)
    for i in range(3):
        for j in range(5):
            ms = sum(v * v for v in xn[i, j]) / 7.0
            expected[i, j] = xn[i, j] / math.sqrt(ms + 1e-4) * scale
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # scale only: no offset parameter
    assert [n for n, _ in norm.named_parameters()] == ["scale"]
    # bf16 input comes back in bf16
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_init_fan_in_truncated_normal_scale():
    torch.manual_seed(0)
    fan_in = 64
    w = init_fan_in_(torch.empty(400, fan_in), fan_in)
    bound = 2.0 * 1.1368 / math.sqrt(fan_in)
    assert w.abs().max().item() <= bound + 1e-6
    # 1.1368 makes the [-2, 2] truncated normal unit-variance: std = sqrt(1 / fan_in)
    assert abs(w.std().item() * math.sqrt(fan_in) - 1.0) < 0.03
    assert abs(w.mean().item()) < 0.01
    w2 = init_fan_in_(torch.empty(400, fan_in), fan_in, scale=0.01)
    assert abs(w2.std().item() * math.sqrt(fan_in) / 0.01 - 1.0) < 0.03
    assert init_fan_in_(torch.ones(3, 4), 4, scale=0.0).abs().sum().item() == 0.0


def test_block_linear_equals_dense_block_diagonal():
    torch.manual_seed(0)
    in_dim, out_dim, blocks = 12, 8, 4
    layer = BlockLinear(in_dim, out_dim, blocks)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(out_dim))
    x = torch.randn(2, 3, in_dim)
    got = layer(x).detach().numpy().astype(np.float64)
    w = layer.weight.detach().numpy().astype(np.float64)  # (G, in/G, out/G)
    gi, go = in_dim // blocks, out_dim // blocks
    dense = np.zeros((in_dim, out_dim))
    for g in range(blocks):
        dense[g * gi : (g + 1) * gi, g * go : (g + 1) * go] = w[g]
    expected = x.numpy().astype(np.float64) @ dense + layer.bias.detach().numpy().astype(np.float64)
    assert got.shape == (2, 3, out_dim)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # each output block depends only on its input block
    x2 = x.clone()
    x2[..., :gi] += 1.0
    diff = (layer(x2) - layer(x)).detach().abs()
    assert diff[..., go:].max().item() == 0.0
    assert diff[..., :go].max().item() > 0.0
    with pytest.raises(ValueError):
        BlockLinear(10, 8, 4)


def test_the_gru_block_layers_start_with_the_full_width_fan_in():
    """Both official codes take a block layer's fan-in over its full input width: the initial
    weight std is 1.1368 * std(truncated normal on [-2, 2]) / sqrt(in_dim), not / sqrt(in_dim / 8)."""
    # variance of a standard normal truncated to [-a, a]: 1 - 2 a pdf(a) / (cdf(a) - cdf(-a))
    a = 2.0
    pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    truncated_std = math.sqrt(1 - 2 * a * pdf / math.erf(a / math.sqrt(2)))
    assert abs(truncated_std - 0.8796) < 1e-4
    torch.manual_seed(0)
    size = model_size("size12M")
    gru = BlockGRU(size, action_dim=6)
    in_dims = {"hidden": size.deter + 3 * size.hidden * size.blocks, "gates": size.deter}  # 8192, 2048
    for name, layer in {"hidden": gru.hidden[0], "gates": gru.gates}.items():
        assert layer.weight.shape[0] * layer.weight.shape[1] == in_dims[name], name
        expected = 1.1368 * truncated_std / math.sqrt(in_dims[name])
        actual = layer.weight.detach().double().std().item()
        assert abs(actual / expected - 1.0) < 0.01, (name, actual, expected)


# ----------------------------------------------------------------------------- two-hot


def test_symexp_bins_values_and_exact_symmetry():
    bins = symexp_bins(255)
    assert bins.shape == (255,) and bins.dtype == torch.float32
    np.testing.assert_allclose(bins.numpy().astype(np.float64), np_bins(), rtol=1e-6, atol=0)
    assert bins[127].item() == 0.0
    assert torch.equal(bins, -bins.flip(0))  # exactly symmetric
    assert bool((bins[1:] > bins[:-1]).all())


def np_two_hot(x: float, bins: np.ndarray) -> np.ndarray:
    """Hand two-hot: weights on the bracketing bins, linear in raw space."""
    out = np.zeros(len(bins))
    x = min(max(x, bins[0]), bins[-1])
    for k in range(len(bins) - 1):
        if bins[k] <= x <= bins[k + 1]:
            w = (x - bins[k]) / (bins[k + 1] - bins[k])
            out[k] += 1.0 - w
            out[k + 1] += w
            return out
    raise AssertionError("unreachable")


def _round_trip_values() -> np.ndarray:
    pos = np.logspace(-3, 4, 57)
    return np.concatenate([pos, -pos, [0.0, 0.5, -0.5, 3.14159, -271.8]])


def test_two_hot_encode_weights():
    bins = symexp_bins(255)
    two_hot = TwoHot(bins)
    bins64 = bins.numpy().astype(np.float64)
    values = _round_trip_values()
    x = torch.tensor(values, dtype=torch.float32)
    enc = two_hot.encode(x).numpy().astype(np.float64)
    assert enc.shape == (len(values), 255)
    np.testing.assert_allclose(enc.sum(-1), 1.0, rtol=0, atol=1e-6)
    assert (enc >= 0).all()
    for row, v in zip(enc, x.numpy().astype(np.float64)):
        nz = np.flatnonzero(row)
        assert 1 <= len(nz) <= 2
        if len(nz) == 2:
            assert nz[1] == nz[0] + 1
        # the nonzeros sit on the bins that bracket the value
        k = np.searchsorted(bins64, v, side="right") - 1
        assert set(nz) <= {k, k + 1}
        assert bins64[nz[0]] <= v <= bins64[nz[-1]]
        np.testing.assert_allclose(row, np_two_hot(v, bins64), rtol=0, atol=2e-6)
        # weighted sum of bins is the value itself
        np.testing.assert_allclose(row @ bins64, v, rtol=1e-5, atol=1e-7)
    # a value that lies exactly on a bin is one-hot on it
    on_bin = two_hot.encode(bins[[100, 127, 200]])
    assert torch.equal(on_bin, torch.nn.functional.one_hot(torch.tensor([100, 127, 200]), 255).float())
    # values beyond the range are clipped to the end bins
    out = two_hot.encode(torch.tensor([1e12, -1e12]))
    assert out[0, -1].item() == 1.0 and out[1, 0].item() == 1.0
    # extra leading dims
    assert two_hot.encode(torch.zeros(2, 3)).shape == (2, 3, 255)


def test_two_hot_round_trip():
    two_hot = TwoHot(symexp_bins(255))
    values = _round_trip_values()
    x = torch.tensor(values, dtype=torch.float32)
    decoded = two_hot.decode(torch.log(two_hot.encode(x))).numpy().astype(np.float64)
    np.testing.assert_allclose(decoded, x.numpy().astype(np.float64), rtol=1e-5, atol=1e-9)
    assert decoded[np.flatnonzero(values == 0.0)[0]] == 0.0


def test_two_hot_uniform_prediction_decodes_to_exactly_zero():
    two_hot = TwoHot(symexp_bins(255))
    for shape in [(255,), (4, 3, 255)]:
        assert torch.count_nonzero(two_hot.decode(torch.zeros(shape))).item() == 0
    assert two_hot.decode(torch.full((2, 255), 7.3)).abs().max().item() == 0.0


def test_two_hot_decode_and_loss_vs_numpy():
    torch.manual_seed(0)
    bins = symexp_bins(255)
    two_hot = TwoHot(bins)
    bins64 = bins.numpy().astype(np.float64)
    logits = torch.randn(3, 255) * 2
    targets = torch.tensor([0.3, -12.0, 456.0])
    probs = np_softmax(logits.numpy())
    np.testing.assert_allclose(two_hot.decode(logits).numpy(), probs @ bins64, rtol=1e-4, atol=1e-4)
    logp = np_log_softmax(logits.numpy())
    expected = np.array([-(np_two_hot(t, bins64) * lp).sum() for t, lp in zip(targets.tolist(), logp)])
    np.testing.assert_allclose(two_hot.loss(logits, targets).numpy(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- categoricals


def np_kl(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """KL[lhs || rhs] with explicit loops over latents and classes; logits (B, L, K) -> (B,)."""
    out = np.zeros(lhs.shape[0])
    for b in range(lhs.shape[0]):
        for l in range(lhs.shape[1]):
            lq, lp = np_log_softmax(lhs[b, l]), np_log_softmax(rhs[b, l])
            for k in range(lhs.shape[2]):
                out[b] += math.exp(lq[k]) * (lq[k] - lp[k])
    return out


def test_categorical_kl_vs_numpy():
    torch.manual_seed(0)
    lhs, rhs = torch.randn(3, 5, 4) * 2, torch.randn(3, 5, 4) * 2
    got = categorical_kl(lhs, rhs)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), np_kl(lhs.numpy(), rhs.numpy()), rtol=1e-5, atol=1e-6)
    assert categorical_kl(lhs, lhs).abs().max().item() == 0.0


def test_unimix_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6) * 3
    got = unimix_logits(logits, 0.01).numpy()
    np.testing.assert_allclose(got, np.log(0.99 * np_softmax(logits.numpy()) + 0.01 / 6), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unimix_logits(logits, 0.0).numpy(), np_log_softmax(logits.numpy()), atol=1e-5)


def test_kl_losses_values_and_free_bits():
    torch.manual_seed(0)
    post = torch.randn(4, 8, 5) * 3
    prior = torch.randn(4, 8, 5) * 3
    prior[0] = post[0]  # identical: KL exactly 0, clipped to 1
    dyn, rep = kl_losses(post, prior, 1.0)
    kl = np_kl(post.numpy(), prior.numpy())
    assert kl[1:].min() > 1.0  # the others are above the free bits
    expected = np.maximum(1.0, kl)
    np.testing.assert_allclose(dyn.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(rep.numpy(), expected, rtol=1e-5)
    assert dyn[0].item() == 1.0 and rep[0].item() == 1.0
    # a large free-bits threshold clips everything
    dyn, rep = kl_losses(post, prior, 1e6)
    assert torch.equal(dyn, torch.full((4,), 1e6)) and torch.equal(rep, torch.full((4,), 1e6))


def test_kl_losses_gradients_are_balanced():
    torch.manual_seed(1)
    post = (torch.randn(3, 6, 4) * 3).requires_grad_()
    prior = (torch.randn(3, 6, 4) * 3).detach()
    with torch.no_grad():
        prior[0] = post[0]
    prior.requires_grad_()
    dyn, rep = kl_losses(post, prior, 1.0)

    g_post, g_prior = torch.autograd.grad(dyn.sum(), [post, prior], allow_unused=True, retain_graph=True)
    assert g_post is None or g_post.abs().max().item() == 0.0  # dyn never trains the posterior
    g_post2, g_prior2 = torch.autograd.grad(rep.sum(), [post, prior], allow_unused=True)
    assert g_prior2 is None or g_prior2.abs().max().item() == 0.0  # rep never trains the prior

    q = np_softmax(post.detach().numpy())
    p = np_softmax(prior.detach().numpy())
    lq, lp = np.log(q), np.log(p)
    # d KL[sg(q)||p] / d prior_logits = p - q ; d KL[q||sg(p)] / d post_logits = q (log q - log p - KL_latent)
    exp_prior = p - q
    kl_latent = (q * (lq - lp)).sum(-1, keepdims=True)
    exp_post = q * (lq - lp - kl_latent)
    # below the free bits (row 0): zero gradient on both
    exp_prior[0] = 0.0
    exp_post[0] = 0.0
    assert g_prior[0].abs().max().item() == 0.0 and g_post2[0].abs().max().item() == 0.0
    np.testing.assert_allclose(g_prior.numpy(), exp_prior, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_post2.numpy(), exp_post, rtol=1e-4, atol=1e-6)


def test_kl_losses_identical_logits_give_one_and_no_gradient():
    torch.manual_seed(2)
    logits = torch.randn(2, 32, 4)
    post = logits.clone().requires_grad_()
    prior = logits.clone().requires_grad_()
    dyn, rep = kl_losses(post, prior, 1.0)
    assert torch.equal(dyn, torch.ones(2)) and torch.equal(rep, torch.ones(2))
    (dyn + rep).sum().backward()
    for g in (post.grad, prior.grad):
        assert g is None or g.abs().max().item() == 0.0


def test_continuous_policy_mean_std_and_log_prob():
    torch.manual_seed(0)
    raw = torch.randn(5, 6) * 2
    dist = continuous_policy(raw)
    mu, x = raw[:, :3].numpy().astype(np.float64), raw[:, 3:].numpy().astype(np.float64)
    mean = np.tanh(mu)
    std = 0.9 / (1.0 + np.exp(-(x + 2.0))) + 0.1
    np.testing.assert_allclose(dist.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dist.stddev.numpy(), std, rtol=1e-5, atol=1e-6)
    assert dist.stddev.min().item() >= 0.1 and dist.stddev.max().item() <= 1.0
    a = torch.rand(5, 3) * 2 - 1
    logp = (-0.5 * ((a.numpy() - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(dist.log_prob(a).numpy(), logp, rtol=1e-5, atol=1e-5)


def test_discrete_policy_probs_log_prob_and_entropy():
    torch.manual_seed(0)
    raw = torch.randn(4, 5) * 3
    dist = discrete_policy(raw, 0.01)
    probs = 0.99 * np_softmax(raw.numpy().astype(np.float64)) + 0.002
    np.testing.assert_allclose(dist.probs.numpy(), probs, rtol=1e-5, atol=1e-7)
    actions = np.eye(5)[[0, 3, 4, 1]]
    np.testing.assert_allclose(dist.log_prob(torch.tensor(actions, dtype=torch.float32)).numpy(),
                               np.log(probs[np.arange(4), [0, 3, 4, 1]]), rtol=1e-5)
    np.testing.assert_allclose(dist.entropy().numpy(), -(probs * np.log(probs)).sum(-1), rtol=1e-5)
    # a class of probability 0 adds 0 to the entropy, not NaN
    assert torch.isfinite(discrete_policy(torch.tensor([[0.0, -1e30]]), 0.0).entropy()).all()


@pytest.mark.parametrize("discrete", [False, True])
def test_sampled_actions_follow_the_policy(discrete):
    """sample_policy (no host sync) draws from the policy's law: class frequencies, or the
    normal's mean and std, over 20000 draws."""
    torch.manual_seed(0)
    raw = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    dist = discrete_policy(raw, 0.01) if discrete else continuous_policy(raw)
    samples = torch.stack([sample_policy(dist)[0] for _ in range(20000)]).numpy().astype(np.float64)
    if discrete:
        assert set(np.unique(samples)) == {0.0, 1.0} and (samples.sum(-1) == 1).all()
        expected = 0.99 * np_softmax(raw.numpy().astype(np.float64))[0] + 0.01 / 4
        np.testing.assert_allclose(samples.mean(0), expected, atol=0.01)
    else:
        mean = np.tanh([1.0, 0.0])
        std = 0.9 / (1.0 + np.exp(-(np.array([-1.0, 2.0]) + 2.0))) + 0.1
        np.testing.assert_allclose(samples.mean(0), mean, atol=0.02)
        np.testing.assert_allclose(samples.std(0), std, rtol=0.03)


def test_quantiles_match_numpy_percentiles():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 37, 1000):
        values = rng.normal(size=n) * 10
        got = quantiles(torch.tensor(values, dtype=torch.float64), (0.05, 0.5, 0.95)).numpy()
        np.testing.assert_allclose(got, np.percentile(values, [5, 50, 95]), rtol=1e-12, atol=1e-12)


def test_onehot_matches_eye():
    index = torch.tensor([[0, 3], [2, 1]])
    assert torch.equal(onehot(index, 4), torch.tensor(np.eye(4, dtype=np.float32)[index.numpy()]))


def test_continue_loss_is_bernoulli_nll():
    logits = torch.tensor([-3.0, -0.2, 0.0, 1.5, 4.0])
    target = torch.tensor([0.0, 1.0, 0.997, 0.5, 1.0])
    s = 1.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64)))
    t = target.numpy().astype(np.float64)
    expected = -(t * np.log(s) + (1 - t) * np.log(1 - s))
    np.testing.assert_allclose(continue_loss(logits, target).numpy(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- returns


def np_lambda_return(reward, cont, boot, lam, last=None):
    """Hand-unrolled recursion, one sequence at a time."""
    reward, cont, boot = (np.asarray(v, dtype=np.float64) for v in (reward, cont, boot))
    n, t_len = reward.shape
    out = np.zeros((n, t_len - 1))
    for i in range(n):
        nxt = boot[i, t_len - 1]  # R_{T-1}
        for t in range(t_len - 2, -1, -1):
            l = lam
            if last is not None and last[i, t + 1]:
                l = 0.0
            nxt = reward[i, t + 1] + cont[i, t + 1] * ((1 - l) * boot[i, t + 1] + l * nxt)
            out[i, t] = nxt
    return out


def test_lambda_return_matches_hand_recursion():
    torch.manual_seed(0)
    n, t_len = 3, 7
    reward, boot = torch.randn(n, t_len), torch.randn(n, t_len)
    cont = torch.rand(n, t_len)
    got = lambda_return(reward, cont, boot, 0.95)
    assert got.shape == (n, t_len - 1)
    np.testing.assert_allclose(got.numpy(), np_lambda_return(reward, cont, boot, 0.95), rtol=1e-5, atol=1e-6)
    # the last return is r_{T-1} + c_{T-1} boot_{T-1}
    np.testing.assert_allclose(got[:, -1].numpy(), (reward[:, -1] + cont[:, -1] * boot[:, -1]).numpy(), rtol=1e-6)


def test_lambda_return_last_cuts_the_return():
    torch.manual_seed(1)
    n, t_len = 2, 8
    reward, boot = torch.randn(n, t_len), torch.randn(n, t_len)
    cont = torch.full((n, t_len), 0.99)
    last = torch.zeros(n, t_len, dtype=torch.bool)
    last[0, 3] = True
    last[1, 6] = True
    got = lambda_return(reward, cont, boot, 0.95, last=last)
    np.testing.assert_allclose(
        got.numpy(), np_lambda_return(reward, cont, boot, 0.95, last.numpy()), rtol=1e-5, atol=1e-6
    )
    # R_2 of sequence 0 stops at the cut: r_3 + c_3 boot_3, independent of anything later
    np.testing.assert_allclose(got[0, 2].item(), (reward[0, 3] + 0.99 * boot[0, 3]).item(), rtol=1e-6)
    reward2 = reward.clone()
    reward2[0, 4:] += 100.0
    got2 = lambda_return(reward2, cont, boot, 0.95, last=last)
    assert torch.equal(got2[0, :3], got[0, :3])
    assert not torch.equal(got2[0, 3:], got[0, 3:])


def test_lambda_return_lam_zero_is_one_step_td():
    torch.manual_seed(2)
    reward, boot, cont = torch.randn(3, 6), torch.randn(3, 6), torch.rand(3, 6)
    got = lambda_return(reward, cont, boot, 0.0)
    expected = reward.numpy()[:, 1:] + cont.numpy()[:, 1:] * boot.numpy()[:, 1:]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_lambda_return_lam_one_is_discounted_monte_carlo_plus_tail():
    torch.manual_seed(3)
    gamma, n, t_len = 0.9, 2, 6
    reward, boot = torch.randn(n, t_len), torch.randn(n, t_len)
    cont = torch.full((n, t_len), gamma)
    got = lambda_return(reward, cont, boot, 1.0)
    r, b = reward.numpy().astype(np.float64), boot.numpy().astype(np.float64)
    expected = np.zeros((n, t_len - 1))
    for i in range(n):
        for t in range(t_len - 1):
            ret = sum(gamma ** (k - t - 1) * r[i, k] for k in range(t + 1, t_len))
            expected[i, t] = ret + gamma ** (t_len - 1 - t) * b[i, t_len - 1]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_return_normalizer_percentiles_and_ema():
    torch.manual_seed(0)
    norm = ReturnNormalizer(rate=0.01, limit=1.0, low=5, high=95)
    assert norm.low.item() == 0.0 and norm.high.item() == 0.0
    assert norm.scale().item() == 1.0  # max(limit, 0)
    low = high = 0.0
    for i in range(6):
        returns = torch.randn(4, 37) * (10.0 + 20 * i) + 3.0 * i
        norm.store_(norm.advance(returns), TAKEN)
        values = returns.numpy().astype(np.float64).ravel()
        p5, p95 = np.percentile(values, 5), np.percentile(values, 95)  # numpy default: linear
        low = 0.99 * low + 0.01 * p5
        high = 0.99 * high + 0.01 * p95
        np.testing.assert_allclose(norm.low.item(), low, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norm.high.item(), high, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norm.scale().item(), max(1.0, high - low), rtol=1e-5, atol=1e-6)
    assert norm.scale().item() > 1.0
    # a small range stays at the limit
    small = ReturnNormalizer()
    small.store_(small.advance(torch.linspace(0, 1, 11)), TAKEN)
    assert small.scale().item() == 1.0
    # advance computes the next EMAs without storing them; store_ stores them
    before = (norm.low.item(), norm.high.item())
    returns = torch.randn(50) * 40.0
    advanced = norm.advance(returns)
    assert (norm.low.item(), norm.high.item()) == before
    p5, p95 = np.percentile(returns.numpy().astype(np.float64), [5, 95])
    np.testing.assert_allclose(advanced.numpy(), [0.99 * before[0] + 0.01 * p5, 0.99 * before[1] + 0.01 * p95], rtol=1e-5)
    np.testing.assert_allclose(norm.scale(advanced).item(), max(1.0, advanced[1].item() - advanced[0].item()), rtol=1e-6)
    norm.store_(advanced, torch.tensor(False))  # a skipped update keeps the EMAs
    assert (norm.low.item(), norm.high.item()) == before
    norm.store_(advanced, TAKEN)
    assert torch.equal(torch.stack([norm.low, norm.high]), advanced)
    # percentiles are interpolated like numpy on a tiny known set
    tiny = ReturnNormalizer(rate=1.0)
    data = np.array([0.0, 1.0, 2.0, 10.0])
    tiny.store_(tiny.advance(torch.tensor(data)), TAKEN)
    np.testing.assert_allclose(tiny.low.item(), np.percentile(data, 5), rtol=1e-6)
    np.testing.assert_allclose(tiny.high.item(), np.percentile(data, 95), rtol=1e-6)
    np.testing.assert_allclose(tiny.low.item(), 0.15, rtol=1e-6)
    np.testing.assert_allclose(tiny.high.item(), 2.0 + 0.85 * 8.0, rtol=1e-6)


def test_ema_update():
    torch.manual_seed(0)
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in dst.parameters()]
    ema_update_(dst, src, 0.02, torch.tensor(False))  # a skipped update: no change
    assert all(torch.equal(b, d) for b, d in zip(before, dst.parameters()))
    ema_update_(dst, src, 0.02, TAKEN)
    for b, s, d in zip(before, src.parameters(), dst.parameters()):
        np.testing.assert_allclose(d.detach().numpy(), 0.98 * b.numpy() + 0.02 * s.detach().numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- Barlow Twins


def np_barlow(a: np.ndarray, b: np.ndarray, lam: float) -> float:
    """Direct double loop over the cross-correlation matrix."""
    n, d = a.shape

    def std(x):
        out = np.zeros_like(x)
        for j in range(d):
            col = x[:, j]
            mean = sum(col) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in col) / (n - 1))
            out[:, j] = (col - mean) / (sd + 1e-8)
        return out

    za, zb = std(a.astype(np.float64)), std(b.astype(np.float64))
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(za[k, i] * zb[k, j] for k in range(n)) / n
            loss += (1.0 - c) ** 2 if i == j else lam * c**2
    return loss


def test_barlow_twins_loss_vs_double_loop():
    torch.manual_seed(0)
    for n, d, lam in [(6, 3, 5e-4), (10, 4, 0.5), (9, 5, 1.0)]:
        a = torch.randn(n, d) * 3 + 1
        b = 0.7 * a + torch.randn(n, d)
        got = barlow_twins_loss(a, b, lam).item()
        np.testing.assert_allclose(got, np_barlow(a.numpy(), b.numpy(), lam), rtol=1e-5, atol=1e-6)


def _decorrelated(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) with zero-mean, mutually orthogonal columns of arbitrary scales."""
    g = np.random.default_rng(seed)
    m = np.concatenate([np.ones((n, 1)), g.standard_normal((n, d))], 1)
    q, _ = np.linalg.qr(m)
    x = q[:, 1 : d + 1] * g.uniform(0.5, 5.0, size=d)
    assert np.abs(x.mean(0)).max() < 1e-12
    return torch.tensor(x)


def test_barlow_twins_identical_decorrelated_inputs():
    d = 4
    for n in (8, 16, 64, 256):
        x = _decorrelated(n, d, seed=n)
        # unbiased std but division by N: C_ii = (N - 1) / N, C_ij = 0, loss = D / N^2
        expected = d / n**2
        got = barlow_twins_loss(x, x.clone(), 5e-4).item()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)  # float32 C
        # independently scaled views of the same thing give the same loss
        got2 = barlow_twins_loss(x * 3.0 + 1.0, x * 0.1 - 2.0, 1.0).item()
        np.testing.assert_allclose(got2, expected, rtol=1e-3, atol=2e-7)
    assert barlow_twins_loss(_decorrelated(4096, d, 0), _decorrelated(4096, d, 0), 5e-4).item() < 1e-6


# ----------------------------------------------------------------------------- MuDreamer action head


def test_action_nll_continuous():
    torch.manual_seed(0)
    b, d = 4, 3
    raw = torch.randn(b, 2 * d) * 1.5
    target = torch.rand(b, d) * 1.8 - 0.9
    target[0, 0] = 1.3  # taken as it is: no clamp to the policy's range
    got = action_nll(raw, target, discrete=False).numpy()
    r, t = raw.numpy().astype(np.float64), target.numpy().astype(np.float64)
    expected = np.zeros(b)
    for i in range(b):
        for j in range(d):
            mean = math.tanh(r[i, j])
            std = 0.9 / (1.0 + math.exp(-(r[i, d + j] + 2.0))) + 0.1
            expected[i] -= -0.5 * ((t[i, j] - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert got.shape == (b,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_action_nll_discrete():
    torch.manual_seed(0)
    b, k = 5, 4
    raw = torch.randn(b, k) * 2
    index = torch.tensor([0, 3, 1, 2, 3])
    target = torch.nn.functional.one_hot(index, k).float()
    got = action_nll(raw, target, discrete=True).numpy()
    r = raw.numpy().astype(np.float64)
    expected = np.zeros(b)
    for i in range(b):
        e = [math.exp(v) for v in r[i]]
        p = 0.99 * e[index[i]] / sum(e) + 0.01 / k
        expected[i] = -math.log(p)
    assert got.shape == (b,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # unimix keeps the loss bounded even for a confidently wrong prediction
    bad = torch.tensor([[50.0, -50.0, -50.0, -50.0]])
    worst = action_nll(bad, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), discrete=True).item()
    np.testing.assert_allclose(worst, -math.log(0.01 / 4), rtol=1e-4)


# ----------------------------------------------------------------------------- LaProp


class _NumpyLaProp:
    """Hand implementation of the LaProp of docs/algorithm.md §1 + AGC + warm-up, float64.

    The library keeps its moments in float32 even for float64 parameters, hence rtol ~1e-7.
    """

    def __init__(self, params, lr, betas, eps, agc, pmin, warmup):
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.lr, (self.b1, self.b2), self.eps, self.agc, self.pmin, self.warmup = lr, betas, eps, agc, pmin, warmup
        self.nu = [np.zeros_like(w) for w in self.w]
        self.mu = [np.zeros_like(w) for w in self.w]
        self.k = 0

    def step(self, grads):
        lr = self.lr * (min(1.0, (self.k + 1) / self.warmup) if self.warmup else 1.0)
        t = self.k + 1
        for i, g in enumerate(grads):
            g = np.array(g, dtype=np.float64)
            if self.agc:
                limit = self.agc * max(self.pmin, np.linalg.norm(self.w[i]))
                gn = np.linalg.norm(g)
                if gn > limit:
                    g = g * (limit / gn)
            self.nu[i] = self.b2 * self.nu[i] + (1 - self.b2) * g * g
            u = g / (np.sqrt(self.nu[i] / (1 - self.b2**t)) + self.eps)
            self.mu[i] = self.b1 * self.mu[i] + (1 - self.b1) * u
            self.w[i] = self.w[i] - lr * self.mu[i] / (1 - self.b1**t)
        self.k += 1


def _laprop_case(warmup: int, agc: float):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64) * 1e-5),  # tiny: pmin matters
    ]
    grads = [
        [torch.randn(3, 4, dtype=torch.float64) * 10.0, torch.randn(5, dtype=torch.float64) * 1e-3],
        [torch.randn(3, 4, dtype=torch.float64) * 0.01, torch.randn(5, dtype=torch.float64) * 1e-6],
    ]
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, agc=agc, pmin=1e-3, warmup=warmup)
    ref = _NumpyLaProp([p.detach().numpy() for p in params], **kw)
    opt = LaProp(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.numpy() for g in step_grads])
        for p, w in zip(params, ref.w):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-6, atol=1e-12)
    return params, ref


@pytest.mark.parametrize("warmup", [0, 10])
@pytest.mark.parametrize("agc", [0.0, 0.3])
def test_laprop_two_steps_vs_numpy(warmup, agc):
    _laprop_case(warmup, agc)


def test_laprop_first_step_is_signed_lr_and_agc_clips():
    # step 1: nu_hat = g^2 and mu_hat = g / |g|, so the update is -lr_1 sign(g) whatever AGC does
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = LaProp([w], lr=0.5, eps=1e-20, agc=0.3, pmin=1e-3, warmup=4)
    w.grad = torch.tensor([100.0, -0.5, 1e-3], dtype=torch.float64)
    opt.step()
    # lr_1 = 0.5 * 1/4
    np.testing.assert_allclose(w.detach().numpy(), [1.0 - 0.125, -2.0 + 0.125, 3.0 - 0.125], rtol=1e-7)


def test_laprop_agc_scales_gradient_to_limit():
    # with beta1 = 0 and a pre-filled nu, the step is linear in the clipped gradient
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    g = torch.tensor([30.0, 40.0], dtype=torch.float64)  # ||g|| = 50 > 0.3 * 5
    ref = _NumpyLaProp([w.detach().numpy()], lr=0.1, betas=(0.0, 0.5), eps=1e-3, agc=0.3, pmin=1e-3, warmup=0)
    opt = LaProp([w], lr=0.1, betas=(0.0, 0.5), eps=1e-3, agc=0.3, pmin=1e-3, warmup=0)
    for _ in range(3):
        w.grad = g.clone()
        opt.step()
        ref.step([g.numpy()])
        np.testing.assert_allclose(w.detach().numpy(), ref.w[0], rtol=1e-7)


def test_laprop_warmup_lives_in_state_dict():
    torch.manual_seed(0)
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, agc=0.0, pmin=1e-3, warmup=10)
    w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    grads = [torch.randn(4, dtype=torch.float64) for _ in range(5)]
    ref = _NumpyLaProp([w.detach().numpy()], **kw)
    opt = LaProp([w], **kw)
    for g in grads[:3]:
        w.grad = g.clone()
        opt.step()
        ref.step([g.numpy()])
    state = copy.deepcopy(opt.state_dict())
    assert state["param_groups"][0]["updates"] == 3
    # a fresh optimiser on the same parameter continues the warm-up (lr_4 = 0.1 * 4/10), not restarts it
    w2 = torch.nn.Parameter(w.detach().clone())
    fresh = LaProp([w2], **kw)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["updates"] == 3
    for g in grads[3:]:
        w2.grad = g.clone()
        fresh.step()
        ref.step([g.numpy()])
        np.testing.assert_allclose(w2.detach().numpy(), ref.w[0], rtol=1e-7, atol=1e-12)
    assert fresh.param_groups[0]["updates"] == 5


# ----------------------------------------------------------------------------- bf16 autocast
def test_sensitive_ops_stay_float32_under_bf16_autocast():
    """KL, two-hot, the Barlow correlation, return percentiles and the softmax over logits give,
    under bf16 autocast, the float32 results they give without it (not bf16-rounded ones)."""
    torch.manual_seed(0)
    logits_a, logits_b = torch.randn(6, 4, 8), torch.randn(6, 4, 8)
    values, targets = torch.randn(6, 255), torch.randn(6) * 30
    a, b = torch.randn(64, 12), torch.randn(64, 12)
    returns, cont, boot = torch.randn(5, 7), torch.rand(5, 7), torch.randn(5, 7)
    two_hot = TwoHot(symexp_bins())
    calls = {
        "kl": lambda: categorical_kl(logits_a, logits_b),
        "two_hot_loss": lambda: two_hot.loss(values, targets),
        "two_hot_decode": lambda: two_hot.decode(values),
        "barlow": lambda: barlow_twins_loss(a, b, 5e-3),
        "percentiles": lambda: quantiles(returns.flatten(), (0.05, 0.95)),
        "unimix_softmax": lambda: unimix_logits(logits_a, 0.01),
        "lambda_return": lambda: lambda_return(returns, cont, boot, 0.95),
    }
    for name, call in calls.items():
        plain = call()
        with torch.autocast("cpu", torch.bfloat16):
            mixed = call()
        assert mixed.dtype == torch.float32, name
        torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_pointwise_max_pool_equals_max_pool2d_with_ties(compiled):
    """Values and gradients of the compiler's 2x2 max-pool against max_pool2d on a map full of
    ties (integers 0..2), channels-last like the encoder's: the gradient goes to the first maximum
    of each window in scan order, and nowhere else."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (3, 5, 8, 6), generator=generator).float().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 5, 4, 3, generator=generator)
    expected_x = x.clone().requires_grad_()
    torch.nn.functional.max_pool2d(expected_x, 2).backward(grad)
    pool = torch.compile(MaxPool2x2(), fullgraph=True) if compiled else _MaxPool2x2.apply
    actual_x = x.clone().requires_grad_()
    out = pool(actual_x)
    out.backward(grad)
    torch.testing.assert_close(out, torch.nn.functional.max_pool2d(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(actual_x.grad, expected_x.grad, rtol=0, atol=0)
    windows = x.unflatten(3, (3, 2)).unflatten(2, (4, 2)).permute(0, 1, 2, 4, 3, 5).flatten(-2)
    assert (windows == windows.amax(-1, keepdim=True)).sum(-1).max() > 1  # the map has ties


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_reshape_upsample_equals_nearest_interpolation(compiled):
    """The compiled decoder's 2x upsampling (a broadcast and a reshape) against F.interpolate(mode=
    "nearest"): equal values, and the gradient of each input pixel is the sum over its 2x2 block."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 8, 10, generator=generator)
    up = torch.compile(Upsample2x(), fullgraph=True) if compiled else _repeat_2x
    actual_x = x.clone().requires_grad_()
    out = up(actual_x)
    out.backward(grad)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    block_sums = grad.unflatten(3, (5, 2)).unflatten(2, (4, 2)).sum((3, 5))
    torch.testing.assert_close(actual_x.grad, block_sums)

"""The discrete Gaussian diffusion, checked in float64 against closed forms computed here.

Reference quantities (ᾱ, posteriors, KLs) are computed in this file from the β schedule with
numpy / torch.distributions, never taken from GaussianDiffusion's own tables.
"""
import math
import re

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from gaussdiff import GaussianDiffusion, make_diffusion
from gaussdiff.errors import UsageError
from gaussdiff.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from gaussdiff.diffusion.schedules import beta_schedule, space_timesteps
from oracles import GaussianOracleEps

F64 = torch.float64
LN2 = math.log(2.0)


def alpha_bar(d: GaussianDiffusion) -> np.ndarray:
    """ᾱ of d's own steps, from the ORIGINAL β table: Π(1 - β) taken at timestep_map."""
    return np.cumprod(1.0 - np.asarray(d.original_betas))[np.asarray(d.timestep_map)]


def at(table, t, x):
    """table[t] as a float64 tensor broadcastable against x."""
    return torch.as_tensor(np.asarray(table)[t.numpy()], dtype=F64).reshape(-1, *([1] * (x.ndim - 1)))


def bayes_posterior(d, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), the product of two Gaussians in
    x_{t-1}: q(x_t | x_{t-1}) = N(sqrt(α) x_{t-1}, 1 - α) with α = ᾱ_t / ᾱ_{t-1} (the step between
    kept timesteps), q(x_{t-1} | x_0) = N(sqrt(ᾱ_{t-1}) x_0, 1 - ᾱ_{t-1}). For t > 0 only."""
    a = alpha_bar(d)
    a_t, a_prev = at(a, t, x0), at(a, t - 1, x0)
    alpha = a_t / a_prev
    precision = alpha / (1 - alpha) + 1 / (1 - a_prev)
    mean = (alpha.sqrt() * x_t / (1 - alpha) + a_prev.sqrt() * x0 / (1 - a_prev)) / precision
    return mean, (1 / precision).expand_as(x0)


def rand(*shape, seed=0, low=-1.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=F64)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def fixed_output(out):
    """A 'model' that ignores its input and returns `out`."""
    return lambda x, t, **kw: out


DIFFUSIONS = {
    "linear1000": lambda **kw: make_diffusion("linear", 1000, **kw),
    "linear100": lambda **kw: make_diffusion("linear", 100, **kw),
    "cosine1000": lambda **kw: make_diffusion("cosine", 1000, **kw),
    "cosine4000-respaced": lambda **kw: make_diffusion("cosine", 4000, respacing="10,15,20", **kw),
    "linear100-ddim20": lambda **kw: make_diffusion("linear", 100, respacing="ddim20", **kw),
}


# --------------------------------------------------------------------------------- forward process
def test_q_sample_moments_monte_carlo():
    """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I): sample mean and variance of q_sample (its own
    noise draw) agree with the closed form within 5 standard errors."""
    d = make_diffusion("linear", 1000)
    a = np.cumprod(1 - beta_schedule("linear", 1000))
    N = 10000
    x0_values = torch.tensor([-0.9, -0.2, 0.0, 0.5, 1.0], dtype=F64)
    torch.manual_seed(0)
    for step in (0, 10, 500, 999):
        x0 = x0_values.expand(N, 5)
        xt = d.q_sample(x0, torch.full((N,), step, dtype=torch.long))
        mean, var = math.sqrt(a[step]) * x0_values, 1 - a[step]
        se_mean = math.sqrt(var / N)
        se_var = var * math.sqrt(2 / (N - 1))
        assert torch.all((xt.mean(0) - mean).abs() < 5 * se_mean), step
        assert torch.all((xt.var(0) - var).abs() < 5 * se_var), step
        m, v, lv = d.q_mean_variance(x0[:2], torch.full((2,), step))
        torch.testing.assert_close(m, math.sqrt(a[step]) * x0[:2], rtol=1e-12, atol=0)
        torch.testing.assert_close(v, torch.full_like(v, var), rtol=1e-12, atol=0)
        torch.testing.assert_close(lv, torch.full_like(v, math.log(var)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(DIFFUSIONS))
def test_posterior_is_bayes_rule(name):
    """q_posterior_mean_variance equals the Gaussian product q(x_t|x_{t-1}) q(x_{t-1}|x_0) for
    every t > 0 (also for respaced steps), and at t = 0 it is the point mass at x_0."""
    d = DIFFUSIONS[name]()
    t = torch.arange(1, d.num_timesteps)
    x0, xt = rand(len(t), 2, 3, seed=1), randn(len(t), 2, 3, seed=2)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    ref_mean, ref_var = bayes_posterior(d, x0, xt, t)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var.expand_as(x0), ref_var, rtol=1e-9, atol=0)
    torch.testing.assert_close(log_var.expand_as(x0), ref_var.log(), rtol=1e-9, atol=1e-12)
    t0 = torch.zeros(3, dtype=torch.long)
    mean0, var0, log_var0 = d.q_posterior_mean_variance(x0[:3], xt[:3], t0)
    torch.testing.assert_close(mean0, x0[:3], rtol=1e-12, atol=1e-12)
    assert torch.all(var0 == 0)
    # β̃_0 = 0, so the log is clipped with β̃_1 (docs/conventions.md "Variances at t = 0")
    torch.testing.assert_close(log_var0.expand(3, 2, 3), ref_var[:1].log().expand(3, 2, 3),
                               rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------- KL and decoder
def test_normal_kl_closed_form():
    """normal_kl is KL(N(m1, e^lv1) || N(m2, e^lv2)) per element (torch.distributions), zero for
    identical Gaussians."""
    m1, m2 = randn(50, seed=3), randn(50, seed=4)
    lv1, lv2 = 2 * randn(50, seed=5), 2 * randn(50, seed=6)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=F64), rtol=0, atol=1e-14)
    assert torch.all(normal_kl(m1, lv1, m2, lv2) >= 0)


BIN_CENTRES = torch.linspace(-1, 1, 256, dtype=F64)   # k / 127.5 - 1: data scaled to [-1, 1]


@pytest.mark.parametrize("mean", [-1.3, -1.0, -0.5, 0.0, 0.3712, 0.999, 1.0, 1.6])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.3, 2.0])
def test_discretized_gaussian_sums_to_one(mean, scale):
    """The 256 bin probabilities of the discretized Gaussian decoder sum to 1 (edge bins open to
    ±∞), and each equals Φ((x+1/255-μ)/σ) - Φ((x-1/255-μ)/σ) up to the tanh approximation of Φ
    (|error| < 2e-4 per CDF value)."""
    x = BIN_CENTRES
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean),
                                               torch.full_like(x, math.log(scale)))
    assert logp.shape == x.shape
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    upper = torch.where(x > 0.999, torch.ones_like(x), torch.special.ndtr((x + 1 / 255 - mean) / scale))
    lower = torch.where(x < -0.999, torch.zeros_like(x), torch.special.ndtr((x - 1 / 255 - mean) / scale))
    torch.testing.assert_close(logp.exp(), upper - lower, rtol=0, atol=4e-4)


# --------------------------------------------------------------------------------- variances
def _reference_variances(d):
    a = alpha_bar(d)
    a_prev = np.append(1.0, a[:-1])
    beta = 1 - a / a_prev
    beta_tilde = beta * (1 - a_prev) / (1 - a)
    return beta, beta_tilde


@pytest.mark.parametrize("name", ["cosine1000", "linear100-ddim20"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_variance_types(name, var_type):
    """σ²_t of p(x_{t-1}|x_t) per var_type: fixed_small = β̃_t (log clipped with β̃_1 at t = 0);
    fixed_large = β_t, with β̃_1 at t = 0; learned: log σ² = v (the output); learned_range: log σ² =
    frac·log β_t + (1 - frac)·log β̃_t, frac = (v + 1)/2, with log β̃_1 as the lower end at t = 0."""
    d = DIFFUSIONS[name](var_type=var_type)
    N = d.num_timesteps
    t = torch.arange(N)
    x = randn(N, 1, 2, 2, seed=7)
    beta, beta_tilde = _reference_variances(d)
    log_bt_clipped = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
    v = rand(N, 1, 2, 2, seed=8)
    v[0] = -1.0   # frac = 0: the lower end at t = 0
    v[1] = 1.0    # frac = 1: log β_t
    out = torch.cat([randn(N, 1, 2, 2, seed=9), v], 1) if d.learns_variance else randn(N, 1, 2, 2, seed=9)
    res = d.p_mean_variance(None, x, t, clip_denoised=False, model_output=out)
    if var_type == "fixed_small":
        ref_var = at(beta_tilde, t, x).expand_as(x)
        ref_log = at(log_bt_clipped, t, x).expand_as(x)
    elif var_type == "fixed_large":
        large = np.append(beta_tilde[1], beta[1:])
        ref_var, ref_log = at(large, t, x).expand_as(x), at(np.log(large), t, x).expand_as(x)
    elif var_type == "learned":
        ref_var, ref_log = v.exp(), v
    else:
        frac = (v + 1) / 2
        ref_log = frac * at(np.log(beta), t, x) + (1 - frac) * at(log_bt_clipped, t, x)
        ref_var = ref_log.exp()
    torch.testing.assert_close(res["variance"], ref_var, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(res["log_variance"], ref_log, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------- parameterisations
@pytest.mark.parametrize("name", ["linear1000", "cosine4000-respaced"])
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_parameterisations_recover_x0(name, mean_type):
    """A model that outputs the exact ε, x_0 or v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x_0 of a known x_0 gives
    pred_xstart = x_0, and the model mean equals the Bayes posterior mean μ̃(x_t, x_0)."""
    d = DIFFUSIONS[name](mean_type=mean_type)
    N = d.num_timesteps
    t = torch.arange(N)
    x0, eps = rand(N, 2, 3, 3, seed=10), randn(N, 2, 3, 3, seed=11)
    a = at(alpha_bar(d), t, x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[mean_type]
    res = d.p_mean_variance(fixed_output(out), xt, t, clip_denoised=False)
    torch.testing.assert_close(res["pred_xstart"], x0, rtol=0, atol=1e-8)
    ref_mean, _ = bayes_posterior(d, x0[1:], xt[1:], t[1:])
    torch.testing.assert_close(res["mean"][1:], ref_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(res["mean"][:1], x0[:1], rtol=0, atol=1e-8)   # t = 0: mean = x̂_0


@pytest.mark.parametrize("name", ["linear1000", "cosine4000-respaced"])
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_mse_target_per_mean_type(name, mean_type):
    """L_simple regresses the mean_type's target: ε, x_0, or v = sqrt(ᾱ_t)ε - sqrt(1-ᾱ_t)x_0 with ᾱ
    at the ORIGINAL index (docs/conventions.md): a zero output gives mse = mean(target²), the exact
    target gives 0."""
    d = DIFFUSIONS[name](mean_type=mean_type)
    N = d.num_timesteps
    t = torch.arange(N)
    x0, eps = rand(N, 1, 4, 4, seed=12), randn(N, 1, 4, 4, seed=13)
    a_orig = np.cumprod(1 - np.asarray(d.original_betas))
    a = at(a_orig, torch.as_tensor(d.timestep_map)[t], x0)
    target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[mean_type]
    if mean_type == "v":
        torch.testing.assert_close(d.v_target(x0, t, eps), target, rtol=1e-12, atol=1e-12)
    zero = d.training_losses(fixed_output(torch.zeros_like(x0)), x0, t, noise=eps)
    torch.testing.assert_close(zero["mse"], target.pow(2).mean((1, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(zero["loss"], zero["mse"], rtol=0, atol=0)
    exact = d.training_losses(fixed_output(target), x0, t, noise=eps)
    assert torch.all(exact["mse"] < 1e-28)


# --------------------------------------------------------------------------------- L_t and losses
def reference_L_t_bpd(d, x0, xt, t, eps_out, v_out):
    """L_t in bits/dim for an ε-model with learned_range variance, from closed forms: t > 0:
    KL(q(x_{t-1}|x_t,x_0) || N(μ̃(x_t, x̂_0), σ²)); t = 0: -log of the decoder's bin probability
    of x_0 under N(x̂_0, σ²), with the exact Φ."""
    a = at(alpha_bar(d), t, x0)
    x0_hat = (xt - (1 - a).sqrt() * eps_out) / a.sqrt()
    beta, beta_tilde = _reference_variances(d)
    lower = at(np.log(np.append(beta_tilde[1], beta_tilde[1:])), t, x0)
    frac = (v_out + 1) / 2
    sigma = (0.5 * (frac * at(np.log(beta), t, x0) + (1 - frac) * lower)).exp()
    out = torch.empty(len(t), dtype=F64)
    for i in range(len(t)):
        if t[i] > 0:
            q_mean, q_var = bayes_posterior(d, x0[i:i + 1], xt[i:i + 1], t[i:i + 1])
            p_mean, _ = bayes_posterior(d, x0_hat[i:i + 1], xt[i:i + 1], t[i:i + 1])
            out[i] = kl_divergence(Normal(q_mean, q_var.sqrt()), Normal(p_mean, sigma[i:i + 1])).mean() / LN2
        else:
            p = Normal(x0_hat[i], sigma[i])
            upper = torch.where(x0[i] > 0.999, torch.ones_like(x0[i]), p.cdf(x0[i] + 1 / 255))
            lo = torch.where(x0[i] < -0.999, torch.zeros_like(x0[i]), p.cdf(x0[i] - 1 / 255))
            out[i] = -(upper - lo).log().mean() / LN2
    return out


def _hybrid_setup(d, seed=0):
    B, C = 5, 2
    x0 = torch.round(rand(B, C, 3, 3, seed=seed) * 127.5) / 127.5   # on bin centres
    noise = randn(B, C, 3, 3, seed=seed + 1)
    T = d.num_timesteps
    t = torch.tensor([0, 1, T // 3, T // 2, T - 1])
    out = torch.cat([noise + 0.3 * randn(B, C, 3, 3, seed=seed + 2),
                     rand(B, C, 3, 3, seed=seed + 3)], 1).requires_grad_(True)
    return x0, noise, t, out


@pytest.mark.parametrize("name", ["linear1000", "cosine1000", "linear100-ddim20"])
def test_vb_terms_bpd_match_closed_form(name):
    """vb_terms_bpd(...)["output"] is L_t in bits/dim: the Gaussian KL for t > 0 (exact) and the
    discretized decoder NLL at t = 0 (up to the tanh approximation of Φ)."""
    d = DIFFUSIONS[name](var_type="learned_range")
    x0, noise, t, out = _hybrid_setup(d)
    out = out.detach()
    xt = d.q_sample(x0, t, noise)
    got = d.vb_terms_bpd(fixed_output(out), x0, xt, t, clip_denoised=False)["output"]
    ref = reference_L_t_bpd(d, x0, xt, t, out[:, :2], out[:, 2:])
    torch.testing.assert_close(got[1:], ref[1:], rtol=1e-8, atol=1e-12)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=5e-3)


@pytest.mark.parametrize("name", ["linear1000", "cosine1000", "linear100", "linear100-ddim20"])
def test_hybrid_vb_is_T_over_1000_times_L_t(name):
    """L_hybrid's vb term is (T/1000)·L_t with T the diffusion's own step count (λ = 0.001, so
    L_simple + λ·L_vlb for any T), and the kl loss is T·L_t."""
    d = DIFFUSIONS[name](var_type="learned_range", loss_type="hybrid")
    x0, noise, t, out = _hybrid_setup(d)
    xt = d.q_sample(x0, t, noise)
    L_t = d.vb_terms_bpd(fixed_output(out), x0, xt, t, clip_denoised=False)["output"]
    losses = d.training_losses(fixed_output(out), x0, t, noise=noise)
    T = d.num_timesteps
    torch.testing.assert_close(losses["vb"], L_t * T / 1000, rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["loss"], losses["mse"] + L_t * T / 1000, rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["mse"], (out[:, :2] - noise).pow(2).mean((1, 2, 3)), rtol=1e-12, atol=0)
    kl = DIFFUSIONS[name](var_type="learned_range", loss_type="kl")
    torch.testing.assert_close(kl.training_losses(fixed_output(out), x0, t, noise=noise)["loss"],
                               L_t * T, rtol=1e-12, atol=0)


def test_hybrid_gradient_stop_grad():
    """With the stop-gradient (Improved DDPM sec. 3.1), ∂L_hybrid/∂(mean output) = ∂L_simple/∂(mean
    output) = 2(ε̂ - ε)/(C·H·W), and the variance output gets gradient only from vb. Without it,
    vb also pushes on the mean output."""
    d = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    x0, noise, t, out = _hybrid_setup(d, seed=20)
    C = 2
    losses = d.training_losses(fixed_output(out), x0, t, noise=noise)
    g_loss, = torch.autograd.grad(losses["loss"].sum(), out, retain_graph=True)
    g_mse, = torch.autograd.grad(losses["mse"].sum(), out, retain_graph=True)
    g_vb, = torch.autograd.grad(losses["vb"].sum(), out)
    torch.testing.assert_close(g_mse[:, :C], 2 * (out[:, :C] - noise).detach() / (C * 9), rtol=1e-12, atol=0)
    torch.testing.assert_close(g_loss[:, :C], g_mse[:, :C], rtol=1e-12, atol=0)
    assert torch.all(g_mse[:, C:] == 0) and torch.all(g_vb[:, :C] == 0)
    torch.testing.assert_close(g_loss[:, C:], g_vb[:, C:], rtol=1e-12, atol=0)
    assert g_vb[:, C:].abs().min() > 0

    d2 = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid", vb_stop_grad=False)
    losses2 = d2.training_losses(fixed_output(out), x0, t, noise=noise)
    torch.testing.assert_close(losses2["loss"], losses["loss"], rtol=0, atol=0)   # same value
    g_loss2, = torch.autograd.grad(losses2["loss"].sum(), out)
    diff = (g_loss2[:, :C] - g_mse[:, :C]).abs()
    assert diff.max() > 1e-6 * g_mse[:, :C].abs().max()
    torch.testing.assert_close(g_loss2[:, C:], g_vb[:, C:], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------- bits per dim
def test_prior_bpd_closed_form():
    """prior_bpd = KL(N(sqrt(ᾱ_T) x_0, 1 - ᾱ_T) || N(0, 1)), mean over dims, in bits."""
    d = make_diffusion("linear", 100)
    x0 = rand(3, 2, 4, 4, seed=30)
    aT = float(np.cumprod(1 - beta_schedule("linear", 100))[-1])
    ref = kl_divergence(Normal(math.sqrt(aT) * x0, math.sqrt(1 - aT)),
                        Normal(torch.zeros_like(x0), 1.0)).mean((1, 2, 3)) / LN2
    torch.testing.assert_close(d.prior_bpd(x0), ref, rtol=1e-10, atol=1e-14)


def test_calc_bpd_loop_terms():
    """calc_bpd_loop: total = prior + Σ_t L_t, column t of vb is vb_terms_bpd at t on
    x_t = q_sample(x_0, t, ε_t) (ε drawn per step from the generators, from t = T-1 down)."""
    d = make_diffusion("cosine", 12, var_type="learned_range")
    B = 2
    x0 = torch.round(rand(B, 1, 3, 3, seed=31) * 127.5) / 127.5
    model_out = torch.cat([0.3 * randn(B, 1, 3, 3, seed=32), rand(B, 1, 3, 3, seed=33)], 1)
    model = fixed_output(model_out)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    res = d.calc_bpd_loop(model, x0, clip_denoised=False, generator=gens)
    torch.testing.assert_close(res["total_bpd"], res["prior_bpd"] + res["vb"].sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(res["prior_bpd"], d.prior_bpd(x0), rtol=0, atol=0)
    assert res["vb"].shape == (B, 12) and res["mse"].shape == (B, 12)
    replay = [torch.Generator().manual_seed(s) for s in (5, 6)]
    for i in range(11, -1, -1):
        noise = torch.stack([torch.randn(1, 3, 3, generator=g, dtype=F64) for g in replay])
        t = torch.full((B,), i)
        xt = d.q_sample(x0, t, noise)
        ref = d.vb_terms_bpd(model, x0, xt, t, clip_denoised=False)["output"]
        torch.testing.assert_close(res["vb"][:, i], ref, rtol=1e-12, atol=0)
        eps_hat = model_out[:, :1]
        torch.testing.assert_close(res["mse"][:, i], (eps_hat - noise).pow(2).mean((1, 2, 3)),
                                   rtol=1e-9, atol=1e-12)


def test_calc_bpd_loop_oracle_model():
    """A model that predicts the true x_0 (mean_type x0, fixed_small) has L_t = 0 for t > 0 (KL of
    identical Gaussians), and L_0 is the decoder NLL of x_0 under N(x_0, β̃_1): -log(2Φ(h/σ) - 1)
    for interior bins and -log Φ(h/σ) for the edge bins, h = 1/255."""
    d = make_diffusion("linear", 50, mean_type="x0", var_type="fixed_small")
    x0 = torch.tensor([-1.0, -0.2, 0.0, 127 / 127.5, 1.0], dtype=F64).reshape(1, 1, 1, 5)
    res = d.calc_bpd_loop(fixed_output(x0), x0, clip_denoised=False)
    assert torch.all(res["vb"][:, 1:].abs() < 1e-12)
    assert torch.all(res["xstart_mse"] == 0)
    b = beta_schedule("linear", 50)
    a = np.cumprod(1 - b)
    sigma = math.sqrt(b[1] * (1 - a[0]) / (1 - a[1]))
    phi = Normal(0.0, 1.0).cdf(torch.tensor(1 / 255 / sigma, dtype=F64))
    nll = torch.tensor([-phi.log(), -(2 * phi - 1).log(), -(2 * phi - 1).log(),
                        -(2 * phi - 1).log(), -phi.log()]).mean() / LN2
    assert res["vb"][0, 0].item() == pytest.approx(nll.item(), rel=2e-3)


# --------------------------------------------------------------------------------- samplers
class GaussianDataEps(GaussianOracleEps):
    """The exact ε-prediction for data x_0 ~ N(μ, s² I) (tests/oracles.py) at the ORIGINAL
    timestep index it receives, which must be long; the indices are recorded in `seen`."""

    def __init__(self, d, mu, s):
        super().__init__(np.cumprod(1 - np.asarray(d.original_betas, dtype=np.float64)), s, mu)
        self.seen = []

    def forward(self, x, t, **unused):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.seen.append(t.clone())
        return super().forward(x, t)


def predicted_ddim_round_trip(levels, x0, mu, s, skip_last):
    """The DDIM round trip for Gaussian data, from geometry instead of DDIM's formulas.

    Write x at noise level ᾱ = a as x = sqrt(a)μ + r(a) z, r(a) = sqrt(a s² + 1 - a). With the exact
    ε, one DDIM step from level a to level b maps z to z·cos θ(a, b), where θ is the angle between
    (sqrt(a) s, sqrt(1-a)) and (sqrt(b) s, sqrt(1-b)). Inversion runs levels ᾱ_0 -> ᾱ_1 -> ... ->
    ᾱ_{N-1} -> 0 (x_0 itself is fed to the model as the level ᾱ_0 point, as in improved-diffusion);
    sampling runs ᾱ_{N-1} -> ... -> ᾱ_0 -> 1. Returns (latent, reconstruction)."""
    r, cos = _ddim_geometry(mu, s)
    N = len(levels)
    up = list(levels) + [0.0]
    last = N - 1 if skip_last else N
    z = (x0 - math.sqrt(up[0]) * mu) / r(up[0])
    for i in range(last):
        z = z * cos(up[i], up[i + 1])
    latent = math.sqrt(up[last]) * mu + r(up[last]) * z
    return latent, predicted_ddim_sample(levels, latent, mu, s)


def _ddim_geometry(mu, s):
    """r(a) = sqrt(a s² + 1 - a), the spread of x at level a, and cos θ(a, b) (see below)."""
    def r(a):
        return math.sqrt(a * s * s + 1 - a)

    def cos(a, b):
        return (math.sqrt(a * b) * s * s + math.sqrt((1 - a) * (1 - b))) / (r(a) * r(b))
    return r, cos


def predicted_ddim_sample(levels, x_T, mu, s):
    """DDIM sampling (η = 0, exact ε of N(μ, s²) data) from x_T at level ᾱ_{N-1} down through
    ᾱ_{N-2}, ..., ᾱ_0 to level 1 (x_0): z = (x - sqrt(a)μ)/r(a) shrinks by cos θ per step."""
    r, cos = _ddim_geometry(mu, s)
    down = [1.0] + list(levels)
    z = (x_T - math.sqrt(levels[-1]) * mu) / r(levels[-1])
    for i in range(len(levels), 0, -1):
        z = z * cos(down[i], down[i - 1])
    return mu + s * z


@pytest.mark.parametrize("name, skip_last", [("cosine1000", False), ("linear100", False), ("linear100", True),
                                             ("cosine4000-respaced", False), ("cosine4000-respaced", True),
                                             ("linear100-ddim20", False)])
def test_ddim_round_trip_exact_for_gaussian_data(name, skip_last):
    """ddim_reverse_sample_loop then ddim_sample_loop (η = 0, no clipping) with the exact ε of
    Gaussian data equals the closed-form prediction of `predicted_ddim_round_trip` to 1e-10, and
    the model receives the ORIGINAL timestep indices in order (ascending, then descending)."""
    d = DIFFUSIONS[name]()
    mu, s = 0.3, 0.5
    model = GaussianDataEps(d, mu, s)
    x0 = mu + s * randn(2, 1, 3, 3, seed=40)
    latent = d.ddim_reverse_sample_loop(model, x0, skip_last=skip_last)
    x = d.ddim_sample_loop(model, x0.shape, noise=latent, clip_denoised=False)
    ref_latent, ref_x = predicted_ddim_round_trip(alpha_bar(d), x0, mu, s, skip_last)
    torch.testing.assert_close(latent, ref_latent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x, ref_x, rtol=1e-10, atol=1e-10)
    seen = torch.stack([t[0] for t in model.seen]).numpy()
    tm = np.asarray(d.timestep_map)
    n_rev = d.num_timesteps - (1 if skip_last else 0)
    np.testing.assert_array_equal(seen[:n_rev], tm[:n_rev])
    np.testing.assert_array_equal(seen[n_rev:], tm[::-1])


def test_ddim_inversion_converges_first_order():
    """DDIM inversion is exact in the limit of small steps (ADM app. H): the round-trip error
    x_0 -> latent -> x_0 of the Gaussian-data model halves when the number of steps doubles
    (Euler, first order) and is below 4e-3 at 1000 steps."""
    mu, s = 0.3, 0.5
    x0 = mu + s * randn(2, 1, 3, 3, seed=41)
    errors = []
    for T in (250, 500, 1000):
        d = make_diffusion("cosine", T)
        model = GaussianDataEps(d, mu, s)
        x = d.ddim_sample_loop(model, x0.shape, noise=d.ddim_reverse_sample_loop(model, x0),
                               clip_denoised=False)
        errors.append((x - x0).abs().max().item())
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2
    assert errors[2] < 4e-3


@pytest.mark.parametrize("name", ["linear100", "linear100-ddim20"])
def test_ddim_reverse_step_inverts_sampling_step_for_constant_eps(name):
    """When ε̂ does not change between the two points, DDIM inversion is exact: the reverse step
    at t (level ᾱ_t -> ᾱ_{t+1}) followed by the sampling step at t+1 returns the input."""
    d = DIFFUSIONS[name]()
    e = randn(1, 1, 2, 2, seed=42)
    for i in range(d.num_timesteps - 1):
        x = randn(1, 1, 2, 2, seed=43 + i)
        t = torch.tensor([i])
        up = d.ddim_reverse_sample(fixed_output(e), x, t)["sample"]
        back = d.ddim_sample(fixed_output(e), up, t + 1, clip_denoised=False)["sample"]
        torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["linear1000", "linear100-ddim20"])
def test_ddim_eta_one_is_ancestral_sampling(name):
    """DDIM with η = 1 has σ_t² = β̃_t and the DDPM posterior (DDIM sec. 4.1), so one step equals
    p_sample with fixed_small variance drawing the same noise."""
    d = DIFFUSIONS[name](var_type="fixed_small")
    N = d.num_timesteps
    t = torch.arange(N)
    model = GaussianDataEps(d, 0.1, 0.4)
    x = randn(N, 1, 2, 2, seed=44)
    a = d.ddim_sample(model, x, t, clip_denoised=False, eta=1.0,
                      generator=torch.Generator().manual_seed(3))["sample"]
    b = d.p_sample(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(3))["sample"]
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_p_sample_step_and_model_timesteps():
    """p_sample draws x_{t-1} = μ + σ·z (no noise at t = 0) with z from the given generator, and
    p_sample_loop calls the model with the ORIGINAL indices of a respaced diffusion, descending."""
    d = make_diffusion("cosine", 200, respacing="7,3", var_type="fixed_large")
    model = GaussianDataEps(d, 0.2, 0.3)
    N = d.num_timesteps
    x, t = randn(N, 1, 2, 2, seed=45), torch.arange(N)
    res = d.p_mean_variance(model, x, t)
    step = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(9))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    nonzero = (t > 0).to(F64).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(step["sample"], res["mean"] + nonzero * res["variance"].sqrt() * z,
                               rtol=1e-12, atol=1e-12)
    model.seen.clear()
    out = d.p_sample_loop(model, (2, 1, 2, 2), noise=randn(2, 1, 2, 2, seed=46))
    assert out.dtype == F64 and out.abs().max() <= 1.0 + 1e-12
    seen = torch.stack([s[0] for s in model.seen]).numpy()
    np.testing.assert_array_equal(seen, np.asarray(space_timesteps(200, "7,3"))[::-1])
    model.seen.clear()
    d.training_losses(model, randn(3, 1, 2, 2), torch.tensor([0, 4, 9]))
    np.testing.assert_array_equal(model.seen[0].numpy(), np.asarray(d.timestep_map)[[0, 4, 9]])


def test_p_sample_loop_start_continues_a_chain_bit_for_bit():
    """p_sample_loop(start=k, noise=x_k) takes the same steps k, ..., 0 as the full loop took
    from x_k on (same generator state there): the full chain, split at k, gives the same x_0;
    the model sees the original indices from step k down; a start outside [0, T' − 1] is refused."""
    d = make_diffusion("cosine", 200, respacing="10", var_type="fixed_large")
    model = GaussianDataEps(d, 0.2, 0.3)
    k, gen = 4, torch.Generator().manual_seed(5)
    saved = {}

    def keep(step):
        if step["i"] == k + 1:   # its sample is the state at step k
            saved.update(x=step["sample"].clone(), state=gen.get_state())
    full = d.p_sample_loop(model, (2, 1, 2, 2), noise=randn(2, 1, 2, 2, seed=47), generator=gen,
                           callback=keep)
    model.seen.clear()
    gen2 = torch.Generator()
    gen2.set_state(saved["state"])
    rest = d.p_sample_loop(model, (2, 1, 2, 2), noise=saved["x"], generator=gen2, start=k)
    torch.testing.assert_close(rest, full, rtol=0, atol=0)
    seen = torch.stack([s[0] for s in model.seen]).numpy()
    np.testing.assert_array_equal(seen, np.asarray(d.timestep_map)[k::-1])
    for bad in (-1, d.num_timesteps):
        with pytest.raises(ValueError, match=f"start must be a step index in \\[0, 9\\], got {bad}"):
            d.p_sample_loop(model, (1, 1, 2, 2), start=bad)


# --------------------------------------------------------------------------------- configuration
def exactly(message):
    """A regex matching exactly `message` (for pytest.raises(match=...))."""
    return "^" + re.escape(message) + "$"


@pytest.mark.parametrize("kw, message", [
    (dict(mean_type="score"), "unknown mean type 'score': choose one of eps, x0, v"),
    (dict(var_type="fixed"),
     "unknown variance type 'fixed': choose one of fixed_small, fixed_large, learned, learned_range"),
    (dict(loss_type="l1"), "unknown loss type 'l1': choose one of mse, hybrid, kl"),
    (dict(p2_gamma=-0.5), "--p2-gamma and --min-snr-gamma must be >= 0 (0 turns them off)"),
    (dict(min_snr_gamma=-1.0), "--p2-gamma and --min-snr-gamma must be >= 0 (0 turns them off)"),
    (dict(p2_gamma=1.0, min_snr_gamma=5.0),
     "choose one loss weighting: --p2-gamma or --min-snr-gamma, not both"),
    (dict(p2_gamma=1.0, loss_type="kl", var_type="learned"),
     "P2 and Min-SNR-γ weight the L_simple term: use loss type mse or hybrid"),
    (dict(min_snr_gamma=5.0, loss_type="kl", var_type="learned"),
     "P2 and Min-SNR-γ weight the L_simple term: use loss type mse or hybrid"),
    (dict(p2_gamma=1.0, p2_k=0.0), "--p2-k must be positive, got 0.0"),
    (dict(p2_gamma=0.5, p2_k=-2), "--p2-k must be positive, got -2.0"),
])
def test_bad_options_are_usage_errors(kw, message):
    """Every rejected option is a UsageError with its one-line message (what the CLI prints)."""
    with pytest.raises(UsageError, match=exactly(message)):
        GaussianDiffusion(beta_schedule("linear", 50), **kw)


@pytest.mark.parametrize("betas", [[[0.1, 0.2], [0.1, 0.2]], 0.1, [0.1, 0.0], [0.1, -0.2],
                                   [0.1, 1.0], [1.5, 0.1], [0.1, float("nan")]])
def test_betas_outside_open_unit_interval_rejected(betas):
    """β must be a 1-D table with every value in the OPEN interval (0, 1): a 2-D or 0-D table,
    β = 0, β < 0, β = 1, β > 1 and NaN are each a UsageError."""
    with pytest.raises(UsageError, match=exactly("betas must be a 1-D array with values in (0, 1)")):
        GaussianDiffusion(betas)


def test_betas_close_to_the_ends_accepted():
    """β just inside (0, 1) is valid: ᾱ = Π(1 - β) follows exactly."""
    betas = [1e-12, 0.5, 1 - 1e-9]
    d = GaussianDiffusion(betas)
    _, var, _ = d.q_mean_variance(torch.zeros(3, 1, dtype=F64), torch.arange(3))
    torch.testing.assert_close(var.squeeze(1), torch.tensor(1 - np.cumprod(1 - np.array(betas))),
                               rtol=1e-12, atol=0)


def test_betas_are_read_as_float64():
    """β given in float32 (a numpy array or a torch tensor) are widened to float64 and every table
    is computed in float64: 1 - ᾱ_t of q(x_t | x_0) equals 1 - Π(1 - β) of the widened values to
    1e-13, not to float32's round-off."""
    b32 = beta_schedule("cosine", 50).astype(np.float32)
    ref = torch.as_tensor(1 - np.cumprod(1 - b32.astype(np.float64)))
    for betas in (b32, torch.from_numpy(b32)):
        d = GaussianDiffusion(betas)
        _, var, _ = d.q_mean_variance(torch.zeros(50, 1, dtype=F64), torch.arange(50))
        torch.testing.assert_close(var.squeeze(1), ref, rtol=1e-13, atol=0)


def test_explicit_timesteps_are_a_checked_set():
    """`timesteps` is a set of original indices: given unsorted and with repeats they are kept
    sorted, once each; the model receives them and ᾱ of step i is the original ᾱ at the i-th kept
    index. An empty list, or an index outside [0, T), is a UsageError (0 and T - 1 are fine)."""
    betas = beta_schedule("linear", 100)
    a = np.cumprod(1 - betas)
    d = GaussianDiffusion(betas, timesteps=[70, 3, np.int64(99), 3, 0, 70])
    keep = [0, 3, 70, 99]
    assert d.num_timesteps == 4
    np.testing.assert_array_equal(d.model_timesteps(torch.arange(4)).numpy(), keep)
    _, var, _ = d.q_mean_variance(torch.zeros(4, 1, dtype=F64), torch.arange(4))
    torch.testing.assert_close(var.squeeze(1), torch.as_tensor(1 - a[keep]), rtol=1e-12, atol=0)
    for bad in ([], [-1, 5], [5, 100]):
        with pytest.raises(UsageError, match=exactly("timesteps must lie in [0, 100)")):
            GaussianDiffusion(betas, timesteps=bad)


@pytest.mark.parametrize("betas, timesteps", [([0.3], None), (beta_schedule("linear", 100), [40]),
                                              ([0.2, 0.4], None), (beta_schedule("linear", 100), [10, 60])])
def test_variances_with_one_or_two_steps(betas, timesteps):
    """With two steps the conventions of longer schedules hold (β̃_1 stands in for β̃_0 = 0 in the
    log variance, and for β_0 in fixed_large). With a single step there is no β̃_1: the log
    variance of every var_type is log β_0 (β_0 of the kept step: 1 - ᾱ of the kept index, and
    learned_range interpolates between two equal ends), fixed_large's variance is β_0 and
    fixed_small's is β̃_0 = 0."""
    d0 = GaussianDiffusion(betas, timesteps=timesteps)
    beta, beta_tilde = _reference_variances(d0)
    N = d0.num_timesteps
    if N == 1:
        small_log, large = np.log(beta), beta
    else:
        small_log = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
        large = np.append(beta_tilde[1], beta[1:])
    t = torch.arange(N)
    x = randn(N, 1, 2, 2, seed=50)
    v = rand(N, 1, 2, 2, seed=51)
    refs = {"fixed_small": (at(beta_tilde, t, x), at(small_log, t, x)),
            "fixed_large": (at(large, t, x), at(np.log(large), t, x))}
    for var_type in ("fixed_small", "fixed_large", "learned_range"):
        d = GaussianDiffusion(betas, var_type=var_type, timesteps=timesteps)
        out = torch.cat([x, v], 1) if var_type == "learned_range" else x
        res = d.p_mean_variance(None, x, t, clip_denoised=False, model_output=out)
        if var_type == "learned_range":
            frac = (v + 1) / 2
            ref_log = frac * at(np.log(beta), t, x) + (1 - frac) * at(small_log, t, x)
            ref_var = ref_log.exp()
        else:
            ref_var, ref_log = (r.expand_as(x) for r in refs[var_type])
        torch.testing.assert_close(res["variance"], ref_var, rtol=1e-12, atol=0)
        torch.testing.assert_close(res["log_variance"], ref_log, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------- loss weighting
def _snr(d):
    a = alpha_bar(d)
    return a / (1 - a)


def _weight_of_loss(d, seed=52):
    """loss / mse of training_losses at every step (the weight of L_simple), and the mse."""
    N = d.num_timesteps
    t = torch.arange(N)
    x0, eps = rand(N, 1, 2, 2, seed=seed), randn(N, 1, 2, 2, seed=seed + 1)
    out = randn(N, 1, 2, 2, seed=seed + 2)
    if d.learns_variance:
        out = torch.cat([out, rand(N, 1, 2, 2, seed=seed + 3)], 1)
    res = d.training_losses(fixed_output(out), x0, t, noise=eps)
    mse = res["mse"]
    loss = res["loss"] - res["vb"] if "vb" in res else res["loss"]
    return loss / mse, res


@pytest.mark.parametrize("make, gamma, k", [
    (lambda: GaussianDiffusion(beta_schedule("linear", 100), timesteps=range(0, 100, 9), p2_gamma=0.7),
     0.7, 1.0),
    (lambda: make_diffusion("cosine", 60, p2_gamma=1.3), 1.3, 1.0),
    (lambda: make_diffusion("linear", 50, p2_gamma=0.5, p2_k=2.5, var_type="learned", loss_type="hybrid"),
     0.5, 2.5),
])
def test_p2_weight_closed_form(make, gamma, k):
    """P2 (Choi et al. 2022): L_simple is weighted by 1/(k + SNR(t))^γ, SNR = ᾱ_t/(1 - ᾱ_t) of the
    (respaced) step, k = 1 by default (in GaussianDiffusion and make_diffusion); the mse term is
    unweighted and a hybrid VLB term is added unweighted."""
    d = make()
    w, _ = _weight_of_loss(d)
    torch.testing.assert_close(w, torch.as_tensor(1 / (k + _snr(d)) ** gamma), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["mse", "hybrid"])
def test_min_snr_weight_closed_form(mean_type, loss_type):
    """Min-SNR-γ (Hang et al. 2023) weights every parameterisation as min(SNR, γ)·mean((x̂_0 -
    x_0)²): with x̂_0 from the model output by the closed forms of x_t = sqrt(ᾱ)x_0 +
    sqrt(1 - ᾱ)ε, loss = min(SNR, γ)·mean((x̂_0 - x_0)²) at steps on both sides of SNR = γ (plus
    the unweighted VLB term for hybrid)."""
    var_type = "learned_range" if loss_type == "hybrid" else "fixed_small"
    d = make_diffusion("linear", 100, respacing="25", mean_type=mean_type, var_type=var_type,
                       loss_type=loss_type, min_snr_gamma=2.5)
    snr = _snr(d)
    assert snr.max() > 2.5 > snr.min()
    N = d.num_timesteps
    t = torch.arange(N)
    x0, eps = rand(N, 1, 2, 2, seed=54), randn(N, 1, 2, 2, seed=55)
    mean_out = randn(N, 1, 2, 2, seed=56)
    out = torch.cat([mean_out, rand(N, 1, 2, 2, seed=57)], 1) if d.learns_variance else mean_out
    res = d.training_losses(fixed_output(out), x0, t, noise=eps)
    a = at(alpha_bar(d), t, x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = {"eps": (xt - (1 - a).sqrt() * mean_out) / a.sqrt(), "x0": mean_out,
              "v": a.sqrt() * xt - (1 - a).sqrt() * mean_out}[mean_type]
    expect = torch.as_tensor(np.minimum(snr, 2.5)) * (x0_hat - x0).pow(2).mean((1, 2, 3))
    loss = res["loss"] - res["vb"] if loss_type == "hybrid" else res["loss"]
    torch.testing.assert_close(loss, expect, rtol=1e-9, atol=1e-14)


def test_min_snr_weight_at_zero_snr():
    """Where ᾱ_t underflows to 0 (SNR = 0), the Min-SNR-γ weight of the ε loss is its limit
    min(SNR, γ)/SNR → 1 (x0: min(0, γ) = 0; v: 0/(0 + 1) = 0), computed without a division error
    even when numpy raises on division by zero."""
    # 1 - β = 2^-40 (x25), 2^-22, 2^-53: ᾱ = 2^-1000, 2^-1022 (the smallest normal), then 0
    betas = np.array([1 - 2.0 ** -40] * 25 + [1 - 2.0 ** -22, 1 - 2.0 ** -53])
    for mean_type, last in (("eps", 1.0), ("x0", 0.0), ("v", 0.0)):
        with np.errstate(divide="ignore"):   # 1/ᾱ in the tables is inf at the last step
            d = GaussianDiffusion(betas, mean_type=mean_type, min_snr_gamma=1.5)
        assert d.alphas_cumprod[-1] == 0 and d.alphas_cumprod[-2] > 0
        with np.errstate(divide="raise"):
            w = d._mse_weight_table()
        assert w[-1] == last
        np.testing.assert_allclose(w[-2], {"eps": 1.0, "x0": 2.0 ** -1022, "v": 2.0 ** -1022}[mean_type],
                                   rtol=1e-12)
        x0 = torch.full((1, 1, 2, 2), 0.5, dtype=F64)
        eps = torch.ones(1, 1, 2, 2, dtype=F64)
        res = d.training_losses(fixed_output(torch.zeros_like(x0)), x0, torch.tensor([26]), noise=eps)
        assert res["loss"].item() == last * res["mse"].item()


# --------------------------------------------------------------------------------- defaults
def test_constructor_defaults():
    """GaussianDiffusion(betas) predicts ε (the zero model's mse is mean(ε²)), uses β̃_t
    (fixed_small) and plain L_simple (loss = mse, bit for bit); with a learned variance, hybrid
    uses λ = 0.001 (vb = (T/1000)·L_t) and the stop-gradient (∂loss/∂mean output =
    ∂L_simple/∂mean output)."""
    betas = beta_schedule("linear", 50)
    d = GaussianDiffusion(betas)
    t = torch.arange(50)
    x0, eps = rand(50, 1, 2, 2, seed=60), randn(50, 1, 2, 2, seed=61)
    res = d.training_losses(fixed_output(torch.zeros_like(x0)), x0, t, noise=eps)
    torch.testing.assert_close(res["mse"], eps.pow(2).mean((1, 2, 3)), rtol=1e-12, atol=0)
    assert torch.equal(res["loss"], res["mse"])
    _, beta_tilde = _reference_variances(d)
    var = d.p_mean_variance(fixed_output(eps), x0, t)["variance"]
    torch.testing.assert_close(var, at(beta_tilde, t, x0).expand_as(x0), rtol=1e-12, atol=0)

    h = GaussianDiffusion(betas, var_type="learned_range", loss_type="hybrid")
    x0, noise, t, out = _hybrid_setup(h, seed=62)
    res = h.training_losses(fixed_output(out), x0, t, noise=noise)
    xt = (at(alpha_bar(h), t, x0).sqrt() * x0 + (1 - at(alpha_bar(h), t, x0)).sqrt() * noise)
    L_t = reference_L_t_bpd(h, x0, xt, t, out[:, :2].detach(), out[:, 2:].detach())
    torch.testing.assert_close(res["vb"][1:], L_t[1:] * 50 / 1000, rtol=1e-8, atol=0)
    g, = torch.autograd.grad(res["loss"].sum(), out)
    torch.testing.assert_close(g[:, :2], 2 * (out[:, :2] - noise).detach() / (2 * 9), rtol=1e-12, atol=0)


def test_make_diffusion_defaults_and_options():
    """make_diffusion() is DDPM's linear schedule with T = 1000 (β = 1e-4 ... 0.02, evenly
    spaced); respacing "" and "none" mean no respacing; `alphas_cumprod` gives a diffusion with
    exactly that ᾱ; hybrid_lambda reaches the loss: vb = λ·T·L_t."""
    def one_minus_alpha_bar(d):
        N = d.num_timesteps
        return d.q_mean_variance(torch.zeros(N, 1, dtype=F64), torch.arange(N))[1].squeeze(1)

    d = make_diffusion()
    ref = 1 - np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    torch.testing.assert_close(one_minus_alpha_bar(d), torch.as_tensor(ref), rtol=1e-12, atol=0)
    for respacing in ("", "none", None):
        d = make_diffusion("cosine", 30, respacing=respacing)
        assert d.num_timesteps == 30
        np.testing.assert_array_equal(d.model_timesteps(torch.arange(30)).numpy(), np.arange(30))
    ac = np.array([0.99, 0.9, 0.7, 0.4, 0.1, 0.01])
    d = make_diffusion(alphas_cumprod=ac)
    torch.testing.assert_close(one_minus_alpha_bar(d), torch.as_tensor(1 - ac), rtol=1e-12, atol=0)

    d = make_diffusion("linear", 50, var_type="learned_range", loss_type="hybrid", hybrid_lambda=0.25)
    x0, noise, t, out = _hybrid_setup(d, seed=63)
    out = out.detach()
    res = d.training_losses(fixed_output(out), x0, t, noise=noise)
    a = at(alpha_bar(d), t, x0)
    L_t = reference_L_t_bpd(d, x0, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, out[:, :2], out[:, 2:])
    torch.testing.assert_close(res["vb"][1:], 0.25 * 50 * L_t[1:], rtol=1e-8, atol=0)


# --------------------------------------------------------------------------------- errors
def test_output_channel_and_hybrid_variance_errors():
    """A learned variance needs 2C output channels (ValueError naming both counts); loss type
    hybrid without a learned variance is a UsageError."""
    d = make_diffusion("linear", 50, var_type="learned_range")
    x = torch.zeros(2, 3, 4, 5, dtype=F64)
    with pytest.raises(ValueError, match=exactly("var_type 'learned_range' needs 6 output channels, "
                                                 "the model gave 3")):
        d.p_mean_variance(fixed_output(torch.zeros_like(x)), x, torch.tensor([1, 2]))
    d = make_diffusion("linear", 50, loss_type="hybrid")
    with pytest.raises(UsageError, match=exactly("loss type 'hybrid' needs a learned variance "
                                                 "(var_type learned or learned_range)")):
        d.training_losses(fixed_output(torch.zeros_like(x)), x, torch.tensor([1, 2]))


# --------------------------------------------------------------------------------- model_kwargs
class ClassModel:
    """An ε-model with a learned_range channel that needs a class label y: ε̂ = 0.4 tanh(x) +
    0.1 y, v = tanh(0.5 x). Counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        eps = 0.4 * torch.tanh(x) + 0.1 * y.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(0.5 * x)], 1)


@pytest.mark.parametrize("loss_type", ["kl", "hybrid"])
def test_model_kwargs_reach_the_model_once(loss_type):
    """training_losses and vb_terms_bpd pass model_kwargs to the model, and training_losses calls
    the model once (the VLB term reuses its output): kl = T·L_t and hybrid = mse + (T/1000)·L_t,
    with L_t from the closed forms of `reference_L_t_bpd`."""
    d = make_diffusion("linear", 50, var_type="learned_range", loss_type=loss_type)
    t = torch.tensor([1, 7, 25, 49])
    x0, noise = torch.round(rand(4, 1, 3, 3, seed=64) * 127.5) / 127.5, randn(4, 1, 3, 3, seed=65)
    y = torch.tensor([0, 1, 2, 3])
    a = at(alpha_bar(d), t, x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = ClassModel()(xt, t, y)
    L_t = reference_L_t_bpd(d, x0, xt, t, out[:, :1], out[:, 1:])
    model = ClassModel()
    res = d.training_losses(model, x0, t, noise=noise, model_kwargs=dict(y=y))
    assert model.calls == 1
    if loss_type == "kl":
        torch.testing.assert_close(res["loss"], 50 * L_t, rtol=1e-8, atol=0)
    else:
        mse = (out[:, :1] - noise).pow(2).mean((1, 2, 3))
        torch.testing.assert_close(res["loss"], mse + L_t * 50 / 1000, rtol=1e-8, atol=0)
    vb = d.vb_terms_bpd(model, x0, xt, t, clip_denoised=False, model_kwargs=dict(y=y))["output"]
    torch.testing.assert_close(vb, L_t, rtol=1e-8, atol=0)


def test_vb_terms_bpd_clips_by_default():
    """vb_terms_bpd clips x̂_0 to [-1, 1] unless told not to: for an x_0-model (fixed_small) the
    term is KL(q(x_{t-1}|x_t,x_0) || N(μ̃(x_t, clip(x̂_0)), β̃_t)), and pred_xstart is clip(x̂_0)."""
    d = make_diffusion("linear", 50, mean_type="x0")
    t = torch.tensor([1, 10, 30, 49])
    x0, xt = rand(4, 1, 3, 3, seed=66), randn(4, 1, 3, 3, seed=67)
    x0_hat = rand(4, 1, 3, 3, seed=68, low=-2.5, high=2.5)
    res = d.vb_terms_bpd(fixed_output(x0_hat), x0, xt, t)
    clipped = x0_hat.clamp(-1, 1)
    q_mean, q_var = bayes_posterior(d, x0, xt, t)
    p_mean, _ = bayes_posterior(d, clipped, xt, t)
    ref = kl_divergence(Normal(q_mean, q_var.sqrt()), Normal(p_mean, q_var.sqrt())).mean((1, 2, 3)) / LN2
    torch.testing.assert_close(res["output"], ref, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(res["pred_xstart"], clipped, rtol=0, atol=0)


# --------------------------------------------------------------------------------- denoised_fn
def _denoise_setup():
    """A respaced diffusion, x_t, an ε output, and x̂_0' = clip(f(x̂_0)) for f(x) = 0.5x + 0.7
    (which moves x̂_0 and pushes part of it above 1, so that the clip after f matters)."""
    d = make_diffusion("linear", 100, respacing="ddim20")
    N = d.num_timesteps
    t = torch.arange(N)
    x, eps = randn(N, 1, 2, 2, seed=70), randn(N, 1, 2, 2, seed=71)
    a = at(alpha_bar(d), t, x)
    x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
    x0_new = (0.5 * x0_hat + 0.7).clamp(-1, 1)
    assert torch.any(0.5 * x0_hat + 0.7 > 1) and torch.any((0.5 * x0_hat + 0.7).abs() < 1)
    eps_new = (x - a.sqrt() * x0_new) / (1 - a).sqrt()   # the ε that the clipped x̂_0 implies
    return d, t, x, eps, a, x0_new, eps_new


def denoise(x):
    return 0.5 * x + 0.7


def test_denoised_fn_before_clip_in_every_step():
    """denoised_fn is applied to x̂_0 before the [-1, 1] clip, and every step uses the result
    x̂_0': p_mean_variance's mean is μ̃(x_t, x̂_0') (and model_output is the raw output);
    p_sample adds σ_t·z (β̃_t, no noise at t = 0); DDIM (η = 0) goes to sqrt(ᾱ_{t-1})x̂_0' +
    sqrt(1 - ᾱ_{t-1})ε' and its reverse step to sqrt(ᾱ_{t+1})x̂_0' + sqrt(1 - ᾱ_{t+1})ε' (ᾱ = 0
    after the last step), ε' = (x_t - sqrt(ᾱ_t)x̂_0')/sqrt(1 - ᾱ_t); each returns x̂_0'."""
    d, t, x, eps, a, x0_new, eps_new = _denoise_setup()
    model = fixed_output(eps)
    res = d.p_mean_variance(model, x, t, denoised_fn=denoise)
    torch.testing.assert_close(res["pred_xstart"], x0_new, rtol=1e-12, atol=1e-12)
    ref_mean, ref_var = bayes_posterior(d, x0_new[1:], x[1:], t[1:])
    torch.testing.assert_close(res["mean"][1:], ref_mean, rtol=1e-9, atol=1e-12)
    assert res["model_output"] is eps

    step = d.p_sample(model, x, t, denoised_fn=denoise, generator=torch.Generator().manual_seed(4))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(step["sample"][1:], ref_mean + ref_var.sqrt() * z[1:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(step["sample"][:1], x0_new[:1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step["pred_xstart"], x0_new, rtol=1e-12, atol=1e-12)

    a_prev = torch.cat([torch.ones(1, 1, 1, 1, dtype=F64), a[:-1]])
    step = d.ddim_sample(model, x, t, denoised_fn=denoise)
    torch.testing.assert_close(step["sample"], a_prev.sqrt() * x0_new + (1 - a_prev).sqrt() * eps_new,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(step["pred_xstart"], x0_new, rtol=1e-12, atol=1e-12)

    a_next = torch.cat([a[1:], torch.zeros(1, 1, 1, 1, dtype=F64)])
    step = d.ddim_reverse_sample(model, x, t, clip_denoised=True, denoised_fn=denoise)
    torch.testing.assert_close(step["sample"], a_next.sqrt() * x0_new + (1 - a_next).sqrt() * eps_new,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(step["pred_xstart"], x0_new, rtol=1e-12, atol=1e-12)


def test_ddim_reverse_sample_passes_model_kwargs():
    """ddim_reverse_sample calls the model with model_kwargs (here a class label) and, with
    clip_denoised, clips x̂_0 before the step to level ᾱ_{t+1}."""
    d = make_diffusion("linear", 100, respacing="ddim20", var_type="learned_range")
    N = d.num_timesteps
    t = torch.arange(N)
    x = 3 * randn(N, 1, 2, 2, seed=72)
    y = torch.arange(N) % 3
    eps = ClassModel()(x, t, y)[:, :1]
    a = at(alpha_bar(d), t, x)
    x0_hat = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    assert torch.any(x0_hat.abs() == 1)
    eps_new = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
    a_next = torch.cat([a[1:], torch.zeros(1, 1, 1, 1, dtype=F64)])
    step = d.ddim_reverse_sample(ClassModel(), x, t, clip_denoised=True, model_kwargs=dict(y=y))
    torch.testing.assert_close(step["sample"], a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps_new,
                               rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------- DDIM noise
def test_ddim_eta_noise_and_temperature():
    """DDIM eq. 12 with η > 0: x_{t-1} = sqrt(ᾱ_{t-1})x̂_0 + sqrt(1 - ᾱ_{t-1} - σ²)ε̂ + τ·σ·z,
    σ = η·sqrt((1 - ᾱ_{t-1})/(1 - ᾱ_t))·sqrt(1 - ᾱ_t/ᾱ_{t-1}), the temperature τ scaling only
    the added noise (none at t = 0). With η = 0 no noise is drawn: the generator's state is left
    as it was (so later draws from it are those it would give had the step not run)."""
    d = make_diffusion("linear", 100, respacing="ddim20")
    N = d.num_timesteps
    t = torch.arange(N)
    x, eps = randn(N, 1, 2, 2, seed=73), randn(N, 1, 2, 2, seed=74)
    a = at(alpha_bar(d), t, x)
    a_prev = torch.cat([torch.ones(1, 1, 1, 1, dtype=F64), a[:-1]])
    x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
    eta, tau = 0.6, 0.3
    sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    nonzero = (t > 0).to(F64).reshape(-1, 1, 1, 1)
    ref = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).sqrt() * eps + nonzero * tau * sigma * z
    got = d.ddim_sample(fixed_output(eps), x, t, clip_denoised=False, eta=eta, noise_scale=tau,
                        generator=torch.Generator().manual_seed(8))["sample"]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(8)
    state = g.get_state()
    d.ddim_sample(fixed_output(eps), x, t, clip_denoised=False, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)


def test_ddim_sample_loop_draws_x_T_from_the_generator():
    """Without `noise`, the sampling loops start from x_T ~ N(0, I) of the given shape and dtype
    drawn from `generator`: DDIM (η = 0) with the exact ε of Gaussian data then ends where the
    closed form `predicted_ddim_sample` takes that x_T."""
    d = make_diffusion("linear", 100, respacing="ddim20")
    mu, s = 0.3, 0.5
    x = d.ddim_sample_loop(GaussianDataEps(d, mu, s), [2, 1, 3, 3], clip_denoised=False, dtype=F64,
                           generator=torch.Generator().manual_seed(11))
    assert x.dtype == F64 and x.shape == (2, 1, 3, 3)
    x_T = torch.randn((2, 1, 3, 3), generator=torch.Generator().manual_seed(11), dtype=F64)
    torch.testing.assert_close(x, predicted_ddim_sample(alpha_bar(d), x_T, mu, s), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------- guidance
def _guidance_setup():
    d = make_diffusion("linear", 100, respacing="10", var_type="fixed_large")
    N = d.num_timesteps
    t = torch.arange(N)
    x, eps = randn(N, 1, 2, 2, seed=75), 0.5 * randn(N, 1, 2, 2, seed=76)
    seen = []

    def cond_fn(x_in, t_model, scale=1.0):
        """g = scale·(0.3 tanh(x) + 0.01·t): depends on where and at which timestep it is taken."""
        seen.append(t_model.clone())
        return scale * (0.3 * torch.tanh(x_in) + 0.01 * t_model.to(F64).reshape(-1, 1, 1, 1))
    return d, t, x, eps, cond_fn, seen


def test_condition_mean_point_and_timestep():
    """ADM Algorithm 1: the mean becomes μ + Σ·g. By default g = cond_fn(x_t, timestep_map[t],
    **model_kwargs); with at_mean, g = cond_fn(μ, timestep_map[t - 1]), at t = 0 (no step below)
    with timestep_map[0]. Variances are unchanged."""
    d, t, x, eps, cond_fn, seen = _guidance_setup()
    out = d.p_mean_variance(fixed_output(eps), x, t, clip_denoised=False)
    tm = torch.as_tensor(space_timesteps(100, "10"))
    res = d.condition_mean(cond_fn, out, x, t, model_kwargs=dict(scale=2.0))
    g = 2.0 * (0.3 * torch.tanh(x) + 0.01 * tm[t].to(F64).reshape(-1, 1, 1, 1))
    ref = out["mean"] + out["variance"] * g
    torch.testing.assert_close(res["mean"], ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(seen[-1].numpy(), tm.numpy())
    assert res["variance"] is out["variance"] and res["log_variance"] is out["log_variance"]
    below = tm[(t - 1).clamp(min=0)]
    res = d.condition_mean(cond_fn, out, x, t, at_mean=True)
    g = 0.3 * torch.tanh(out["mean"]) + 0.01 * below.to(F64).reshape(-1, 1, 1, 1)
    ref = out["mean"] + out["variance"] * g
    torch.testing.assert_close(res["mean"], ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(seen[-1].numpy(), below.numpy())


def test_condition_score_shifts_x0_and_mean():
    """ADM Algorithm 2 (eq. 60): ε̂' = ε̂ - sqrt(1 - ᾱ_t)·g with g = cond_fn(x_t, timestep_map[t]);
    x̂_0' = (x_t - sqrt(1 - ᾱ_t)ε̂')/sqrt(ᾱ_t) and the mean is μ̃(x_t, x̂_0'); the variance
    entries of `out` are kept."""
    d, t, x, eps, cond_fn, seen = _guidance_setup()
    out = d.p_mean_variance(fixed_output(eps), x, t, clip_denoised=False)
    res = d.condition_score(cond_fn, out, x, t)
    tm = torch.as_tensor(space_timesteps(100, "10"))
    a = at(alpha_bar(d), t, x)
    g = 0.3 * torch.tanh(x) + 0.01 * tm[t].to(F64).reshape(-1, 1, 1, 1)
    x0_new = (x - (1 - a).sqrt() * (eps - (1 - a).sqrt() * g)) / a.sqrt()
    torch.testing.assert_close(res["pred_xstart"], x0_new, rtol=1e-9, atol=1e-12)
    ref_mean, _ = bayes_posterior(d, x0_new[1:], x[1:], t[1:])
    torch.testing.assert_close(res["mean"][1:], ref_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res["mean"][:1], x0_new[:1], rtol=1e-9, atol=1e-12)
    assert res["variance"] is out["variance"] and res["log_variance"] is out["log_variance"]

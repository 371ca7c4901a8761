"""σ-space samplers, denoisers and noise levels, proved on exact denoisers (float64).

Data N(μ, C) has the exact denoiser D(x; σ) = μ + C(C + σ²I)^{-1}(x − μ), and its
probability-flow ODE dx/dσ = (x − D)/σ the closed-form solution
x(σ) = μ + V diag(sqrt((λ + σ²)/(λ + σ0²))) Vᵀ (x(σ0) − μ), with C = V diag(λ) Vᵀ.
A finite dataset {p_k} has the ideal denoiser D(x; σ) = Σ_k softmax_k(−|x − p_k|²/2σ²) p_k.
"""
import inspect
import math
import re

import numpy as np
import pytest
import torch

from gaussdiff.sampling import samplers as S
from gaussdiff.cli import main as cli_main
from gaussdiff.sampling.denoisers import ClipDenoised, DiscreteDenoiser
from gaussdiff.diffusion import make_diffusion
from gaussdiff.errors import UsageError
from gaussdiff.modeldir import CONFIG_NAME, WEIGHTS_NAME, Pipeline, atomic_write_json, \
    make_config, save_tensors
from gaussdiff.nn.unet import UNetConfig, UNetModel
from gaussdiff.rng import per_sample_generators
from gaussdiff.diffusion.schedules import (EDMODE, VPODE, beta_schedule, iddpm_sigmas, iddpm_u,
                                           karras_sigmas, ve_sigmas, vp_sigmas)

F64 = torch.float64
MU = torch.tensor([0.5, -1.0], dtype=F64)
C = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=F64)
LAM, V = torch.linalg.eigh(C)
POINTS = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]], dtype=F64)


def _rowwise(A, x):
    """x @ A with a per-row reduction, so row i's bits do not depend on the batch size."""
    return (x[:, :, None] * A[None]).sum(1)


def gauss_D(x, sigma):
    """The exact denoiser of N(MU, C)."""
    shrink = LAM / (LAM + sigma[:, None] ** 2)
    return MU + _rowwise(V.T, _rowwise(V, x - MU) * shrink)


def gauss_ode(x0, sigma0, sigma1):
    """The exact probability-flow ODE solution from (x0, σ0) to σ1 for N(MU, C)."""
    ratio = ((LAM + sigma1 ** 2) / (LAM + sigma0 ** 2)).sqrt()
    return MU + _rowwise(V.T, _rowwise(V, x0 - MU) * ratio)


def points_D(x, sigma):
    """The ideal denoiser of the dataset POINTS (equal weights)."""
    logw = -((x[:, None] - POINTS[None]) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)
    return (torch.softmax(logw, 1)[:, :, None] * POINTS[None]).sum(1)


def noise(n, seed, scale):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# ----------------------------------------------------------------------------- noise levels
def test_karras_sigmas_endpoints_and_monotone():
    """EDM eq. 5: σ_0 = σ_max, σ_{N-1} = σ_min, σ_N = 0, strictly decreasing, n + 1 values;
    ρ = 1 is uniform spacing."""
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.dtype == np.float64 and len(s) == 11
    assert s[0] == pytest.approx(80.0, rel=1e-14) and s[-2] == pytest.approx(0.002, rel=1e-12)
    assert s[-1] == 0 and np.all(np.diff(s) < 0)
    np.testing.assert_allclose(karras_sigmas(5, 1.0, 5.0, rho=1.0), [5, 4, 3, 2, 1, 0], rtol=1e-14)
    np.testing.assert_allclose(karras_sigmas(1, 0.1, 3.0), [3.0, 0.0], rtol=1e-14)
    with pytest.raises(UsageError):
        karras_sigmas(0)


def test_vp_ve_sigmas_follow_edm_table():
    """VP: σ_i = σ(t_i), t_i from 1 to ε_s, σ(t) = sqrt(e^{½β_d t² + β_min t} − 1);
    VE: σ_i² geometric from σ_max² to σ_min² (constant ratio)."""
    s = vp_sigmas(8)
    assert s[0] == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-12)
    assert s[-2] == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9e-6 + 0.1e-3)), rel=1e-12)
    assert s[-1] == 0 and np.all(np.diff(s) < 0)
    s = ve_sigmas(6, 0.02, 100.0)
    assert s[0] == pytest.approx(100.0) and s[-2] == pytest.approx(0.02) and s[-1] == 0
    np.testing.assert_allclose(s[1:-1] / s[:-2], (0.02 / 100.0) ** (1 / 5), rtol=1e-12)


def test_iddpm_levels_of_a_cosine_table_equal_edm_formula():
    """EDM Table 1: u_{j-1} = sqrt((u_j² + 1)/max(ᾱ_{j-1}/ᾱ_j, C1) − 1) with ᾱ_j = sin²(π/2·j/(M(1+C2)))
    gives, for the Improved-DDPM cosine table ᾱ_t (β capped at 0.999 = 1 − C1), exactly the
    model's levels u_{M-1-t} = sqrt(1/ᾱ_t − 1); σ_{i<N} = u_{⌊j0 + (M−1−j0)i/(N−1) + ½⌋}."""
    table = np.cumprod(1 - beta_schedule("cosine", 1000))
    u = iddpm_u()
    np.testing.assert_allclose(iddpm_u(table), u, rtol=1e-8)
    np.testing.assert_allclose(u[:-1][::-1], np.sqrt(1 / table - 1), rtol=1e-8)
    s = iddpm_sigmas(5, table, j0=8)
    np.testing.assert_allclose(s, [u[8], u[256], u[504], u[751], u[999], 0.0], rtol=1e-8)
    assert 80 < s[0] < 80.5   # EDM's j0 = 8 starts near σ_max = 80
    np.testing.assert_allclose(iddpm_sigmas(1000, table, j0=0)[:-1], u[:-1], rtol=1e-8)


@pytest.mark.parametrize("ode", [VPODE(), EDMODE()])
def test_ode_schedule_derivatives_and_inverse(ode):
    """σ^{-1}(σ(t)) = t, and σ̇, ṡ equal central finite differences of σ(t), s(t)."""
    t, h = np.array([0.05, 0.3, 0.9]), 1e-6
    np.testing.assert_allclose(ode.sigma_inv(ode.sigma(t)), t, rtol=1e-12)
    np.testing.assert_allclose(ode.sigma_dot(t), (ode.sigma(t + h) - ode.sigma(t - h)) / (2 * h), rtol=1e-6)
    np.testing.assert_allclose(ode.s_dot(t), (ode.s(t + h) - ode.s(t - h)) / (2 * h), rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- orders
@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("heun_vp", 2)])
def test_convergence_order_against_closed_form_ode(name, order):
    """Global error vs the exact ODE solution of N(MU, C) at σ_min = 0.01 (no final step to 0),
    on karras levels: doubling the steps divides the error by 2^order (Euler 1; Heun, EDM
    Algorithm 1 with the VP σ(t), s(t), and DPM-Solver++(2M) 2)."""
    errors = []
    for n in (32, 64, 128):
        sigmas = karras_sigmas(n, 0.01, 80.0)[:-1]
        x0 = noise(16, 0, sigmas[0])
        x = S.SAMPLERS[name](gauss_D, x0, sigmas)
        errors.append((x - gauss_ode(x0, sigmas[0], sigmas[-1])).abs().max().item())
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert abs(observed[-1] - order) < 0.15, (errors, observed)
    assert abs(observed[0] - order) < 0.3, (errors, observed)


def test_general_algorithm1_with_edm_schedule_is_heun():
    """EDM Algorithm 1 with σ(t) = t, s(t) = 1 is the σ-space Heun sampler, step for step."""
    sigmas = karras_sigmas(12, 0.002, 80.0)
    x0 = noise(8, 1, sigmas[0])
    a = S.heun_general(points_D, x0, sigmas, ode=EDMODE())
    b = S.heun(points_D, x0, sigmas)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_adaptive_stops_at_requested_tolerance():
    """The embedded Heun-Euler pair meets rtol = atol = tol: its error vs the exact ODE solution
    at σ_min is below a small multiple of tol, and a tighter tol costs more NFE."""
    x0 = noise(16, 2, 80.0)
    exact = gauss_ode(x0, 80.0, 0.002)
    errors, nfes = [], []
    for tol in (1e-3, 1e-5):
        stats = {}
        x = S.adaptive(gauss_D, x0, [80.0, 0.002], rtol=tol, atol=tol, stats=stats)
        errors.append((x - exact).abs().max().item())
        nfes.append(stats["nfe"])
        assert errors[-1] < 5 * tol
        assert len(stats["accepted"]) == 16 and min(stats["accepted"]) > 10
    assert errors[1] < errors[0] / 10 and nfes[1] > 3 * nfes[0]
    stats = {}
    x = S.adaptive(gauss_D, x0, [80.0, 0.002, 0.0], rtol=1e-4, atol=1e-4, stats=stats)
    assert (x - gauss_ode(x0, 80.0, 0.0)).abs().max() < 1e-3   # + an Euler step to σ = 0


# ----------------------------------------------------------------------------- NFE
@pytest.mark.parametrize("name, nfe", [("euler", lambda n: n), ("heun", lambda n: 2 * n - 1),
                                       ("heun_vp", lambda n: 2 * n - 1), ("dpmpp_2m", lambda n: n),
                                       ("euler_ancestral", lambda n: n), ("ddim_sigma", lambda n: n)])
def test_nfe_counts(name, nfe):
    """N steps down to σ = 0: Heun (EDM Algorithm 1) makes 2N − 1 denoiser calls (Euler on the
    last step), the first-order and multistep samplers N; stats["nfe"] and the callback agree."""
    seen = []
    stats = {}
    S.SAMPLERS[name](points_D, noise(3, 3, 80.0), karras_sigmas(7), stats=stats,
                     callback=lambda info: seen.append((info["i"], info["nfe"])))
    assert stats["nfe"] == nfe(7)
    assert [i for i, _ in seen] == list(range(7)) and seen[-1][1] == nfe(7)


def test_churn_adds_no_evaluations_and_heun_to_sigma_min_makes_2n():
    """Algorithm 2's churn only adds noise (same NFE); ending at σ_min > 0, Heun makes 2N."""
    stats = {}
    S.heun(points_D, noise(3, 4, 80.0), karras_sigmas(7), churn=10.0, stats=stats,
           generator=torch.Generator().manual_seed(0))
    assert stats["nfe"] == 13
    S.heun(points_D, noise(3, 4, 80.0), karras_sigmas(7)[:-1], stats=stats)
    assert stats["nfe"] == 12


# ----------------------------------------------------------------------------- distributions
def _check_gaussian(x):
    """Mean and covariance of samples x [N, 2] match N(MU, C) within 4 standard errors."""
    n = len(x)
    mean_se = (torch.diag(C) / n).sqrt()
    assert ((x.mean(0) - MU).abs() < 4 * mean_se).all(), (x.mean(0), MU)
    cov_se = ((torch.diag(C)[:, None] * torch.diag(C)[None] + C ** 2) / n).sqrt()
    assert ((torch.cov(x.T) - C).abs() < 4 * cov_se).all(), (torch.cov(x.T), C)


def _check_points(x):
    """Samples x [N, 2] sit on the dataset POINTS, each point drawn 1/3 of the time (4 s.e.)."""
    dist = torch.cdist(x, POINTS)
    assert dist.min(1).values.max() < 1e-3
    counts = torch.bincount(dist.argmin(1), minlength=3).to(F64)
    n = len(x)
    assert ((counts - n / 3).abs() < 4 * math.sqrt(n * 2 / 9)).all(), counts


@pytest.mark.parametrize("name, steps, options", [
    ("euler_ancestral", 1000, {}),
    ("heun", 256, dict(churn=40.0)),
    ("heun", 256, dict(churn=40.0, tmin=0.01, tmax=10.0, noise_scale=1.0)),
])
def test_stochastic_samplers_match_data_distribution(name, steps, options):
    """Stochastic samplers with the exact denoiser draw from the data: 4000 samples of N(MU, C)
    have its mean and covariance, and samples of the dataset POINTS land on the points in equal
    proportions. The start is μ + σ_0·z (the σ_0-marginal up to C/σ_0²)."""
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    g = torch.Generator().manual_seed(5)
    _check_gaussian(S.SAMPLERS[name](gauss_D, MU + noise(4000, 6, sigmas[0]), sigmas,
                                     generator=g, **options))
    _check_points(S.SAMPLERS[name](points_D, noise(3000, 7, sigmas[0]), sigmas,
                                   generator=g, **options))


def test_churn_only_inside_tmin_tmax():
    """EDM Algorithm 2: γ_i = 0 for σ_i outside [S_tmin, S_tmax], so a window holding no level
    gives Algorithm 1's result exactly, and one holding a single level draws noise once."""
    sigmas = karras_sigmas(10, 0.002, 80.0)
    x0 = noise(4, 9, 80.0)
    plain = S.heun(points_D, x0, sigmas)
    for tmin, tmax in [(81.0, 100.0), (0.0, 0.001), (sigmas[3] * 1.01, sigmas[2] * 0.99)]:
        x = S.heun(points_D, x0, sigmas, churn=5.0, tmin=tmin, tmax=tmax,
                   generator=torch.Generator().manual_seed(0))
        assert torch.equal(x, plain)
    draws = []
    g = torch.Generator().manual_seed(0)
    S.euler(lambda x, s: draws.append(g.get_state()) or points_D(x, s), x0, sigmas, churn=5.0,
            tmin=sigmas[3], tmax=sigmas[3], generator=g)
    assert sum(not torch.equal(a, b) for a, b in zip(draws, draws[1:])) == 1


def test_deterministic_sampler_also_matches_gaussian():
    """The probability-flow ODE (Heun, 64 steps) maps N(μ, σ_0² + C) onto N(MU, C)."""
    sigmas = karras_sigmas(64, 0.002, 80.0)
    _check_gaussian(S.heun(gauss_D, MU + noise(4000, 8, sigmas[0]), sigmas))


# ----------------------------------------------------------------------------- per-seed
@pytest.mark.parametrize("name, options", [("heun", dict(churn=30.0)), ("euler_ancestral", {}),
                                           ("ddim_sigma", dict(eta=0.5)), ("adaptive", {})])
def test_per_seed_reproducibility(name, options):
    """With one generator per row, sample i is bit-identical in a batch of 5 and alone
    (the adaptive sampler controls each row's step size separately)."""
    sigmas = karras_sigmas(20, 0.002, 80.0)
    seeds = [11, 12, 13, 14, 15]
    x0 = torch.stack([noise(1, s, sigmas[0])[0] for s in seeds])
    batch = S.SAMPLERS[name](points_D, x0, sigmas, generator=per_sample_generators(seeds), **options)
    for i, seed in enumerate(seeds):
        one = S.SAMPLERS[name](points_D, x0[i:i + 1], sigmas,
                               generator=per_sample_generators([seed]), **options)
        assert torch.equal(one[0], batch[i]), (name, i)


# ----------------------------------------------------------------------------- the contract
def test_euler_callback_reports_each_step_and_levels_are_exact():
    """callback(dict(i, sigma, x, denoised, nfe)) after step i: sigma = σ_{i+1}, x the Euler
    iterate x_{i+1} = x_i + (σ_{i+1} − σ_i)(x_i − D(x_i; σ_i))/σ_i (EDM eq. 4), denoised = D(x_i; σ_i),
    nfe = i + 1; levels given as a list of numbers are used as float64 (0.1 stays 0.1)."""
    sigmas = [80.0, 3.0, 0.1, 0.0]
    x = noise(4, 12, 80.0)
    seen = []
    out = S.euler(gauss_D, x, sigmas, callback=seen.append)
    assert [(info["i"], info["nfe"]) for info in seen] == [(0, 1), (1, 2), (2, 3)]
    for i, info in enumerate(seen):
        denoised = gauss_D(x, torch.full((4,), sigmas[i], dtype=F64))
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
        assert info["sigma"] == sigmas[i + 1]
        torch.testing.assert_close(info["denoised"], denoised, rtol=0, atol=1e-12)
        torch.testing.assert_close(info["x"], x, rtol=0, atol=1e-12)
    assert torch.equal(out, seen[-1]["x"])


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.5, -0.1], [1.0, 1.0, 0.0], [0.5, 1.0, 0.0]])
def test_sigmas_must_decrease_to_nonnegative(sigmas):
    """One level, a negative last level, and equal or increasing neighbours are refused, with a
    message that shows the levels."""
    with pytest.raises(ValueError, match=r"^sigmas must be 2 or more levels decreasing to >= 0, "
                                         rf"got {re.escape(str(sigmas))}$"):
        S.euler(points_D, noise(1, 0, 1.0), sigmas)


@pytest.mark.parametrize("name", ["euler", "heun", "euler_ancestral", "ddim_sigma", "dpmpp_2m",
                                  "adaptive"])
def test_model_kwargs_reach_the_denoiser(name):
    """model_kwargs are passed to D: one step from σ_0 to 0 is x' = D(x; σ_0, **model_kwargs),
    here the exact denoiser of N(MU + shift, C)."""
    def shifted_D(x, sigma, shift):
        return gauss_D(x - shift, sigma) + shift
    shift = torch.tensor([2.0, -3.0], dtype=F64)
    x0 = noise(3, 14, 5.0)
    x = S.SAMPLERS[name](shifted_D, x0, [5.0, 0.0], model_kwargs={"shift": shift},
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, shifted_D(x0, torch.full((3,), 5.0, dtype=F64), shift),
                               rtol=0, atol=1e-12)


def _edm_algorithm2(D, x, sigmas, churn, noise_scale, generator, second_order):
    """EDM Algorithm 2 as printed (S_tmin = 0, S_tmax = ∞: γ_i = min(S_churn/N, √2 − 1) on every
    step), ε_i ~ N(0, S_noise²I) the generator's next normal of x's shape; without the
    second-order correction (lines 9-11) it is the Euler variant."""
    n = len(sigmas) - 1
    full = lambda t: torch.full((len(x),), t, dtype=x.dtype)
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise_scale
        t_hat = t + gamma * t
        x_hat = x + math.sqrt(t_hat ** 2 - t ** 2) * eps
        d = (x_hat - D(x_hat, full(t_hat))) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if second_order and t_next != 0:
            d_prime = (x - D(x, full(t_next))) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    return x


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("churn, noise_scale", [(1.0, 1.3), (20.0, 0.7)])
def test_churn_is_edm_algorithm2(name, churn, noise_scale):
    """Heun with churn is EDM Algorithm 2 line by line, Euler with churn the same without the
    correction, for γ_i = S_churn/N = 0.2 and for S_churn/N = 4 capped at √2 − 1, S_noise ≠ 1."""
    sigmas = karras_sigmas(5, 0.002, 80.0)
    x0 = MU + noise(6, 13, sigmas[0])
    x = S.SAMPLERS[name](gauss_D, x0, sigmas, churn=churn, noise_scale=noise_scale,
                         generator=torch.Generator().manual_seed(4))
    ref = _edm_algorithm2(gauss_D, x0, sigmas.tolist(), churn, noise_scale,
                          torch.Generator().manual_seed(4), name == "heun")
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


def test_ancestral_step_default_is_ddpm():
    """η = 1 (the default) is DDPM's ancestral step: σ_up = sqrt(σ'²(σ² − σ'²)/σ²) and
    σ_down = σ'²/σ; any η gives σ_down² + σ_up² = σ'²."""
    down, up = S.ancestral_step(2.0, 1.0)
    assert down == pytest.approx(0.5, rel=1e-14) and up == pytest.approx(math.sqrt(3) / 2, rel=1e-14)
    down, up = S.ancestral_step(2.0, 1.0, eta=0.5)
    assert up == pytest.approx(math.sqrt(3) / 4, rel=1e-14)
    assert down == pytest.approx(math.sqrt(1 - 3 / 16), rel=1e-14)


def _ddim_alpha_space(D, x, sigmas, eta, noise_scale, generator):
    """DDIM (Song et al. eqs. 12 and 16) on x_t = sqrt(ᾱ_t)·x with ᾱ = 1/(1 + σ²):
    x_{t−1} = sqrt(ᾱ')·x̂_0 + sqrt(1 − ᾱ' − σ_t²)·ε̂ + S_noise·σ_t·z,
    σ_t = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ'), z the generator's next normal when σ_t > 0."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        a, a_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        x_t = math.sqrt(a) * x
        x0_hat = D(x, torch.full((len(x),), sigma, dtype=x.dtype))
        eps = (x_t - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
        sigma_t = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x_t = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next - sigma_t ** 2) * eps
        if sigma_t > 0:
            x_t = x_t + noise_scale * sigma_t * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x_t / math.sqrt(a_next)
    return x


def test_ddim_with_noise_scale_is_ddim_in_alpha_space_and_defaults_to_euler():
    """σ-space DDIM with η = 0.6 and S_noise = 1.5 equals DDIM written on x_t = sqrt(ᾱ)·x (the
    noise scaled by S_noise); without η it is deterministic DDIM, i.e. Euler, bit for bit."""
    sigmas = karras_sigmas(6, 0.002, 80.0)
    x0 = MU + noise(5, 15, sigmas[0])
    x = S.ddim(gauss_D, x0, sigmas, eta=0.6, noise_scale=1.5, generator=torch.Generator().manual_seed(6))
    ref = _ddim_alpha_space(gauss_D, x0, sigmas.tolist(), 0.6, 1.5, torch.Generator().manual_seed(6))
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-9)
    assert torch.equal(S.ddim(gauss_D, x0, sigmas), S.euler(gauss_D, x0, sigmas))


# ----------------------------------------------------------------------------- discrete models
T = 100


def toy_model(learned_variance):
    """A smooth discrete-time network F(x_t, t) on [B, 2, 2, 2] (t: original long indices)."""
    def F(x_t, t):
        assert t.dtype == torch.long and int(t.max()) < T
        tt = t.to(x_t.dtype).reshape(-1, 1, 1, 1) / T
        out = torch.tanh(1.3 * x_t + 0.7 * x_t.roll(1, dims=1)) * (0.5 + tt) + 0.1 * tt
        return torch.cat([out, 0.5 * out.tanh()], 1) if learned_variance else out
    return F


CASES = [("eps", "learned_range"), ("v", "fixed_small"), ("x0", "fixed_large")]


@pytest.mark.parametrize("mean_type, var_type", CASES)
def test_discrete_denoiser_at_levels_is_the_models_x0(mean_type, var_type):
    """At σ_t = sqrt(1/ᾱ_t − 1) and x = x_t/sqrt(ᾱ_t), D(x; σ_t) = GaussianDiffusion's
    pred_xstart(F(x_t, t)) for ε, x0 and v models; the fractional t at an exact level is t."""
    diffusion = make_diffusion("linear", T, mean_type, var_type)
    F = toy_model(diffusion.learns_variance)
    t = torch.tensor([0, 17, 63, 99])
    x_t = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = diffusion.pred_xstart(diffusion.split_output(F(x_t, t), x_t)[0], x_t, t)
    D = DiscreteDenoiser(F, diffusion.alphas_cumprod, mean_type, quantize=True)
    sigma = D.sigmas[t]
    x = x_t * (1 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(D(x, sigma), ref, rtol=0, atol=1e-12)
    continuous = DiscreteDenoiser(F, diffusion.alphas_cumprod, mean_type)
    torch.testing.assert_close(continuous.sigma_to_t(sigma), t.to(F64), rtol=0, atol=1e-9)


def test_sigma_to_t_interpolates_log_sigma():
    """Fractional t is linear in log σ between levels (σ_t^¼·σ_{t+1}^¾ is t + ¾) and clamped
    outside [σ_min, σ_max]; quantized, it is the index of the nearest level in log σ."""
    a = make_diffusion("cosine", T).alphas_cumprod
    seen = []
    D = DiscreteDenoiser(lambda x, t: seen.append(t) or torch.zeros_like(x), a)
    s = D.sigmas
    sigma = torch.stack([s[10] ** 0.25 * s[11] ** 0.75, s[0] / 2, s[-1] * 2, s[40]])
    torch.testing.assert_close(D.sigma_to_t(sigma), torch.tensor([10.75, 0, T - 1, 40], dtype=F64))
    D.quantize = True
    assert D.sigma_to_t(sigma).tolist() == [11, 0, T - 1, 40]
    assert D.sigma_min == pytest.approx(float(s[0])) and D.sigma_max == pytest.approx(float(s[-1]))
    D.quantize = False
    D(torch.zeros(1, 2, dtype=F64), torch.tensor([1.0], dtype=F64))
    assert seen[-1].dtype == F64 and 0 < float(seen[-1]) < T - 1   # float t for a plain callable


@pytest.mark.parametrize("mean_type, var_type", CASES)
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
def test_sigma_space_ddim_equals_core_ddim(mean_type, var_type, eta):
    """DDIM is Euler (η = 0) / ancestral Euler (η > 0) in σ-space of x/sqrt(ᾱ): on the levels of
    a respaced diffusion, σ-space DDIM with the quantized DiscreteDenoiser (clipped like
    clip_denoised) gives GaussianDiffusion.ddim_sample_loop's sample, from x_T = noise, i.e.
    x = noise·sqrt(1 + σ_0²)."""
    full = make_diffusion("linear", T, mean_type, var_type)
    respaced = make_diffusion("linear", T, mean_type, var_type, respacing="10")
    F = toy_model(full.learns_variance)
    z = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = respaced.ddim_sample_loop(F, z.shape, noise=z, eta=eta,
                                    generator=per_sample_generators([1, 2, 3]))
    D = ClipDenoised(DiscreteDenoiser(F, full.alphas_cumprod, mean_type, quantize=True))
    levels = D.denoiser.sigmas[respaced.timestep_map].flip(0)
    sigmas = torch.cat([levels, torch.zeros(1, dtype=F64)])
    stats = {}
    x = S.ddim(D, z * (1 + levels[0] ** 2).sqrt(), sigmas, eta=eta,
               generator=per_sample_generators([1, 2, 3]), stats=stats)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert stats["nfe"] == respaced.num_timesteps
    if eta == 0:
        torch.testing.assert_close(S.euler(D, z * (1 + levels[0] ** 2).sqrt(), sigmas), ref,
                                   rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- pipeline, CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny randomised UNet model directory (ε model with learned range, linear T = 100)."""
    path = tmp_path_factory.mktemp("model")
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=16, out_channels=2,
                     channel_mult=(1,), attention_resolutions=(), norm_groups=8)
    model = UNetModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    diffusion = dict(schedule="linear", steps=T, mean_type="eps", var_type="learned_range",
                     loss_type="hybrid", hybrid_lambda=0.001, vb_stop_grad=True)
    save_tensors(str(path / WEIGHTS_NAME), model.state_dict())
    atomic_write_json(str(path / CONFIG_NAME), make_config(cfg, diffusion, {"channels": 1, "image_size": 8}))
    return str(path)


def test_ddpm_var_type_override_uses_fixed_variances(model_dir):
    """sample(var_type=...) on a learned-Σ model (Improved DDPM Fig. 8's fixed-Σ curves): on the
    levels of "ddim10" (t = 0, 10, ..., 90) the reverse variance of step i > 0 is β_i
    (fixed_large) or β̃_i = β_i(1 − ᾱ_{i−1})/(1 − ᾱ_i) (fixed_small), with β_i = 1 − ᾱ_i/ᾱ_{i−1}
    of the respaced levels, written out from ᾱ here; at i = 0 fixed_large takes β̃_1
    (improved-diffusion's np.append(posterior_variance[1], betas[1:])). The mean stays the
    learned model's; images change; other samplers refuse the option."""
    import gaussdiff
    pipe = gaussdiff.load(model_dir, device="cpu")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 5])
    learned = pipe.respaced("ddim10").p_mean_variance(pipe.model, x, t)
    abar = np.cumprod(1 - beta_schedule("linear", T).astype(np.float64))[::10]   # respaced levels
    prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1 - abar / prev
    post = beta * (1 - prev) / (1 - abar)
    for var_type, want in (("fixed_large", [post[1], beta[5]]), ("fixed_small", [0.0, post[5]])):
        out = pipe.respaced("ddim10", var_type).p_mean_variance(pipe.model, x, t)
        torch.testing.assert_close(out["mean"], learned["mean"])
        np.testing.assert_allclose(out["variance"][:, 0, 0, 0].double().numpy(), want, rtol=1e-5)
    a, _ = pipe.sample(2, "ddpm", 10, seed=0, progress=False)
    b, _ = pipe.sample(2, "ddpm", 10, seed=0, progress=False, var_type="fixed_large")
    assert (a != b).any()
    for sampler in ("ddim", "heun"):
        with pytest.raises(UsageError, match=f"var_type does not apply to the {sampler} sampler"):
            pipe.sample(1, sampler, 4, var_type="fixed_small", progress=False)
    with pytest.raises(UsageError, match="--var-type learned: choose one of fixed_small, fixed_large"):
        pipe.respaced(10, "learned")


def test_pipeline_sigma_samplers_nfe_and_per_seed(model_dir):
    """Pipeline.sample runs σ-space samplers on a discrete model: heun with N = 3 steps reports
    2N − 1 = 5 NFE; images do not depend on the batch size; ddpm/ddim still report T' NFE."""
    import gaussdiff
    pipe = gaussdiff.load(model_dir, device="cpu")
    assert isinstance(pipe, Pipeline)
    stats = {}
    kw = dict(sampler="heun", steps=3, churn=1.0, seed=3, progress=False, stats=stats)
    a, _ = pipe.sample(3, batch_size=3, **kw)
    assert stats["nfe"] == 5 and a.shape == (3, 8, 8, 1)
    b, _ = pipe.sample(3, batch_size=1, **kw)
    np.testing.assert_array_equal(a, b)
    for sampler in ("ddim", "ddpm"):
        pipe.sample(2, sampler, 4, progress=False, stats=stats)
        assert stats["nfe"] == 4
    for sampler in ("euler", "dpmpp_2m", "ddim_sigma", "euler_ancestral"):
        pipe.sample(1, sampler, 4, progress=False, stats=stats, sigma_schedule="iddpm", quantize=True)
        assert stats["nfe"] == 4
    pipe.sample(1, "adaptive", 2, progress=False, stats=stats, rtol=0.1)
    assert stats["nfe"] > 2
    with pytest.raises(UsageError, match="churn"):
        pipe.sample(1, "dpmpp_2m", 4, churn=1.0, progress=False)
    with pytest.raises(UsageError, match="rho"):
        pipe.sample(1, "heun", 4, rho=3.0, sigma_schedule="vp", progress=False)
    with pytest.raises(UsageError, match="steps"):
        pipe.sample(1, "heun", "ddim4", progress=False)
    with pytest.raises(UsageError, match="unknown sampler"):
        pipe.sample(1, "nope", 4, progress=False)


def test_cli_sample_prints_nfe_and_rejects_unknown_sampler(model_dir, tmp_path, capsys):
    """`gaussdiff sample --sampler heun --steps 3` writes the images and prints 5 NFE; an
    unknown --sampler and an option the sampler does not take are one-line errors (exit 2)."""
    out = str(tmp_path / "s.npz")
    base = ["sample", model_dir, "--num", "2", "--out", out, "--device", "cpu", "--no-progress"]
    assert cli_main(base + ["--sampler", "heun", "--steps", "3", "--schedule", "karras",
                            "--rho", "5", "--churn", "2", "--snoise", "1.003"]) == 0
    assert "heun: 5 network evaluations per image" in capsys.readouterr().out
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    assert cli_main(base + ["--sampler", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--sampler bogus" in err and "heun" in err and len(err.strip().splitlines()) == 1
    assert cli_main(base + ["--sampler", "dpmpp_2m", "--steps", "3", "--churn", "1"]) == 2
    assert "churn" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the registry
def test_registry_entries_agree_with_the_samplers():
    """Every SamplerSpec is what its sampler does: the NFE formula a·N + b equals the denoiser
    calls counted at N = 1, 2, 3 (sweep.measure_nfe_formula), and nfe None (adaptive) is refused
    by the sweep; `stochastic(options)` is true exactly when two generators give two results
    (checked with the option values that switch the noise on and off); the CLI's --sampler help
    and the sweep's --samplers help list the registry, and unknown names are one-line errors."""
    from gaussdiff.errors import UsageError
    from gaussdiff.sampling.samplers import REGISTRY, SAMPLER_NAMES, SAMPLERS, get_spec
    from gaussdiff.metrics.sweep import measure_nfe_formula, nfe_formula
    assert SAMPLER_NAMES == tuple(REGISTRY) and set(SAMPLERS) == {n for n, s in REGISTRY.items() if s.fn}
    for name, spec in REGISTRY.items():
        if spec.discrete:
            continue
        if spec.nfe is None:
            with pytest.raises(UsageError, match="chooses its own steps"):
                nfe_formula(name)
        else:
            assert measure_nfe_formula(name) == spec.nfe == nfe_formula(name), name
    D = lambda x, sigma, **_: 0.5 * x / (1 + sigma.reshape(-1, 1) ** 2)   # noqa: E731
    switches = [{}, {"eta": 0.0}, {"eta": 0.7}, {"churn": 5.0}]
    for name, spec in REGISTRY.items():
        if spec.discrete or spec.nfe is None:
            continue
        accepted = set(inspect.signature(spec.fn).parameters)
        for opts in switches:
            if not set(opts) <= accepted:
                continue
            x = torch.ones(2, 3, dtype=torch.float64) * 10
            runs = [spec.fn(D, x.clone(), [10.0, 2.0, 0.5, 0.0], generator=torch.Generator().manual_seed(s),
                            **opts) for s in (0, 1)]
            assert (not torch.equal(*runs)) == spec.stochastic(opts), (name, opts)
    from gaussdiff.cli import build_parser
    sample_help = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    for name in REGISTRY:
        assert name in sample_help
    with pytest.raises(UsageError, match=r"^--sampler nope: unknown sampler, choose one of ddpm, ddim, "):
        get_spec("nope")

"""σ-space objectives (EDM Table 1), P2 / Min-SNR-γ weightings and EDM's non-leaky augmentation."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import gaussdiff
from gaussdiff.data.augment import AUGMENT_DIM, AugmentPipe, _transform, rotate2d
from gaussdiff.cli import main
from gaussdiff.diffusion import GaussianDiffusion, make_diffusion
from gaussdiff.errors import UsageError
from gaussdiff.diffusion.gaussian import mean_flat
from gaussdiff.modeldir import make_config
from gaussdiff.nn.unet import UNetConfig, UNetModel
from gaussdiff.diffusion.precond import (EDMLoss, EDMPrecond, VELoss, VEPrecond, VPLoss, VPPrecond,
                                         iDDPMLoss, iDDPMPrecond, make_loss, make_precond,
                                         objective_sections, vp_sigma, vp_sigma_inv)
from gaussdiff.diffusion.schedules import VPODE, beta_schedule, iddpm_u

torch.set_num_threads(1)   # tiny tensors; leave the other core alone
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


class Recorder(nn.Module):
    """F_θ stand-in: records its inputs and returns `scale`·x (0 gives F ≡ 0)."""

    def __init__(self, scale=0.0):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x, c_noise, **cond):
        self.calls.append((x, c_noise, cond))
        return self.scale * x


# ------------------------------------------------------------------------ preconditioners
def test_edm_coefficients_are_the_table_and_give_unit_variances():
    """EDM column: c_skip = σd²/(σ²+σd²), c_out = σσd/sqrt(σ²+σd²), c_in = 1/sqrt(σ²+σd²),
    c_noise = ¼ ln σ; c_in²(σ² + σd²) = 1 (unit input variance), the effective target
    (y − c_skip(y + n))/c_out has unit variance, and λ(σ)·c_out² = 1 (effective weight 1)."""
    for sd in (0.5, 1.3):
        c_skip, c_out, c_in, c_noise = EDMPrecond(Recorder(), sigma_data=sd).coefficients(SIGMAS)
        s = SIGMAS
        torch.testing.assert_close(c_skip, sd ** 2 / (s ** 2 + sd ** 2), rtol=1e-14, atol=0)
        torch.testing.assert_close(c_out, s * sd / (s ** 2 + sd ** 2).sqrt(), rtol=1e-14, atol=0)
        torch.testing.assert_close(c_in, 1 / (s ** 2 + sd ** 2).sqrt(), rtol=1e-14, atol=0)
        torch.testing.assert_close(c_noise, torch.log(s) / 4, rtol=1e-14, atol=0)
        ones = torch.ones_like(s)
        torch.testing.assert_close(c_in ** 2 * (s ** 2 + sd ** 2), ones, rtol=1e-13, atol=0)
        target_var = ((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * s ** 2) / c_out ** 2
        torch.testing.assert_close(target_var, ones, rtol=1e-12, atol=0)
        torch.testing.assert_close(EDMLoss(sigma_data=sd).weight(s) * c_out ** 2, ones,
                                   rtol=1e-12, atol=0)


def test_vp_ve_iddpm_coefficients_are_the_table():
    """VP, VE, iDDPM columns: c_skip = 1; c_out = −σ, σ, −σ; c_in = 1/sqrt(σ²+1), 1,
    1/sqrt(σ²+1); c_noise = (M−1)σ⁻¹(σ), ln(σ/2), M−1−argmin_j|u_j − σ|."""
    s = SIGMAS
    for P, c_out, c_in in ((VPPrecond, -s, 1 / (s ** 2 + 1).sqrt()), (VEPrecond, s, torch.ones_like(s)),
                           (iDDPMPrecond, -s, 1 / (s ** 2 + 1).sqrt())):
        cs, co, ci, _ = P(Recorder()).coefficients(s)
        torch.testing.assert_close(cs, torch.ones_like(s), rtol=0, atol=0)
        torch.testing.assert_close(co, c_out, rtol=1e-15, atol=0)
        torch.testing.assert_close(ci, c_in, rtol=1e-15, atol=0)
    torch.testing.assert_close(VEPrecond(Recorder()).coefficients(s)[3], torch.log(s / 2))


def test_vp_c_noise_is_scaled_time_of_the_vp_schedule():
    """VP: σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) (checked against schedules.VPODE), σ⁻¹ is its
    inverse, c_noise(σ(t)) = (M − 1)·t, and the trained range is [σ(ε_t), σ(1)]."""
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(vp_sigma(t).numpy(), VPODE(19.9, 0.1).sigma(t.numpy()), rtol=1e-14)
    torch.testing.assert_close(vp_sigma_inv(vp_sigma(t)), t, rtol=1e-10, atol=0)
    p = VPPrecond(Recorder())
    torch.testing.assert_close(p.coefficients(vp_sigma(t))[3], 999 * t, rtol=1e-10, atol=0)
    assert p.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9e-10 + 1e-6)), rel=1e-12)
    assert p.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-12)


def test_iddpm_c_noise_is_the_reversed_index_of_the_nearest_u():
    """iDDPM: u_M = 0 < u_{M−1} < ... < u_0 (EDM's recursion with ᾱ_j = sin²(π/2·j/(M(C2+1)))),
    and c_noise(σ) = M − 1 − j for σ at or near u_j."""
    p = iDDPMPrecond(Recorder())
    u = p.u
    assert u[-1] == 0 and bool((u[:-1] > u[1:]).all()) and len(u) == 1001
    ab = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2
    assert u[999] == pytest.approx(math.sqrt(1 / (ab(999) / ab(1000)) - 1), rel=1e-12)
    j = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(p.coefficients(u[j])[3], (999 - j).double(), rtol=0, atol=0)
    near = u[j] * (1 + 1e-4)
    torch.testing.assert_close(p.coefficients(near)[3], (999 - j).double(), rtol=0, atol=0)
    assert p.sigma_min == float(u[999]) and p.sigma_max == float(u[0])


@pytest.mark.parametrize("kind", ["edm", "vp", "ve", "iddpm"])
def test_denoiser_with_zero_network_returns_c_skip_x(kind):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise): with F ≡ 0, D = c_skip·x (EDM: the
    σ_data²/(σ² + σ_data²) shrinkage towards 0; others: x itself), and F receives exactly c_in·x
    and c_noise(σ) [B], with the conditioning passed through."""
    F = Recorder(0.0)
    D = make_precond({"type": kind}, F)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    out = D(x, sigma, y=torch.tensor([1, 2, 3]))
    c_skip, _, c_in, c_noise = D.coefficients(sigma)
    torch.testing.assert_close(out, c_skip[:, None, None, None] * x, rtol=1e-15, atol=0)
    fx, fc, cond = F.calls[-1]
    torch.testing.assert_close(fx, c_in[:, None, None, None] * x, rtol=1e-15, atol=0)
    torch.testing.assert_close(fc, c_noise, rtol=0, atol=0)
    assert fc.shape == (3,) and torch.equal(cond["y"], torch.tensor([1, 2, 3]))
    # a number for sigma is broadcast to [B]
    torch.testing.assert_close(D(x, 1.0), D(x, torch.ones(3, dtype=torch.float64)))


def test_denoiser_identity_network_edm():
    """EDM with F(z) = z: D = (c_skip + c_out·c_in)·x."""
    D = EDMPrecond(Recorder(1.0))
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = D.coefficients(sigma)
    torch.testing.assert_close(D(x, sigma), (c_skip + c_out * c_in)[:, None, None, None] * x)


class ParamRecorder(Recorder):
    """A Recorder with one parameter of `dtype`, so that F_θ runs in that dtype."""

    def __init__(self, scale=0.0, dtype=torch.float32):
        super().__init__(scale)
        self.weight = nn.Parameter(torch.ones((), dtype=dtype))


def test_denoiser_sigma_as_number_or_column_is_read_in_x_dtype():
    """σ given as a Python number is used in x's dtype: at σ = 0.1 (not a float32 number) EDM's
    c_skip = σd²/(σ² + σd²) and c_noise = ¼ ln σ are exact to float64 precision; σ given as
    [B, 1, 1, 1] (NVlabs/edm's shape) is read as [B]."""
    F = Recorder(0.0)
    D = EDMPrecond(F)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(D(x, 0.1), 0.25 / (0.1 ** 2 + 0.25) * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(F.calls[-1][1], torch.full((3,), math.log(0.1) / 4, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    assert torch.equal(D(x, sigma.reshape(-1, 1, 1, 1)), D(x, sigma))


def test_denoiser_runs_network_in_its_dtype_and_returns_x_dtype():
    """F_θ receives c_in·x and c_noise in its parameters' dtype, and D(x; σ) comes back in x's
    dtype: float64 x with a float32 network, float32 x with a float64 network; the values are
    EDM eq. 7 with F(z) = ½z, (c_skip + ½c_out·c_in)·x, to the precision of the lower dtype."""
    sigma = torch.tensor([0.3, 3.0], dtype=torch.float64)
    sd = 0.5
    factor = (sd ** 2 + 0.5 * sigma * sd) / (sigma ** 2 + sd ** 2)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    for x_dtype, net_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        F = ParamRecorder(0.5, net_dtype)
        out = EDMPrecond(F)(x.to(x_dtype), sigma.to(x_dtype))
        fx, fc, _ = F.calls[-1]
        assert out.dtype == x_dtype and fx.dtype == fc.dtype == net_dtype
        torch.testing.assert_close(fc.double(), sigma.log() / 4, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.double(), factor[:, None, None, None] * x, rtol=1e-6, atol=0)


def test_vp_sigma_takes_numbers_in_float64_and_tensors_in_their_dtype():
    """vp_sigma(t) = sqrt(exp(½β_d t² + β_min t) − 1) and vp_sigma_inv(σ) =
    (sqrt(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d accept numbers (float64 results, to 1e-14 of the
    closed forms) and tensors (the result keeps the tensor's dtype)."""
    t, s = 0.5, 2.0
    sigma_t = math.sqrt(math.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
    t_s = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(1 + s ** 2)) - 0.1) / 19.9
    a, b = vp_sigma(t), vp_sigma_inv(s)
    assert a.dtype == b.dtype == torch.float64
    assert float(a) == pytest.approx(sigma_t, rel=1e-14) and float(b) == pytest.approx(t_s, rel=1e-14)
    for dtype in (torch.float32, torch.float64):
        a, b = vp_sigma(torch.tensor([t], dtype=dtype)), vp_sigma_inv(torch.tensor([s], dtype=dtype))
        assert a.dtype == b.dtype == dtype
        assert float(a) == pytest.approx(sigma_t, rel=1e-6) and float(b) == pytest.approx(t_s, rel=1e-6)


def test_vp_with_other_betas_uses_them_everywhere():
    """VP with β_d = 10, β_min = 2, ε_t = 0.01, M = 100: σ_min = σ(ε_t), σ_max = σ(1) and
    c_noise(σ(t)) = 99·t, with the closed form σ(t) = sqrt(exp(½β_d t² + β_min t) − 1); VPLoss with
    those β and ε_t = 0.5 draws σ ∈ [σ(0.5), σ(1)] with σ⁻¹(σ) ~ U(0.5, 1) (mean within 5 s.e.)."""
    sig = lambda t: math.sqrt(math.expm1(0.5 * 10 * t * t + 2 * t))
    inv = lambda s: (math.sqrt(4 + 20 * math.log1p(s * s)) - 2) / 10
    p = VPPrecond(Recorder(), beta_d=10, beta_min=2, epsilon_t=0.01, M=100)
    assert p.sigma_min == pytest.approx(sig(0.01), rel=1e-12)
    assert p.sigma_max == pytest.approx(sig(1.0), rel=1e-12)
    t = [0.01, 0.2, 0.7, 1.0]
    s = torch.tensor([sig(v) for v in t], dtype=torch.float64)
    torch.testing.assert_close(p.coefficients(s)[3], 99 * torch.tensor(t, dtype=torch.float64),
                               rtol=1e-10, atol=0)
    n = 4000
    sigma = VPLoss(beta_d=10, beta_min=2, epsilon_t=0.5).sample_sigma(n, torch.Generator().manual_seed(3))
    assert sigma.min() >= sig(0.5) * (1 - 1e-12) and sigma.max() <= sig(1.0) * (1 + 1e-12)
    t_drawn = [inv(v) for v in sigma.tolist()]
    assert abs(sum(t_drawn) / n - 0.75) < 5 * 0.5 / math.sqrt(12 * n)


def _iddpm_u_ref(C1, C2, M):
    """EDM Table 1's iDDPM levels in plain Python: u_M = 0, ᾱ_j = sin²(π/2·j/(M(C2 + 1))),
    u_{j−1} = sqrt((u_j² + 1)/max(ᾱ_{j−1}/ᾱ_j, C1) − 1)."""
    ab = lambda j: math.sin(0.5 * math.pi * j / (M * (C2 + 1))) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(ab(j - 1) / ab(j), C1) - 1)
    return torch.tensor(u, dtype=torch.float64)


def test_iddpm_other_parameters_reach_levels_loss_and_rounding():
    """iDDPM with C1 = 0.02, C2 = 0.05, M = 8: the precond's levels are EDM's recursion with those
    parameters (C1 sets u_0, since ᾱ_0 = 0), [σ_min, σ_max] = [u_{M−1}, u_0]; the loss draws every
    u_0..u_{M−1}; round_sigma(σ) is the nearest u_j in σ's dtype (its index j on request)."""
    C1, C2, M = 0.02, 0.05, 8
    u = _iddpm_u_ref(C1, C2, M)
    p = iDDPMPrecond(Recorder(), C1=C1, C2=C2, M=M)
    torch.testing.assert_close(p.u, u, rtol=1e-12, atol=0)
    assert p.sigma_max == pytest.approx(float(u[0]), rel=1e-12)
    assert p.sigma_min == pytest.approx(float(u[M - 1]), rel=1e-12)
    s = iDDPMLoss(C1=C1, C2=C2, M=M).sample_sigma(400, torch.Generator().manual_seed(0))
    j = (s[:, None] - u[None]).abs().argmin(1)
    torch.testing.assert_close(s, u[j], rtol=1e-12, atol=0)
    assert sorted(set(j.tolist())) == list(range(M))
    near = u[:M] * (1 + 1e-3)
    torch.testing.assert_close(p.round_sigma(near), u[:M], rtol=1e-12, atol=0)
    assert torch.equal(p.round_sigma(near, return_index=True), torch.arange(M))
    r = p.round_sigma(near.float())
    assert r.dtype == torch.float32 and torch.equal(r, p.u[:M].float())


def test_precond_state_dict_holds_only_the_network():
    """Every preconditioner's state_dict is F_θ's, under "model." (iDDPM's levels u are rebuilt
    from the config, not saved), so one model.safetensors loads into any of them."""
    F = ParamRecorder()
    keys = {"model." + k for k in F.state_dict()}
    for kind in ("edm", "vp", "ve", "iddpm"):
        D = make_precond({"type": kind}, F)
        assert set(D.state_dict()) == keys, kind
        D.load_state_dict({"model.weight": torch.full((), 2.0)})


# ------------------------------------------------------------------------ losses
def test_edm_sigma_distribution_is_lognormal():
    """EDM: ln σ ~ N(P_mean, P_std²): Monte Carlo mean and std of ln σ (20000 draws, 5 s.e.)."""
    g = torch.Generator().manual_seed(0)
    ln = EDMLoss(P_mean=-1.2, P_std=1.2).sample_sigma(20000, g).log()
    se = 1.2 / math.sqrt(20000)
    assert abs(ln.mean().item() + 1.2) < 5 * se
    assert abs(ln.std().item() - 1.2) < 5 * se * 0.75


def test_ve_vp_iddpm_sigma_distributions():
    """VE: ln σ ~ U(ln 0.02, ln 100); VP: σ⁻¹(σ) ~ U(ε_t, 1); iDDPM: σ ∈ {u_0..u_{M−1}}
    uniformly (Monte Carlo means within 5 s.e.)."""
    g = torch.Generator().manual_seed(1)
    n = 20000
    ln = VELoss().sample_sigma(n, g).log()
    lo, hi = math.log(0.02), math.log(100)
    assert ln.min() >= lo and ln.max() <= hi
    assert abs(ln.mean().item() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * n)
    t = vp_sigma_inv(VPLoss().sample_sigma(n, g))
    assert t.min() >= 1e-5 - 1e-12 and t.max() <= 1 + 1e-12
    assert abs(t.mean().item() - (1 + 1e-5) / 2) < 5 / math.sqrt(12 * n)
    s = iDDPMLoss().sample_sigma(n, g)
    u = torch.from_numpy(iddpm_u())
    j = (s[:, None] - u[None]).abs().argmin(1).double()
    assert torch.equal(u[j.long()], s) and j.max() <= 999
    assert abs(j.mean().item() - 499.5) < 5 * 1000 / math.sqrt(12 * n)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve", "iddpm"])
def test_loss_is_effective_weight_times_effective_target_error(kind):
    """EDM eq. 8 in the slides' form: λ(σ)·||D(y+n; σ) − y||² =
    λ(σ)c_out²·||F(c_in(y+n); c_noise) − (y − c_skip(y+n))/c_out||², with σ, then n, from the
    generator; for EDM, VP, VE and iDDPM λ(σ)c_out² = 1, so the loss is the plain error of F."""
    torch.manual_seed(0)
    y = torch.rand(4, 1, 5, 5, dtype=torch.float64) * 2 - 1
    F = Recorder(0.7)
    D = make_precond({"type": kind}, F)
    loss_fn = make_loss({"type": kind})
    g = torch.Generator().manual_seed(5)
    out = loss_fn(D, y, g)
    g = torch.Generator().manual_seed(5)
    sigma = loss_fn.sample_sigma(4, g)
    n = torch.randn(y.shape, generator=g, dtype=torch.float64) * sigma[:, None, None, None]
    torch.testing.assert_close(out["sigma"], sigma, rtol=0, atol=0)
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in D.coefficients(sigma))
    target = (y - c_skip * (y + n)) / c_out
    expect = mean_flat((F(c_in * (y + n), c_noise) - target) ** 2)
    torch.testing.assert_close(out["loss"], expect, rtol=1e-9, atol=0)
    torch.testing.assert_close(out["mse"], mean_flat((D(y + n, sigma) - y) ** 2))


def test_loss_passes_conditioning_and_keeps_float32():
    """model_kwargs reach F_θ through the loss (class labels y); a float32 batch gives σ, loss and
    mse in float32, σ being the generator's float64 draw rounded to float32."""
    F = Recorder(0.7)
    y = torch.rand(3, 1, 4, 4) * 2 - 1
    labels = torch.tensor([0, 4, 2])
    out = EDMLoss()(EDMPrecond(F), y, torch.Generator().manual_seed(2), {"y": labels})
    assert torch.equal(F.calls[-1][2]["y"], labels)
    sigma = EDMLoss().sample_sigma(3, torch.Generator().manual_seed(2))
    assert out["sigma"].dtype == out["loss"].dtype == out["mse"].dtype == torch.float32
    assert torch.equal(out["sigma"], sigma.float())


# ------------------------------------------------------------------------ P2 and Min-SNR-γ
def _stub(x, t, **kw):
    return 0.3 * x + 0.01 * t.double()[:, None, None, None]


def _losses(**kw):
    d = GaussianDiffusion(beta_schedule("linear", 100), **kw)
    torch.manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 10, 40, 70, 90, 99])
    noise = torch.randn_like(x0)
    model = _stub if not d.learns_variance else (
        lambda x, t: torch.cat([_stub(x, t), torch.tanh(x)], dim=1))   # + variance channels
    return d, x0, t, noise, d.training_losses(model, x0, t, noise)


def test_p2_weighting():
    """P2: λ_t = 1/(k + SNR(t))^γ on L_simple. γ = 0 is plain L_simple (loss = mse, bit for bit);
    γ = 1, k = 1 gives loss = mse/(1 + SNR(t)) with SNR = ᾱ/(1 − ᾱ); the mse term itself and the
    hybrid VLB term stay unweighted."""
    _, _, _, _, plain = _losses()
    _, _, _, _, off = _losses(p2_gamma=0.0)
    assert torch.equal(off["loss"], plain["loss"]) and torch.equal(plain["loss"], plain["mse"])
    d, _, t, _, p2 = _losses(p2_gamma=1.0, p2_k=1.0)
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    torch.testing.assert_close(p2["loss"], p2["mse"] / (1 + snr), rtol=1e-14, atol=0)
    torch.testing.assert_close(p2["mse"], plain["mse"], rtol=0, atol=0)
    d, _, t, _, p2 = _losses(p2_gamma=0.5, p2_k=2.0, var_type="learned_range", loss_type="hybrid")
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    torch.testing.assert_close(p2["loss"] - p2["vb"], p2["mse"] / (2 + snr) ** 0.5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_min_snr_weighting_is_min_snr_times_x0_error(mean_type):
    """Min-SNR-γ: weight min(SNR, γ)/SNR (eps), min(SNR, γ) (x0), min(SNR, γ)/(SNR + 1) (v), so
    that for every parameterisation the loss equals min(SNR(t), γ)·mean((x̂0 − x0)²)."""
    d, x0, t, noise, out = _losses(mean_type=mean_type, min_snr_gamma=5.0)
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    expect_w = {"eps": np.minimum(snr, 5) / snr, "x0": np.minimum(snr, 5),
                "v": np.minimum(snr, 5) / (snr + 1)}[mean_type]
    np.testing.assert_allclose(d.mse_weight, expect_w, rtol=1e-14)
    x_t = d.q_sample(x0, t, noise)
    x0_hat = d.pred_xstart(_stub(x_t, t), x_t, t)
    expect = torch.from_numpy(np.minimum(snr, 5))[t] * mean_flat((x0_hat - x0) ** 2)
    torch.testing.assert_close(out["loss"], expect, rtol=1e-9, atol=0)


def test_weighting_options_are_recorded_and_old_configs_load():
    """make_diffusion passes p2_gamma/p2_k/min_snr_gamma through, make_config records them in the
    diffusion section, and a diffusion section without them (older config.json) still builds
    an unweighted diffusion."""
    d = make_diffusion(steps=50, p2_gamma=1.0, p2_k=2.0)
    assert d.p2_gamma == 1.0 and d.p2_k == 2.0 and d.mse_weight is not None
    old = dict(schedule="linear", steps=50, mean_type="eps", var_type="fixed_small",
               loss_type="mse", hybrid_lambda=0.001, vb_stop_grad=True)
    assert make_diffusion(**old).mse_weight is None
    cfg = make_config(UNetConfig(), old, {})
    assert cfg["diffusion"] | {} == old | dict(p2_gamma=0.0, p2_k=1.0, min_snr_gamma=0.0)
    with pytest.raises(UsageError):
        make_diffusion(steps=50, p2_gamma=1.0, min_snr_gamma=5.0)
    with pytest.raises(UsageError):
        make_diffusion(steps=50, loss_type="kl", var_type="learned", min_snr_gamma=5.0)


# ------------------------------------------------------------------------ augmentation
def _smooth_images(n=4, size=16, dtype=torch.float64):
    yy, xx = torch.meshgrid(torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype),
                            indexing="ij")
    base = torch.stack([torch.sin(0.3 * xx + k) + torch.cos(0.2 * yy - k) + 0.05 * xx * k
                        for k in range(n)])
    return base[:, None] / 3


def test_augment_p0_is_identity_with_zero_labels():
    """A_prob = 0: every parameter is 0, so the images come back unchanged and the 9 labels are 0."""
    x = _smooth_images()
    out, labels = AugmentPipe(0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and labels.shape == (4, AUGMENT_DIM) and not labels.any()
    assert AugmentPipe(0.12).label_dim == AUGMENT_DIM


def test_augment_xflip_only_labels_say_which_images_flipped():
    """x-flip alone at P = 1: label[0] = a_0 ∈ {0, 1}; flipped images equal x.flip(width),
    the others are unchanged; the same generator seed reproduces the batch."""
    pipe = AugmentPipe(1.0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
    x = _smooth_images(16)
    out, labels = pipe(x, torch.Generator().manual_seed(3))
    assert labels.shape == (16, 1) and set(labels[:, 0].tolist()) == {0.0, 1.0}
    for img, o, a in zip(x, out, labels[:, 0]):
        assert torch.equal(o, img.flip(2) if a == 1 else img)
    out2, labels2 = pipe(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, out2) and torch.equal(labels, labels2)


def test_augment_full_pipeline_is_reproducible_and_labels_are_the_table():
    """EDM's settings at P = 1: 9 labels (a_0, a_1, a_2, cos a_3 − 1, sin a_3, a_5 cos a_4,
    a_5 sin a_4, a_6, a_7); flips are 0/1, (cos − 1, sin) lie on the shifted unit circle;
    the same generator state gives the same images and labels, another seed differs."""
    x = _smooth_images(8)
    pipe = AugmentPipe(1.0)
    out, lab = pipe(x, torch.Generator().manual_seed(7))
    out2, lab2 = pipe(x, torch.Generator().manual_seed(7))
    assert torch.equal(out, out2) and torch.equal(lab, lab2)
    assert not torch.equal(lab, pipe(x, torch.Generator().manual_seed(8))[1])
    assert lab.shape == (8, 9) and out.shape == x.shape and torch.isfinite(out).all()
    assert set(lab[:, :2].flatten().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close((lab[:, 3] + 1) ** 2 + lab[:, 4] ** 2, torch.ones(8, dtype=x.dtype))


def test_augment_rotation_labels_describe_the_transform():
    """Rotation alone at P = 1: the output equals the image resampled through Rotate(a_3) with a_3
    recovered from the labels (cos a_3 − 1, sin a_3): the label fully describes the transform."""
    x = _smooth_images(4)
    pipe = AugmentPipe(1.0, xflip=0, yflip=0, scale=0, aniso=0, translate_frac=0)
    out, lab = pipe(x, torch.Generator().manual_seed(2))
    a3 = torch.atan2(lab[:, 1], lab[:, 0] + 1)
    like = torch.empty((), dtype=torch.float64)
    torch.testing.assert_close(out, _transform(x, rotate2d(a3, like)), rtol=0, atol=1e-12)


def test_augment_fractional_translation_by_whole_pixels_is_a_shift():
    """The resampling (reflect pad, sym6 2x up, grid_sample, sym6 down) is exact for an
    identity transform and moves the image by whole pixels for a translation of whole pixels:
    Translate2D(1, 0) gives out[..., x] = in[..., x − 1] away from the edge."""
    from gaussdiff.data.augment import translate2d
    x = _smooth_images(2)
    like = torch.empty((), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    torch.testing.assert_close(_transform(x, eye), x, rtol=0, atol=1e-6)
    shift = translate2d(torch.tensor([-1.0, -1.0]), torch.zeros(2), like)   # G_inv: out -> in
    torch.testing.assert_close(_transform(x, shift)[..., 1:], x[..., :-1], rtol=0, atol=1e-6)


def test_augment_integer_translation_is_a_reflected_shift():
    """Integer translation (off in EDM's settings, 2 more labels when on): out = the image shifted
    by (tx, ty) = label·W/8 pixels, reflected at the edges."""
    pipe = AugmentPipe(1.0, xflip=0, yflip=0, translate_int=1, scale=0, rotate_frac=0, aniso=0,
                       translate_frac=0)
    assert pipe.label_dim == 2
    x = torch.arange(2 * 16 * 16, dtype=torch.float64).reshape(2, 1, 16, 16)
    out, lab = pipe(x, torch.Generator().manual_seed(4))
    for img, o, (lx, ly) in zip(x, out, lab):
        tx, ty = int(round(lx.item() * 2)), int(round(ly.item() * 2))
        idx_x = [15 - abs(15 - ((i - tx) % 30)) for i in range(16)]   # reflect: -1 -> 1, 16 -> 14
        idx_y = [15 - abs(15 - ((i + ty) % 30)) for i in range(16)]
        assert torch.equal(o, img[:, idx_y][:, :, idx_x])


def test_unet_augment_conditioning():
    """augment_dim = 0 leaves the network's parameters unchanged; with augment_dim = 9 the labels
    enter through a bias-free linear map, so None and zero labels give the same output, and
    nonzero labels change it."""
    small = dict(image_size=8, model_channels=8, norm_groups=8, channel_mult=(1, 2),
                 attention_resolutions=())
    torch.manual_seed(0)
    a = UNetModel(UNetConfig(**small))
    torch.manual_seed(0)
    b = UNetModel(UNetConfig(**small, augment_dim=0))
    assert a.state_dict().keys() == b.state_dict().keys()
    old = {k: v for k, v in UNetConfig(**small).to_dict().items() if k != "augment_dim"}
    assert UNetConfig.from_dict(old).augment_dim == 0   # config.json written before the field
    net = UNetModel(UNetConfig(**small, augment_dim=9))
    for p in net.parameters():   # make the zero-initialised output layers non-trivial
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0])
    with torch.no_grad():
        plain = net(x, t)
        assert torch.equal(plain, net(x, t, augment_labels=torch.zeros(2, 9)))
        assert not torch.allclose(plain, net(x, t, augment_labels=torch.ones(2, 9)))
    with pytest.raises(ValueError):
        a(x, t, augment_labels=torch.zeros(2, 9))


# ------------------------------------------------------------------------ training end to end
TINY = ["--model-channels", "8", "--norm-groups", "8", "--channel-mult", "1,2",
        "--attention-resolutions", "", "--batch-size", "4", "--ema", "0.9", "--device", "cpu",
        "--no-progress", "--log-every", "1", "--lr", "1e-3"]


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8))
    return str(path)


def test_train_edm_then_load_denoiser(tmp_path, npz, capsys):
    """`gaussdiff train --objective edm --augment P` runs, writes the precond and objective sections,
    Heun sample grids, and `gaussdiff.load` rebuilds D(x; σ) whose output has x's shape; the
    discrete samplers refuse a σ-space model."""
    out = str(tmp_path / "run")
    assert main(["train", "--data", npz, "--out", out, "--objective", "edm", "--steps", "3",
                 "--sigma-data", "0.6", "--p-mean", "-1.0", "--augment", "0.5",
                 "--sample-every", "3", "--sample-num", "4", "--sample-steps", "3", *TINY]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["precond"] == {"type": "edm", "sigma_data": 0.6}
    assert cfg["objective"] == {"type": "edm", "P_mean": -1.0, "P_std": 1.2, "sigma_data": 0.6}
    assert cfg["model"]["augment_dim"] == 9 and cfg["model"]["out_channels"] == 1
    assert os.path.exists(os.path.join(out, "samples", "step0000003.png"))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    pipe = gaussdiff.load(out, device="cpu")
    assert isinstance(pipe.denoiser, EDMPrecond) and pipe.denoiser.sigma_data == 0.6
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        d = pipe.denoiser(x, torch.tensor([0.5, 5.0]))
    assert d.shape == x.shape and torch.isfinite(d).all()
    with pytest.raises(UsageError):
        pipe.sample(2, "ddim", 5, progress=False)


def test_train_edm_resume_is_bit_exact(tmp_path, npz):
    """Two steps, then --resume to four, give the same weights, EMA and optimizer state as four
    steps in one go (σ, noise and augmentation all come from the saved generator)."""
    from gaussdiff.modeldir import load_tensors
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", npz, "--objective", "edm", "--augment", "0.5", "--dropout", "0.1",
              "--sample-every", "0", *TINY]
    assert main(["train", "--out", a, "--steps", "4", *common]) == 0
    assert main(["train", "--out", b, "--steps", "2", *common]) == 0
    assert main(["train", "--out", b, "--steps", "4", "--resume", *common]) == 0
    for name in ("model.safetensors", "ema_0.9.safetensors", "state.safetensors"):
        ta, tb = load_tensors(os.path.join(a, name)), load_tensors(os.path.join(b, name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    other = [c if c != "edm" else "vp" for c in common]
    assert main(["train", "--out", b, "--steps", "5", "--resume", *other]) == 2   # refused


def test_train_ddpm_with_p2_records_weighting(tmp_path, npz):
    """`--p2-gamma 1` on the discrete objective lands in config.json's diffusion section and the
    loaded diffusion applies it; a σ-space objective refuses it."""
    out = str(tmp_path / "p2")
    assert main(["train", "--data", npz, "--out", out, "--steps", "1", "--p2-gamma", "1",
                 "--sample-every", "0", "--diffusion-steps", "50", *TINY]) == 0
    pipe = gaussdiff.load(out, device="cpu")
    assert pipe.config["diffusion"]["p2_gamma"] == 1.0 and pipe.denoiser is None
    assert pipe.diffusion.mse_weight is not None and "precond" not in pipe.config
    assert main(["train", "--data", npz, "--out", str(tmp_path / "x"), "--steps", "1",
                 "--objective", "edm", "--p2-gamma", "1", *TINY]) == 2


def test_objective_sections_fill_parameters():
    """objective_sections records every parameter of the precond and the loss, and
    make_precond / make_loss rebuild them; unknown types and keys are user errors."""
    pre, obj = objective_sections("vp")
    assert pre == {"type": "vp", "beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}
    assert obj == {"type": "vp", "beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5}
    assert make_loss(obj) == VPLoss()
    with pytest.raises(UsageError):
        make_precond({"type": "nope"}, nn.Identity())
    with pytest.raises(UsageError):
        make_precond({"type": "edm", "sigma": 1}, nn.Identity())
    with pytest.raises(UsageError):
        objective_sections("edm", sigma_data=0.0)


def test_objective_sections_record_edm_table_defaults_for_every_kind():
    """Every σ-space objective records EDM Table 1's defaults (VE σ ∈ [0.02, 100]; iDDPM C1 = 0.001,
    C2 = 0.008, M = 1000; EDM σ_data = 0.5, P_mean = −1.2, P_std = 1.2) and given EDM values as
    given (any P_std > 0); the sections rebuild the same objects."""
    expect = {"ve": [dict(sigma_min=0.02, sigma_max=100.0)] * 2,
              "iddpm": [dict(C1=0.001, C2=0.008, M=1000)] * 2,
              "edm": [dict(sigma_data=0.5), dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)]}
    for kind, (pre, obj) in expect.items():
        assert objective_sections(kind) == ({"type": kind, **pre}, {"type": kind, **obj}), kind
    v = VEPrecond(Recorder())
    assert v.sigma_min == 0.02 and v.sigma_max == 100.0
    pre, obj = objective_sections("edm", sigma_data=0.7, P_mean=-0.4, P_std=0.8)
    assert pre == {"type": "edm", "sigma_data": 0.7}
    assert obj == {"type": "edm", "P_mean": -0.4, "P_std": 0.8, "sigma_data": 0.7}
    assert make_loss(obj) == EDMLoss(P_mean=-0.4, P_std=0.8, sigma_data=0.7)
    assert make_precond(pre, Recorder()).sigma_data == 0.7


def test_config_errors_are_one_line_messages():
    """A missing or unknown type, bad parameters, an unknown objective and a non-positive
    σ_data or P_std are UsageErrors whose message names the section and the choices."""
    net, choices = nn.Identity(), "vp, ve, iddpm, edm"
    with pytest.raises(UsageError, match=rf"^precond: unknown type 'nope': choose one of {choices}$"):
        make_precond({"type": "nope"}, net)
    with pytest.raises(UsageError, match=rf"^precond: unknown type None: choose one of {choices}$"):
        make_precond({"sigma_data": 0.5}, net)
    with pytest.raises(UsageError, match=rf"^objective: unknown type 'nope': choose one of {choices}$"):
        make_loss({"type": "nope"})
    with pytest.raises(UsageError,
                       match=r"^precond 'edm': bad parameters \['sigma'\] \(.*argument 'sigma'\)$"):
        make_precond({"type": "edm", "sigma": 1}, net)
    with pytest.raises(UsageError, match=r"^objective 've': bad parameters \['sigma_data', "
                                         r"'sigma_min'\] \(.*argument 'sigma_data'\)$"):
        make_loss({"type": "ve", "sigma_min": 0.1, "sigma_data": 0.5})
    with pytest.raises(UsageError,
                       match=r"^unknown objective 'nope': choose one of ddpm, vp, ve, iddpm, edm$"):
        objective_sections("nope")
    with pytest.raises(UsageError, match=r"^--p-std must be positive, got 0\.0$"):
        objective_sections("edm", P_std=0.0)
    with pytest.raises(UsageError, match=r"^--sigma-data must be positive, got -1\.0$"):
        objective_sections("edm", sigma_data=-1.0)
    with pytest.raises(UsageError, match=r"^--sigma-data must be positive, got 0\.0$"):
        objective_sections("vp", sigma_data=0.0, precond="edm")   # the edm precond uses it
    with pytest.raises(UsageError, match=r"^unknown precond 'nope': choose one of vp, ve, iddpm, edm$"):
        objective_sections("vp", precond="nope")


def test_a_loss_with_another_columns_preconditioning():
    """EDM Table 2's config E: --objective vp --precond edm keeps VP's σ distribution and
    λ(σ) = 1/σ² and takes EDM's c_skip, c_out, c_in, c_noise. With F ≡ 0, D(x; σ) = c_skip·x with
    c_skip = σ_d²/(σ² + σ_d²), so the loss is (1/σ²)·mean((c_skip·(y + n) − y)²), written out."""
    from gaussdiff.diffusion.objectives import SigmaObjective
    pre, obj = objective_sections("vp", sigma_data=0.7, precond="edm")
    assert pre == {"type": "edm", "sigma_data": 0.7} and obj["type"] == "vp"
    objective = SigmaObjective("vp", sigma_data=0.7, precond="edm")
    net = objective.network(Recorder(0.0))
    y = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draw = objective.draw(y, torch.Generator().manual_seed(1))
    sigma = draw.levels
    assert torch.all((sigma >= vp_sigma(torch.tensor(1e-5, dtype=torch.float64)) - 1e-12)
                     & (sigma <= vp_sigma(torch.tensor(1.0, dtype=torch.float64)) + 1e-12))
    per_sample, terms = objective.losses(net, y, draw, {})
    c_skip = (0.49 / (sigma ** 2 + 0.49)).reshape(-1, 1, 1, 1)
    want = ((c_skip * (y + draw.noise) - y) ** 2).mean((1, 2, 3)) / sigma ** 2
    torch.testing.assert_close(per_sample, want)


def test_continuous_preconditioners_keep_sigma_as_given():
    """Only iDDPM rounds σ to its discrete levels u_j; the continuous preconditioners (EDM, VP,
    VE) return σ itself, as a tensor, for numbers and tensors alike."""
    from gaussdiff.diffusion.precond import make_precond
    for kind in ("edm", "vp", "ve"):
        p = make_precond({"type": kind}, torch.nn.Identity())
        assert torch.equal(p.round_sigma(0.37), torch.tensor(0.37))
        s = torch.tensor([0.1, 2.5], dtype=torch.float64)
        assert torch.equal(p.round_sigma(s), s)

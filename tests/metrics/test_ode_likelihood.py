"""The probability-flow ODE likelihood (gaussdiff.metrics.ode_likelihood, `gaussdiff nll --ode`):
closed-form Gaussian data, Hutchinson versus exact divergence, dequantization and bits/dim, CLI."""
import json
import math

import numpy as np
import pytest
import torch

from gaussdiff.cli import main
from gaussdiff.diffusion import make_diffusion
from gaussdiff.metrics.ode_likelihood import (bpd_from_logp, dequantize, divergence, draw_probes,
                                              gaussian_prior_logp, ode_log_likelihood)
from gaussdiff.modeldir import CONFIG_NAME, atomic_write_json, read_config

from guided_models import make_model_dir

S, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0


def gaussian_denoiser(mu, s=S):
    """The ideal denoiser of data N(μ, s² I): D(x; σ) = μ + s²/(s² + σ²)·(x − μ)."""
    def D(x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return D


def normal_logpdf(x, mean, var):
    """log N(x; mean, var·I) per row [B]."""
    d = x[0].numel()
    return -0.5 * d * math.log(2 * math.pi * var) - (x - mean).flatten(1).pow(2).sum(1) / (2 * var)


def _gaussian_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, 2, 3, generator=g, dtype=torch.float64) * 0.3
    x = mu + math.sqrt(S ** 2 + SIGMA_MIN ** 2) * torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    return mu, x


def test_gaussian_data_ode_logp_equals_exact_density():
    """Data N(μ, s²I): p_σ = N(μ, (s² + σ²)I), so with the exact prior at σ_max the ODE gives
    log N(x; μ, (s² + σ_min²)I) exactly (RK45 at tight tolerance), in float64. With the
    default prior N(0, σ_max² I) it is off by exactly the prior mismatch at x(σ_max), where
    x(σ_max) − μ = (x − μ)·sqrt((s² + σ_max²)/(s² + σ_min²)) (the ODE's closed-form solution)."""
    mu, x = _gaussian_problem()
    D = gaussian_denoiser(mu)
    exact = normal_logpdf(x, mu, S ** 2 + SIGMA_MIN ** 2)
    true_prior = lambda x_max, sigma: normal_logpdf(x_max, mu, S ** 2 + sigma ** 2)  # noqa: E731
    stats = {}
    out = ode_log_likelihood(D, x, SIGMA_MIN, SIGMA_MAX, rtol=1e-10, atol=1e-10,
                             prior_logp=true_prior, stats=stats)
    torch.testing.assert_close(out["logp"], exact, rtol=0, atol=1e-7)
    assert stats["nfe"] > 10
    # the change-of-variables term alone: ∫ (d − ∇·D) ds = d/2·log((s² + σ_max²)/(s² + σ_min²))
    d = x[0].numel()
    expected_delta = 0.5 * d * math.log((S ** 2 + SIGMA_MAX ** 2) / (S ** 2 + SIGMA_MIN ** 2))
    torch.testing.assert_close(out["delta_logp"], torch.full((4,), expected_delta, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    x_max = mu + (x - mu) * math.sqrt((S ** 2 + SIGMA_MAX ** 2) / (S ** 2 + SIGMA_MIN ** 2))
    torch.testing.assert_close(out["x_max"], x_max, rtol=1e-8, atol=1e-6)
    default = ode_log_likelihood(D, x, SIGMA_MIN, SIGMA_MAX, rtol=1e-10, atol=1e-10)
    mismatch = gaussian_prior_logp(x_max, SIGMA_MAX) - true_prior(x_max, SIGMA_MAX)
    torch.testing.assert_close(default["logp"], exact + mismatch, rtol=0, atol=1e-7)


def test_heun_converges_to_exact_density_at_second_order():
    """Heun with N steps (2N evaluations) approaches the exact Gaussian log density with error
    O(h²): doubling N divides the error by about 4."""
    mu, x = _gaussian_problem(1)
    D = gaussian_denoiser(mu)
    exact = normal_logpdf(x, mu, S ** 2 + SIGMA_MIN ** 2)
    prior = lambda x_max, sigma: normal_logpdf(x_max, mu, S ** 2 + sigma ** 2)  # noqa: E731
    errors = []
    for n in (40, 80):
        stats = {}
        out = ode_log_likelihood(D, x, SIGMA_MIN, SIGMA_MAX, steps=n, prior_logp=prior, stats=stats)
        assert stats["nfe"] == 2 * n
        errors.append((out["logp"] - exact).abs().max().item())
    assert errors[1] < 0.1   # 0.089 at N = 80 on EDM's ρ = 7 levels
    assert 3.0 < errors[0] / errors[1] < 5.0
    # the Jacobian c·I is diagonal: a single Rademacher probe gives the exact trace (εᵀcIε = c·d)
    probes = draw_probes(x.shape, 1, "rademacher", torch.Generator().manual_seed(0))
    hutch = ode_log_likelihood(D, x, SIGMA_MIN, SIGMA_MAX, steps=80, prior_logp=prior, probes=probes)
    torch.testing.assert_close(hutch["logp"], out["logp"], rtol=0, atol=1e-10)


def _nonlinear_denoiser(d, seed=0):
    """A smooth denoiser with a full (non-diagonal, non-symmetric) Jacobian, rows independent."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)

    def D(x, sigma):
        flat = x.flatten(1)
        c = (1 / (1 + sigma ** 2)).reshape(-1, 1)
        return (c * torch.tanh(flat @ W) + (1 - c) * 0.3 * flat).view_as(x)
    return D


def test_fixed_step_nll_reports_its_own_convergence(capsys):
    """A Heun --steps N run also integrates with N/2 steps; Heun's error is O(h²), so
    (bpd(N/2) − bpd(N))/3 estimates bpd(N) − bpd(exact). Checked on the exact denoiser of
    Gaussian data against a tight RK45 solution (exact trace, so no probe noise): in the
    asymptotic range (N ≥ 50 here) the estimate has the true error's sign and size (within
    25%), an N whose error exceeds the tolerance is flagged on stderr, a fine one passes."""
    from types import SimpleNamespace
    from gaussdiff.metrics.ode_likelihood import evaluate_ode_nll
    g = np.random.default_rng(0)
    images = np.clip(np.round((0.5 * g.standard_normal((3, 2, 3, 1)) + 1) * 127.5), 0, 255).astype(np.uint8)
    pipe = SimpleNamespace(task="generate", image_shape=(1, 2, 3), model=torch.nn.Linear(1, 1),
                           num_classes=None, path="gauss", denoiser=gaussian_denoiser(torch.zeros(1, 2, 3)))
    kw = dict(exact_trace=True, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, progress=False)
    exact = evaluate_ode_nll(pipe, images, rtol=1e-10, atol=1e-10, **kw)["bpd"]["mean"]
    assert "converged" not in evaluate_ode_nll(pipe, images, rtol=1e-6, atol=1e-6, **kw)
    coarse = evaluate_ode_nll(pipe, images, steps=50, tolerance=1e-3, **kw)
    c = coarse["convergence"]
    true_error = c["bpd"] - exact
    assert abs(true_error) > 1e-2 and c["half_steps"] == 25
    assert c["estimated_error"] == pytest.approx(true_error, rel=0.25)
    assert coarse["converged"] is False and "--steps 50 has not converged" in capsys.readouterr().err
    fine = evaluate_ode_nll(pipe, images, steps=200, tolerance=2e-3, **kw)
    assert fine["converged"] is True and abs(fine["bpd"]["mean"] - exact) < 2e-3
    assert capsys.readouterr().err == ""


def test_divergence_matches_jacobian():
    """divergence(): with probes, (1/K)·Σ ε_kᵀ J ε_k; without, the trace of J, both against the
    full Jacobian from torch.autograd.functional.jacobian, per row."""
    D = _nonlinear_denoiser(6)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((3,), 0.7, dtype=torch.float64)
    probes = draw_probes(x.shape, 5, "gaussian", torch.Generator().manual_seed(2))
    xg = x.clone().requires_grad_(True)
    est = divergence(D(xg, sigma), xg, probes)
    xg = x.clone().requires_grad_(True)
    exact = divergence(D(xg, sigma), xg, None)
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda r: D(r[None], sigma[:1])[0], x[b])
        assert exact[b].item() == pytest.approx(torch.trace(J).item(), abs=1e-12)
        quad = torch.stack([p[b] @ J @ p[b] for p in probes]).mean()
        assert est[b].item() == pytest.approx(quad.item(), abs=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_ode_logp_is_unbiased(probe):
    """On a nonlinear denoiser, the Hutchinson ODE log-likelihood averaged over 4000 probes (4000
    copies of one point, one probe each) equals the exact-trace value within 4 standard errors,
    and the standard error is small; Rademacher probes are ±1, Gaussian ones are not."""
    d = 4
    D = _nonlinear_denoiser(d)
    x = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.5
    exact = ode_log_likelihood(D, x, 0.01, 20.0, steps=6)["logp"].item()
    xs = x.expand(4000, d).clone()
    probes = draw_probes(xs.shape, 1, probe, torch.Generator().manual_seed(4))
    assert (probes.abs() == 1).all() == (probe == "rademacher")
    est = ode_log_likelihood(D, xs, 0.01, 20.0, steps=6, probes=probes)["logp"]
    stderr = est.std().item() / math.sqrt(len(est))
    assert 0 < stderr < 0.1
    assert abs(est.mean().item() - exact) < 4 * stderr


def test_dequantization_bins_and_bits_per_dim():
    """z = 2(k + u)/256 − 1 falls in pixel k's bin (floor((z + 1)·128) = k) and in [-1, 1);
    a uniform density on [-1, 1]^D (log p = −D·ln 2) is 8 bits/dim (256 equally likely bins);
    a uniform density on [0, 1]^D (log p = 0: 128 equally likely bins) is 7."""
    k = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    z = dequantize(k, gens)
    assert z.dtype == torch.float64 and z.shape == (4, 1, 8, 8)
    assert (z >= -1).all() and (z < 1).all()
    assert torch.equal(torch.floor((z + 1) * 128).to(torch.uint8), k.permute(0, 3, 1, 2))
    D = 3072
    assert bpd_from_logp(-D * math.log(2), D) == pytest.approx(8.0, abs=1e-12)
    assert bpd_from_logp(0.0, D) == pytest.approx(7.0, abs=1e-12)


# ------------------------------------------------------------------------------------ CLI
def _npz(path, n=3, seed=0):
    np.savez(path, np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))
    return str(path)


def test_nll_ode_cli_discrete_and_edm(tmp_path, capsys):
    """`nll --ode` runs end to end on a discrete-time model (DiscreteDenoiser) and on the same
    network as an EDM σ-space model: finite bpd, nfe = 2N with Heun N steps, bpd = mean of the
    per-image values, each −log p/(D ln 2) + 7; with Heun per-image values do not depend on the
    batch size; RK45 runs and reports its NFE."""
    model = make_model_dir(tmp_path / "m", num_classes=None)
    data = _npz(tmp_path / "d.npz")
    out = str(tmp_path / "nll.json")
    args = ["nll", model, "--ode", "--data", data, "--num", "3", "--steps", "2", "--seed", "1",
            "--no-progress", "--out", out]
    assert main(args + ["--batch-size", "3"]) == 0
    r = json.load(open(out))
    capsys.readouterr()
    assert r["method"] == "ode" and r["nfe"]["mean"] == 4 and r["settings"]["solver"] == "heun"
    per = np.array(r["per_image"]["bpd"])
    assert np.isfinite(per).all() and r["bpd"]["mean"] == pytest.approx(per.mean(), rel=1e-12)
    logp = np.array(r["per_image"]["logp"])
    np.testing.assert_allclose(per, -logp / (64 * math.log(2)) + 7, rtol=1e-12)
    np.testing.assert_allclose(logp, np.add(r["per_image"]["prior_logp"], r["per_image"]["delta_logp"]),
                               rtol=1e-12)
    beta_0 = make_diffusion("linear", 100).betas[0]   # the model's smallest σ, above 0.002
    assert r["settings"]["sigma_min"] == pytest.approx(math.sqrt(beta_0 / (1 - beta_0)), rel=1e-12)
    assert main(args + ["--batch-size", "1"]) == 0
    np.testing.assert_allclose(json.load(open(out))["per_image"]["bpd"], per, rtol=1e-5)
    summary = json.loads(capsys.readouterr().out)   # stdout: the summary without per-image values
    assert "per_image" not in summary and summary["bpd"]["mean"] == pytest.approx(per.mean(), rel=1e-5)
    assert main(["nll", model, "--ode", "--data", data, "--num", "1", "--rtol", "1e-2",
                 "--atol", "1e-2", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["settings"]["solver"] == "rk45" and r["nfe"]["mean"] >= 6
    assert math.isfinite(r["bpd"]["mean"])
    cfg = read_config(model)   # the same network as an EDM model: σ range [0.002, 80]
    cfg["precond"] = {"type": "edm", "sigma_data": 0.5}
    atomic_write_json(str(tmp_path / "m" / CONFIG_NAME), cfg)
    assert main(args + ["--num", "1", "--hutchinson-samples", "2", "--probe", "gaussian"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["settings"]["sigma_min"], r["settings"]["sigma_max"]) == (0.002, 80.0)
    assert math.isfinite(r["bpd"]["mean"]) and "2 gaussian probes" in r["settings"]["divergence"]
    assert main(args + ["--num", "1", "--steps", "1", "--exact-trace"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["settings"]["divergence"] == "exact" and math.isfinite(r["bpd"]["mean"])


@pytest.mark.parametrize("extra, message", [
    (["--ode", "--steps", "0"], "--steps 0"),
    (["--ode", "--steps", "ddim5"], "--steps ddim5"),
    (["--ode", "--hutchinson-samples", "0"], "--hutchinson-samples"),
    (["--ode", "--steps", "2", "--rtol", "1e-3"], "--rtol"),
    (["--ode", "--exact-trace", "--probe", "gaussian"], "--exact-trace"),
    (["--ode", "--steps", "2", "--sigma-min", "5", "--sigma-max", "1"], "sigma_min"),
    (["--hutchinson-samples", "3"], "add --ode"),
])
def test_nll_ode_bad_input_exits_2(tmp_path, capsys, extra, message):
    model = make_model_dir(tmp_path / "m", num_classes=None)
    data = _npz(tmp_path / "d.npz", n=1)
    assert main(["nll", model, "--data", data, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1

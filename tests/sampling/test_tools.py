"""Image tools: DDIM inversion and reconstruction, interpolation, inpainting, the cascade.

Inversion is checked on the exact ε-predictor of N(0, I) data, E[ε | x_t] = sqrt(1 − ᾱ_t)·x_t:
with ᾱ = cos²θ a DDIM step between levels a and b (either way) multiplies x by
c(a, b) = cos(θ_a − θ_b), so inversion and reconstruction have closed forms that pin down which
ᾱ every step uses.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gaussdiff
from gaussdiff.sampling import editing as tools
from gaussdiff.cli import main as cli_main
from gaussdiff.data import load_dataset, to_model_range
from gaussdiff.errors import UsageError
from gaussdiff.modeldir import Pipeline, make_config
from gaussdiff.nn.unet import SuperResModel, UNetConfig
from gaussdiff.training.trainer import DEFAULTS, Trainer
from guided_models import NUM_CLASSES, make_model_dir
from oracles import GaussianOracleEps

F64 = torch.float64


def gaussian_pipe(T=100, schedule="cosine"):
    diffusion = dict(schedule=schedule, steps=T, mean_type="eps", var_type="fixed_small",
                     loss_type="mse", hybrid_lambda=0.001, vb_stop_grad=True)
    cfg = make_config(UNetConfig(image_size=4, in_channels=2, out_channels=2), diffusion,
                      {"channels": 2, "image_size": 4})
    full = gaussdiff.make_diffusion(**diffusion)
    return Pipeline(GaussianOracleEps(full.alphas_cumprod), full, cfg)


@pytest.mark.parametrize("skip_last", [True, False])
def test_inversion_and_reconstruction_closed_form(skip_last):
    """Invert over 10 respaced steps, then decode: the latent is x_0·Π_{i<T'-1} cos(θ_{i+1} − θ_i)
    (·sin θ_{T'-1} when the last step, to ᾱ = 0, is taken too) and the reconstruction that times
    Π cos(θ_{i+1} − θ_i)·cos θ_0 (the decoder's last step to the clean image): skip_last ends on
    the level ᾱ_{T'-1} where sampling starts (ADM section H)."""
    pipe = gaussian_pipe()
    theta = np.arccos(np.sqrt(pipe.respaced(10).alphas_cumprod))
    P = np.prod(np.cos(np.diff(theta)))
    x0 = 0.5 * torch.tanh(torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    z = tools.invert(pipe, x0, 10, skip_last=skip_last, progress=False)
    last = 1.0 if skip_last else math.sin(theta[-1])
    torch.testing.assert_close(z, x0 * P * last, rtol=1e-10, atol=1e-12)
    x = tools.reconstruct(pipe, z, 10, progress=False, as_uint8=False)
    torch.testing.assert_close(x, x0 * P ** 2 * last * math.cos(theta[0]), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return dict(cond=make_model_dir(root / "cond", null_class=True),
                base=make_model_dir(root / "base", image_size=4, seed=2),
                up=make_model_dir(root / "up", low_res=4, seed=3))


def test_label_weights_mix_the_label_embedding(dirs):
    """y as label weights [B, K]: the network sees Σ_k y_k·E_k, i.e. the same as a label whose
    embedding row is that mixture; one-hot weights are the plain labels."""
    pipe = gaussdiff.load(dirs["cond"], device="cpu")
    net = pipe.model
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 60])
    w = tools.label_weights(pipe, [0, 2]).float()
    assert w.shape == (2, NUM_CLASSES + 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y=w), net(x, t, y=torch.tensor([0, 2])), rtol=0, atol=1e-6)
        mix = torch.tensor([[0.6, 0.0, 0.8, 0.0]] * 2)
        out = net(x, t, y=mix)
        emb = net.label_emb.weight
        saved = emb[1].clone()
        emb[1] = mix[0] @ emb
        torch.testing.assert_close(out, net(x, t, y=torch.tensor([1, 1])), rtol=1e-5, atol=1e-6)
        emb[1] = saved


def test_interpolation_endpoints_and_angles(dirs):
    """Frames use θ = 0 .. π/2: frame 0 is the reconstruction of image A with label A, the last
    frame that of image B with label B; the frames between differ from both."""
    pipe = gaussdiff.load(dirs["cond"], device="cpu")
    np.testing.assert_allclose(tools.slerp_angles(5), [0, math.pi / 8, math.pi / 4, 3 * math.pi / 8, math.pi / 2])
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    frames = tools.interpolate(pipe, a, b, 5, 6, labels=[0, 2], progress=False, as_uint8=False)
    for image, label, frame in ((a, 0, frames[0]), (b, 2, frames[-1])):
        z = tools.invert(pipe, image[None], 6, skip_last=True, labels=[label], progress=False)
        ref = tools.reconstruct(pipe, z, 6, labels=[label], progress=False, as_uint8=False)[0]
        # the frames run as a batch of 5 with label weights, the reference as a batch of 1 with
        # an integer label: float32 rounding, amplified by 12 DDIM steps, differs by 3e-5 to
        # 2.5e-4 from run to run (1e-4 made this test fail one run in four); any other frame
        # is ~2 away, so 2e-3 still tells the right frame from a wrong one
        torch.testing.assert_close(frame, ref, rtol=2e-3, atol=2e-3)
    assert (frames[2] - frames[0]).abs().max() > 1e-3 and (frames[2] - frames[-1]).abs().max() > 1e-3


def test_repaint_schedule():
    """RePaint's schedule: T·R denoising steps; each block of `jump` levels is walked down R
    times and re-noised back up in between; it runs from level T − 1 to the clean image (−1)."""
    moves = tools.repaint_levels(6, resample=3, jump=2)
    assert sum(d < 0 for _, d in moves) == 18
    level = 5
    for lv, d in moves:
        assert lv == (level if d < 0 else level)
        level += d
    assert level == -1
    assert [lv for lv, d in moves[:6]] == [5, 4, 3, 4, 5, 4]   # down 2, up 2, down ...
    assert tools.repaint_levels(4) == [(3, -1), (2, -1), (1, -1), (0, -1)]


def test_q_step_is_the_forward_transition():
    """RePaint's jump back from level l to l + 1 of a respaced diffusion draws from
    q(x_{l+1} | x_l) = N(sqrt(ᾱ_{l+1}/ᾱ_l)·x_l, (1 − ᾱ_{l+1}/ᾱ_l)·I), ᾱ_{-1} = 1."""
    diffusion = gaussdiff.make_diffusion("linear", 100, respacing="7")
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    abar = np.append(1.0, diffusion.alphas_cumprod)   # ᾱ_{-1}, ᾱ_0, ...
    for level in (-1, 0, 3, 5):
        ratio = abar[level + 2] / abar[level + 1]
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(level + 9), dtype=F64)
        out = tools.q_step(diffusion, x, level, torch.Generator().manual_seed(level + 9))
        torch.testing.assert_close(out, math.sqrt(ratio) * x + math.sqrt(1 - ratio) * z, rtol=1e-12, atol=1e-12)


class Spy(torch.nn.Module):
    """Records the inputs of the wrapped network."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x, t, **kw):
        self.inputs.append((x.detach().clone(), t.clone()))
        return self.net(x, t, **kw)


def test_inpaint_ddpm_replaces_the_known_region_with_its_noised_version(dirs):
    """DDPM inpainting: the network sees the known pixels as q_sample(x_0, t) with fresh unit
    noise (x_t − sqrt(ᾱ_t)·x_0)/sqrt(1 − ᾱ_t) at every call; with --resample R it makes T·R
    calls; the result keeps the known pixels exactly."""
    pipe = gaussdiff.load(dirs["cond"], device="cpu")
    pipe.model = Spy(pipe.model)
    image = np.full((8, 8, 1), 160, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:5] = True
    out = tools.inpaint(pipe, image, mask, num=2, steps=5, resample=2, seed=3, progress=False)
    assert out.shape == (2, 8, 8, 1) and (out[:, ~mask] == 160).all()
    assert len(pipe.model.inputs) == 10
    diffusion = pipe.respaced(5)
    x0, noises = 160 / 127.5 - 1, []
    for x, t in pipe.model.inputs:
        level = int(np.searchsorted(diffusion.timestep_map, int(t[0])))
        a = diffusion.alphas_cumprod[level]
        n = (x[:, 0][:, ~torch.from_numpy(mask)] - math.sqrt(a) * x0) / math.sqrt(1 - a)
        assert 0.6 < float(n.std()) < 1.5 and abs(float(n.mean())) < 0.5
        noises.append(n)
    assert all((p - q).abs().max() > 0.1 for p, q in zip(noises, noises[1:]))
    with pytest.raises(UsageError, match="resample"):
        tools.inpaint(pipe, image, mask, sampler="heun", steps=3, resample=2, progress=False)


def test_inpaint_sigma_space_keeps_the_known_region(dirs):
    """σ-space inpainting: every denoiser call sees the known pixels at x_0 + σ·n with the same
    n, the estimate's known pixels are x_0, and heun's result keeps them exactly."""
    x0 = torch.full((1, 1, 4, 4), 0.25, dtype=F64)
    known = torch.zeros(1, 1, 4, 4, dtype=F64)
    known[..., :2] = 1
    n = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    seen = []

    def D(x, sigma):
        seen.append((x[..., :2] - 0.25) / sigma.reshape(-1, 1, 1, 1))
        return torch.tanh(x)
    wrapped = tools.InpaintDenoiser(D, x0, known, n)
    for s in (5.0, 1.0, 0.2):
        out = wrapped(torch.randn(1, 1, 4, 4, dtype=F64), torch.tensor([s], dtype=F64))
        assert torch.equal(out[..., :2], x0[..., :2])
    for implied in seen:
        torch.testing.assert_close(implied, n[..., :2], rtol=1e-12, atol=1e-12)
    pipe = gaussdiff.load(dirs["cond"], device="cpu")
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[:, 4:] = True
    out = tools.inpaint(pipe, image, mask, num=2, sampler="heun", steps=3, labels=[1, 2], progress=False)
    assert (out[:, ~mask] == image[~mask]).all()


# ----------------------------------------------------------------------- two-stage models
def _npz(path, n=24, size=8, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rng.integers(0, 3, n))
    return str(path)


def test_image_size_area_downsamples_the_data(tmp_path):
    """--image-size 4 on 8x8 data: each pixel is the mean of its 2x2 block, rounded half up; a
    size that does not divide the data's is an error naming it."""
    data = _npz(tmp_path / "d.npz")
    images = np.load(data)["arr_0"].astype(np.int64)
    ds = load_dataset(data, image_size=4)
    block = images.reshape(-1, 4, 2, 4, 2, 1).sum((2, 4))
    np.testing.assert_array_equal(ds.images, (block + 2) // 4)
    with pytest.raises(UsageError, match="3x3"):
        load_dataset(data, image_size=3)


TINY = dict(model_channels=32, channel_mult="1", num_res_blocks=1, attention_resolutions="0",
            diffusion_steps=100, batch_size=8, sample_every=0, log_every=1, ema="0.9", save_every=1)


def test_upsample_task_trains_a_superres_model(tmp_path, dirs):
    """--task upsample --low-res 4: the network is a SuperResModel with 2C input channels, a
    batch's low_res is the batch area-downsampled, config.json records the task and load()
    rebuilds it; Pipeline.sample then needs low_res, and (on a randomised upsampler) its
    images depend on it."""
    data = _npz(tmp_path / "d.npz")
    opts = dict(DEFAULTS, data=data, task="upsample", low_res=4, steps=1, sample_num=2, **TINY)
    trainer = Trainer(dict(opts, sample_every=1), str(tmp_path / "up"), device="cpu", progress=False)
    assert isinstance(trainer.model, SuperResModel) and trainer.model.input_blocks[0][0].in_channels == 2
    x, kw = trainer.next_batch()
    torch.testing.assert_close(kw["low_res"], F.avg_pool2d(x, 2))
    trainer.run()
    assert (tmp_path / "up" / "samples" / "step0000001.png").exists()
    pipe = gaussdiff.load(str(tmp_path / "up"), device="cpu")
    assert pipe.config["task"] == {"type": "upsample", "low_res": 4} and isinstance(pipe.model, SuperResModel)
    low = torch.rand(2, 1, 4, 4) * 2 - 1
    with pytest.raises(UsageError, match="low_res"):
        pipe.sample(2, "ddim", 3, progress=False)
    assert pipe.sample(2, "ddim", 3, low_res=low, progress=False)[0].shape == (2, 8, 8, 1)
    pipe = gaussdiff.load(dirs["up"], device="cpu")
    a, _ = pipe.sample(2, "ddim", 3, low_res=low, labels=[0, 1], progress=False)
    b, _ = pipe.sample(2, "ddim", 3, low_res=-low, labels=[0, 1], progress=False)
    assert a.shape == (2, 8, 8, 1) and not np.array_equal(a, b)
    for bad, word in ((dict(low_res=8), "low-res"), (dict(task="generate", low_res=4), "--task upsample")):
        with pytest.raises(UsageError, match=word):
            Trainer(dict(opts, **bad), str(tmp_path / "bad"), device="cpu", progress=False)


def test_cascade_chains_base_and_upsampler(dirs):
    """The cascade's low-resolution images are the base model's own samples (same seed), and the
    upsampler receives them as low_res with the base model's labels."""
    base, up = gaussdiff.load(dirs["base"], device="cpu"), gaussdiff.load(dirs["up"], device="cpu")
    seen = []
    net = up.model
    up.model.forward = lambda x, t, **kw: (seen.append(kw), SuperResModel.forward(net, x, t, **kw))[1]
    high, low, y = tools.cascade(base, up, 3, "ddim", 3, seed=4, progress=False)
    ref, ref_y = base.sample(3, "ddim", 3, seed=4, progress=False)
    np.testing.assert_array_equal(low, ref)
    np.testing.assert_array_equal(y, ref_y)
    assert high.shape == (3, 8, 8, 1)
    torch.testing.assert_close(seen[0]["low_res"], to_model_range(torch.from_numpy(low)))
    assert seen[0]["y"].tolist() == y.tolist()
    with pytest.raises(UsageError, match="upsampler"):
        tools.cascade(base, base, 1, progress=False)


class OracleUpsampler(torch.nn.Module):
    """The ideal ε-network of data whose high-resolution image is the nearest-neighbour
    upsampling u of its low-resolution input: x_0 = u exactly, so ε*(x_t) = (x_t −
    sqrt(ᾱ_t)·u)/sqrt(1 − ᾱ_t), at the model's ORIGINAL timestep indices; zero variance channels."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.unused = torch.nn.Parameter(torch.zeros(()))   # Pipeline.sample reads the device

    def forward(self, x, t, low_res=None, **kwargs):
        u = F.interpolate(low_res.double(), size=x.shape[-2:], mode="nearest")
        a = self.abar[t.long()].view(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * u) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1).to(x.dtype)


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", 7), ("ddim", "ddim10")])
def test_cascade_with_an_oracle_upsampler_returns_the_known_answer(dirs, sampler, steps):
    """A known answer for the cascade's plumbing (issue 11: is the bundled upsampler wrong or
    under-trained?): with the ideal denoiser of data x_0 = upsample(low_res), every step's x̂_0
    is that image, DDIM and ancestral sampling (no noise at t = 0) both end on it, so the
    cascade's high-resolution output equals the base samples upsampled, pixel for pixel."""
    base, up = gaussdiff.load(dirs["base"], device="cpu"), gaussdiff.load(dirs["up"], device="cpu")
    up.model = OracleUpsampler(up.diffusion.alphas_cumprod)
    high, low, _ = tools.cascade(base, up, 3, sampler, steps, seed=5, progress=False)
    want = low.repeat(high.shape[1] // low.shape[1], 1).repeat(high.shape[2] // low.shape[2], 2)
    np.testing.assert_array_equal(high, want)


# ----------------------------------------------------------------------- CLI
def test_cli_image_tools(dirs, tmp_path, capsys):
    """invert (with --reconstruct), interpolate, inpaint and sample --cascade write the files
    they name; a class-conditional model without --labels is a one-line error."""
    from PIL import Image
    rng = np.random.default_rng(2)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths[-1])
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", dirs["cond"], "--device", "cpu", "--no-progress"]
    lat, recon = str(tmp_path / "lat.npz"), str(tmp_path / "recon.png")
    assert cli_main(["invert", *paths, "--out", lat, "--steps", "4", "--skip-last", "--labels", "0,1",
                     "--reconstruct", recon, *common]) == 0
    assert "psnr" in capsys.readouterr().out
    with np.load(lat) as f:
        assert f["latents"].shape == (2, 1, 8, 8) and f["labels"].tolist() == [0, 1]
    strip = str(tmp_path / "strip.png")
    assert cli_main(["interpolate", *paths, "--frames", "3", "--steps", "4", "--labels", "0,2",
                     "--out", strip, *common]) == 0
    with Image.open(strip) as im:
        assert im.size[0] > im.size[1] * 4   # one row: A, 3 frames, B
    filled = str(tmp_path / "filled.png")
    assert cli_main(["inpaint", paths[0], "--mask", str(tmp_path / "mask.png"), "--num", "2",
                     "--steps", "4", "--resample", "2", "--out", filled, "--npz",
                     str(tmp_path / "filled.npz"), *common]) == 0
    kept = np.load(tmp_path / "filled.npz")["arr_0"][:, 4:]
    assert (kept == np.asarray(Image.open(paths[0]))[None, 4:, :, None]).all()
    grid = str(tmp_path / "cascade.png")
    assert cli_main(["sample", "--cascade", dirs["base"], dirs["up"], "--num", "2", "--steps", "3",
                     "--grid", grid, "--out", str(tmp_path / "c.npz"), "--device", "cpu",
                     "--no-progress"]) == 0
    assert (tmp_path / "cascade.low.png").exists()
    assert np.load(tmp_path / "c.npz")["arr_0"].shape == (2, 8, 8, 1)
    capsys.readouterr()
    assert cli_main(["invert", paths[0], "--out", lat, *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--labels" in err[0]


# ----------------------------------------------------------------------- σ-space models
class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(μ, s²I) data: D(x; σ) = μ + s²/(s² + σ²)·(x − μ)."""
    sigma_min, sigma_max = 0.0, float("inf")   # as EDMPrecond: karras levels on [0.002, 80]

    def __init__(self, mu=0.1, s=0.5):
        super().__init__()
        self.mu, self.s2 = mu, s * s
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, **unused):
        return self.mu + self.s2 / (self.s2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - self.mu)


def test_sigma_space_inversion_is_euler_in_sigma():
    """σ-space inversion climbs the levels σ_{N-1} < ... < σ_0 of `sample --sampler euler
    --steps N`; reconstruction is that sampler from σ_0 to 0. With the exact Gaussian denoiser,
    x − D = σ²/(s² + σ²)·(x − μ): an Euler step σ -> σ' multiplies x − μ by
    g(σ, σ') = 1 + (σ' − σ)·σ/(s² + σ²) and the last step to 0 by s²/(s² + σ_{N-1}²), closed
    forms that pin every level. The round trip is first order: its error halves when the steps
    double, and is small at many steps."""
    base = gaussian_pipe()
    D = GaussianDenoiser()
    pipe = Pipeline(D, base.diffusion, dict(base.config, precond={"type": "edm", "sigma_data": 0.5}), "", D)
    mu, s2 = D.mu, D.s2
    x0 = 0.5 * torch.tanh(torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    levels = pipe.sigma_steps(10)[:-1][::-1]   # ascending, σ_min = 0.002 ... σ_max = 80
    assert (levels[0], levels[-1]) == pytest.approx((0.002, 80.0))
    up = np.prod([1 + (b - a) * a / (s2 + a * a) for a, b in zip(levels[:-1], levels[1:])])
    down = np.prod([1 + (a - b) * b / (s2 + b * b) for a, b in zip(levels[:-1], levels[1:])])
    z = tools.invert(pipe, x0, 10, progress=False)
    torch.testing.assert_close(z, mu + (x0 - mu) * up, rtol=1e-12, atol=1e-12)
    x = tools.reconstruct(pipe, z, 10, progress=False, as_uint8=False)
    last = s2 / (s2 + levels[0] ** 2)
    torch.testing.assert_close(x, mu + (x0 - mu) * up * down * last, rtol=1e-12, atol=1e-12)
    errors = {}
    for N in (32, 64, 128, 256, 2048):
        x = tools.reconstruct(pipe, tools.invert(pipe, x0, N, progress=False), N, progress=False,
                              as_uint8=False)
        errors[N] = float((x - x0).abs().max() / (x0 - mu).abs().max())
    for N in (32, 64, 128):
        assert 1.85 < errors[N] / errors[2 * N] < 2.1, errors
    assert errors[2048] < 0.003, errors
    for bad in (True, False):
        with pytest.raises(UsageError, match="--skip-last"):
            tools.invert(pipe, x0, 4, skip_last=bad, progress=False)
    with pytest.raises(UsageError, match="Euler steps"):
        tools.invert(pipe, x0, "ddim4", progress=False)


@pytest.fixture(scope="module")
def edm_dir(tmp_path_factory):
    """A class-conditional (null label) model directory trained, as far as config.json says,
    with --objective edm."""
    import os
    from gaussdiff.modeldir import CONFIG_NAME, atomic_write_json, read_config
    path = make_model_dir(tmp_path_factory.mktemp("edm") / "m", null_class=True, seed=5)
    cfg = read_config(path)
    cfg["precond"] = {"type": "edm", "sigma_data": 0.5}
    atomic_write_json(os.path.join(path, CONFIG_NAME), cfg)
    return path


def test_sigma_space_reconstruct_and_interpolate(edm_dir):
    """Decoding the latent noise·σ_max gives `sample --sampler euler` bit for bit (with the
    labels); interpolation's first and last frames decode each image's own latent with its own
    label, and the frames between differ from both."""
    from gaussdiff.modeldir import seed_for
    from gaussdiff.rng import per_sample_generators
    pipe = gaussdiff.load(edm_dir, device="cpu")
    ref, _ = pipe.sample(2, "euler", 4, seed=7, labels=[0, 2], progress=False)
    gens = per_sample_generators([seed_for(7, i) for i in range(2)])
    noise = torch.stack([torch.randn(pipe.image_shape, generator=g) for g in gens])
    out = tools.reconstruct(pipe, noise.double() * float(pipe.sigma_steps(4)[0]), 4, labels=[0, 2],
                            progress=False)
    np.testing.assert_array_equal(out, ref)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    frames = tools.interpolate(pipe, a, b, 3, 4, labels=[0, 2], progress=False, as_uint8=False)
    for image, label, frame in ((a, 0, frames[0]), (b, 2, frames[-1])):
        z = tools.invert(pipe, image[None], 4, labels=[label], progress=False)
        assert z.dtype == torch.float32 and 20 < float(z.std()) < 200   # x at σ_max = 80
        ref = tools.reconstruct(pipe, z, 4, labels=[label], progress=False, as_uint8=False)[0]
        torch.testing.assert_close(frame, ref, rtol=1e-4, atol=1e-4)
    assert (frames[1] - frames[0]).abs().max() > 1e-3 and (frames[1] - frames[-1]).abs().max() > 1e-3
    with pytest.raises(UsageError, match="--skip-last"):
        tools.interpolate(pipe, a, b, 3, 4, skip_last=True, labels=[0, 2], progress=False)


def test_cli_sigma_space_invert_and_interpolate(edm_dir, tmp_path, capsys):
    """`gaussdiff invert --reconstruct` and `gaussdiff interpolate` run on a σ-space model;
    --skip-last there is a one-line error."""
    from PIL import Image
    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths[-1])
    common = ["--model", edm_dir, "--device", "cpu", "--no-progress"]
    lat, recon, strip = (str(tmp_path / f) for f in ("lat.npz", "recon.png", "strip.png"))
    assert cli_main(["invert", *paths, "--out", lat, "--steps", "4", "--labels", "0,1",
                     "--reconstruct", recon, *common]) == 0
    assert "psnr" in capsys.readouterr().out
    with np.load(lat) as f:
        assert f["latents"].shape == (2, 1, 8, 8) and not f["skip_last"]
    assert cli_main(["interpolate", *paths, "--frames", "3", "--steps", "4", "--labels", "0,2",
                     "--out", strip, *common]) == 0
    with Image.open(strip) as im:
        assert im.size[0] > im.size[1] * 4
    capsys.readouterr()
    for cmd in (["invert", *paths, "--out", lat, "--skip-last"],
                ["interpolate", *paths, "--out", strip, "--skip-last", "true"]):
        assert cli_main([*cmd, "--steps", "4", "--labels", "0,1", *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--skip-last" in err[0], err

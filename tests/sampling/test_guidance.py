"""Classifier guidance, classifier-free guidance, temperature, label dropout and noisy classifiers.

The guidance formulas are checked exactly (float64) with an analytic classifier,
log p(y | x_t) = <G_y, x_t> + const, whose gradient is the constant G_y: ADM Algorithm 1 moves the
DDPM mean by s·Σ·G_y, Algorithm 2 the DDIM ε by −s·sqrt(1 − ᾱ_t)·G_y, and in σ-space
D moves by s·σ²·∇_x = s·σ²·G_y/sqrt(1 + σ²) (x_t = x/sqrt(1 + σ²)).
"""
import json
import math
from functools import partial

import numpy as np
import pytest
import torch

import gaussdiff
from gaussdiff.sampling import samplers as S
from gaussdiff.diffusion.objectives import ClassifierObjective, Draw
from gaussdiff.diffusion.timesteps import make_schedule_sampler
from gaussdiff.training.classifier import ClassifierTrainer, load_classifier
from gaussdiff.cli import main as cli_main
from gaussdiff.sampling.denoisers import DiscreteDenoiser
from gaussdiff.diffusion import make_diffusion
from gaussdiff.errors import UsageError
from gaussdiff.modeldir import Pipeline
from gaussdiff.sampling.guidance import (ClassifierCondFn, ClassifierFree, ClassifierGuidedDenoiser,
                                         EpsTemperature, Guidance, WithoutLabels, classifier_grad,
                                         eps_offset, table_sigma)
from gaussdiff.nn.encoder import AttentionPool2d, EncoderConfig, EncoderUNetModel
from gaussdiff.rng import per_sample_generators
from gaussdiff.training.trainer import DEFAULTS, Trainer
from guided_models import NUM_CLASSES, make_classifier_dir, make_model_dir

F64 = torch.float64
T = 60
SHAPE = (3, 2, 4, 4)
G = torch.randn((NUM_CLASSES,) + SHAPE[1:], generator=torch.Generator().manual_seed(7), dtype=F64)
Y = torch.tensor([0, 2, 1])


def log_prob(x_t, t, y):
    """The analytic classifier: log p(y | x_t) = <G_y, x_t> + const, so ∇_{x_t} = G_y."""
    return (G[y] * x_t).flatten(1).sum(1)


def sigma_log_prob(x, sigma, y):
    """The same classifier in σ-space: it sees x_t = x/sqrt(1 + σ²)."""
    return log_prob(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), None, y)


def toy_model(learns_variance=False):
    """A smooth network F(x_t, t, y), row by row; 2C channels for a learned variance."""
    def F(x, t, y=None, **unused):
        out = 0.9 * torch.tanh(0.8 * x + 0.005 * t.to(x.dtype).reshape(-1, 1, 1, 1))
        if y is not None:
            out = out + 0.1 * y.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([out, torch.tanh(0.5 * x)], 1) if learns_variance else out
    return F


def x_at(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


def gens():
    return per_sample_generators([11, 12, 13])


# ----------------------------------------------------------------------- classifier guidance
@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("step", [0, 17])
def test_ddpm_guidance_shifts_the_mean_by_s_sigma_g(var_type, step):
    """ADM Algorithm 1: with cond_fn = s·∇log p = s·G_y, a DDPM step's sample moves by exactly
    s·Σ·G_y (same noise), Σ the step's (learned or fixed) variance; at t = 0 too."""
    diffusion = make_diffusion("linear", T, "eps", var_type)
    F, x, t, s, kw = toy_model(diffusion.learns_variance), x_at(0), torch.full((3,), step), 2.5, {"y": Y}
    plain = diffusion.p_sample(F, x, t, model_kwargs=kw, generator=gens())["sample"]
    guided = diffusion.p_sample(F, x, t, model_kwargs=kw, generator=gens(),
                                cond_fn=ClassifierCondFn(log_prob, s))["sample"]
    Sigma = diffusion.p_mean_variance(F, x, t, model_kwargs=kw)["variance"]
    torch.testing.assert_close(guided - plain, s * Sigma * G[Y], rtol=1e-9, atol=1e-13)


def test_ddpm_gradient_at_the_predicted_mean():
    """cond_at_mean: the classifier gets the unguided mean μ of p(x_{t-1} | x_t) and the model
    timestep of step t − 1 (respaced: the previous kept original index), not x_t and t."""
    diffusion = make_diffusion("linear", T, "eps", "fixed_small", respacing="10")
    seen = []

    def spy(x, t, y):
        seen.append((x.detach().clone(), t.clone()))
        return log_prob(x, t, y)
    F, x, t, kw = toy_model(), x_at(1), torch.full((3,), 4), {"y": Y}
    mean = diffusion.p_mean_variance(F, x, t, model_kwargs=kw)["mean"]
    diffusion.p_sample(F, x, t, model_kwargs=kw, cond_fn=ClassifierCondFn(spy, 1.0), cond_at_mean=True)
    diffusion.p_sample(F, x, t, model_kwargs=kw, cond_fn=ClassifierCondFn(spy, 1.0))
    (x_mean, t_mean), (x_t, t_t) = seen
    assert torch.equal(x_mean, mean) and t_mean.tolist() == [diffusion.timestep_map[3]] * 3
    assert torch.equal(x_t, x) and t_t.tolist() == [diffusion.timestep_map[4]] * 3


def test_ddim_guidance_shifts_eps_by_minus_s_sqrt_one_minus_abar_g():
    """ADM Algorithm 2 (eq. 60): ε̂ = ε − s·sqrt(1 − ᾱ_t)·G_y, and the DDIM step uses ε̂:
    x_{t-1} = sqrt(ᾱ_{t-1})·(x_t − sqrt(1 − ᾱ_t)·ε̂)/sqrt(ᾱ_t) + sqrt(1 − ᾱ_{t-1})·ε̂."""
    diffusion = make_diffusion("linear", T, "eps", "fixed_small", respacing="12")
    F, x, s, k, kw = toy_model(), x_at(2), 1.5, 7, {"y": Y}
    t, cond_fn = torch.full((3,), k), ClassifierCondFn(log_prob, s)
    out = diffusion.p_mean_variance(F, x, t, clip_denoised=False, model_kwargs=kw)
    guided = diffusion.condition_score(cond_fn, out, x, t, kw)
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    eps_hat = diffusion.predict_eps_from_xstart(x, t, guided["pred_xstart"])
    a, a_prev = diffusion.alphas_cumprod[k], diffusion.alphas_cumprod_prev[k]
    torch.testing.assert_close(eps_hat - eps, -s * math.sqrt(1 - a) * G[Y], rtol=1e-9, atol=1e-12)
    step = diffusion.ddim_sample(F, x, t, clip_denoised=False, model_kwargs=kw, cond_fn=cond_fn)
    eps_hat = F(x, torch.full((3,), int(diffusion.timestep_map[k])), Y) - s * math.sqrt(1 - a) * G[Y]
    x0_hat = (x - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
    torch.testing.assert_close(step["sample"], math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * eps_hat,
                               rtol=1e-9, atol=1e-12)


def test_sigma_space_guidance_is_s_sigma2_grad_and_equals_discrete_ddim():
    """σ-space: D̂ = D + s·σ²·∇_x log p(y | x/sqrt(1 + σ²)) = D + s·σ²·G_y/sqrt(1 + σ²); and
    Euler (= DDIM) with D̂ on a respaced diffusion's levels gives the guided discrete DDIM loop's
    sample: the σ-space formula is ADM eq. 60 at the matching scaling."""
    full = make_diffusion("linear", T, "eps", "fixed_small")
    respaced = make_diffusion("linear", T, "eps", "fixed_small", respacing="10")
    F, s = toy_model(), 2.0
    D = DiscreteDenoiser(F, full.alphas_cumprod, "eps", quantize=True)
    guided = ClassifierGuidedDenoiser(D, sigma_log_prob, s)
    x, sigma = x_at(3), torch.full((3,), 1.7, dtype=F64)
    torch.testing.assert_close(guided(x, sigma, y=Y) - D(x, sigma, y=Y),
                               s * 1.7 ** 2 * G[Y] / math.sqrt(1 + 1.7 ** 2), rtol=1e-9, atol=1e-12)
    z = x_at(4)
    ref = respaced.ddim_sample_loop(F, z.shape, noise=z, clip_denoised=False, model_kwargs={"y": Y},
                                    cond_fn=ClassifierCondFn(log_prob, s))
    levels = D.sigmas[respaced.timestep_map].flip(0)
    sigmas = torch.cat([levels, torch.zeros(1, dtype=F64)])
    out = S.euler(guided, z * (1 + levels[0] ** 2).sqrt(), sigmas, model_kwargs={"y": Y})
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def test_clip_guided_clamps_the_shifted_x0_and_matches_sigma_space():
    """On a cosine schedule the first DDIM step's guided x̂_0 moves by s·sqrt(1/ᾱ − 1)·
    sqrt(1 − ᾱ)·G_y ≈ s·σ_T·G_y (σ_T ≈ 2·10⁴ for T = 1000): ADM's published step (clip before
    the shift) leaves it there; clip_guided clamps it to [-1, 1], i.e. x̂_0 = clamp(x̂_0^ADM),
    and the step is then x_{t-1} = sqrt(ᾱ_{t-1})·x̂_0 + sqrt(1 − ᾱ_{t-1})·ε̂(x̂_0). Euler in
    σ-space with clip → guide → clip gives the same loop."""
    full = make_diffusion("cosine", 1000, "eps", "fixed_small")
    respaced = make_diffusion("cosine", 1000, "eps", "fixed_small", respacing="10")
    F, s, kw = toy_model(), 0.5, {"y": Y}
    k = respaced.num_timesteps - 1
    t, x, cond_fn = torch.full((3,), k), x_at(8), ClassifierCondFn(log_prob, s)
    out = respaced.p_mean_variance(F, x, t, clip_denoised=True, model_kwargs=kw)
    adm = respaced.condition_score(cond_fn, out, x, t, kw)["pred_xstart"]
    a = respaced.alphas_cumprod[k]
    shift = s * math.sqrt(1 / a - 1) * math.sqrt(1 - a) * G[Y]
    torch.testing.assert_close(adm - out["pred_xstart"], shift, rtol=1e-9, atol=1e-9)
    assert adm.abs().max() > 100   # the published step leaves the data range by orders of magnitude
    step = respaced.ddim_sample(F, x, t, model_kwargs=kw, cond_fn=cond_fn, clip_guided=True)
    x0 = adm.clamp(-1, 1)
    torch.testing.assert_close(step["pred_xstart"], x0, rtol=0, atol=0)
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    a_prev = respaced.alphas_cumprod_prev[k]
    torch.testing.assert_close(step["sample"], math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps,
                               rtol=1e-9, atol=1e-9)
    z = x_at(9)
    ref = respaced.ddim_sample_loop(F, z.shape, noise=z, model_kwargs=kw, cond_fn=cond_fn,
                                    clip_guided=True)
    D = DiscreteDenoiser(F, full.alphas_cumprod, "eps", quantize=True)
    from gaussdiff.sampling.denoisers import ClipDenoised
    guided = ClipDenoised(ClassifierGuidedDenoiser(ClipDenoised(D), sigma_log_prob, s))
    levels = D.sigmas[respaced.timestep_map].flip(0)
    sigmas = torch.cat([levels, torch.zeros(1, dtype=F64)])
    out = S.euler(guided, z * (1 + levels[0] ** 2).sqrt(), sigmas, model_kwargs=kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-7)


def test_scale_zero_reproduces_unguided_samples_bit_for_bit():
    """Classifier guidance at s = 0 changes no bit, though the classifier runs: ddpm (μ + Σ·0),
    ddim with η > 0 (x̂_0 shifted by 0) and a stochastic σ-space sampler (D + σ²·0)."""
    diffusion = make_diffusion("linear", T, "eps", "learned_range", respacing="8")
    F, z, kw, zero = toy_model(True), x_at(5), {"y": Y}, ClassifierCondFn(log_prob, 0.0)
    for loop in (diffusion.p_sample_loop, partial(diffusion.ddim_sample_loop, eta=0.5)):
        plain = loop(F, z.shape, noise=z, model_kwargs=kw, generator=gens())
        assert torch.equal(plain, loop(F, z.shape, noise=z, model_kwargs=kw, generator=gens(), cond_fn=zero))
    D = DiscreteDenoiser(F, make_diffusion("linear", T).alphas_cumprod)
    sigmas = [10.0, 3.0, 1.0, 0.3, 0.05, 0.0]
    plain = S.euler_ancestral(D, z * 10, sigmas, generator=gens(), model_kwargs=kw)
    guided = S.euler_ancestral(ClassifierGuidedDenoiser(D, sigma_log_prob, 0.0), z * 10, sigmas,
                               generator=gens(), model_kwargs=kw)
    assert torch.equal(plain, guided)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    return dict(cond=make_model_dir(root / "cond", null_class=True),
                plain=make_model_dir(root / "plain"),
                uncond=make_model_dir(root / "uncond", num_classes=None),
                cls=make_classifier_dir(root / "cls"))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_pipeline_guidance_at_scale_zero_and_cfg_one_change_nothing(dirs, sampler):
    """Pipeline.sample with a noisy classifier at s = 0, or classifier-free guidance at w = 1,
    gives the unguided images and labels bit for bit; s = 200 and w = 3 change them. An
    unconditional model guided by the classifier samples the classifier's labels."""
    pipe, cls = gaussdiff.load(dirs["cond"], device="cpu"), load_classifier(dirs["cls"], device="cpu")
    kw = dict(num=3, sampler=sampler, steps=4, seed=5, progress=False)
    ref, y = pipe.sample(**kw)
    for guidance in (Guidance(cls, 0.0), Guidance(cfg_scale=1.0)):
        images, labels = pipe.sample(**kw, guidance=guidance)
        np.testing.assert_array_equal(images, ref)
        np.testing.assert_array_equal(labels, y)
    for guidance in (Guidance(cls, 200.0), Guidance(cfg_scale=3.0)):
        assert not np.array_equal(pipe.sample(**kw, guidance=guidance)[0], ref)
    uncond = gaussdiff.load(dirs["uncond"], device="cpu")
    images, labels = uncond.sample(**kw, guidance=Guidance(cls, 1.0))
    assert images.shape == (3, 8, 8, 1) and labels.shape == (3,) and labels.max() < NUM_CLASSES


# ----------------------------------------------------------------------- classifier-free
def test_cfg_identities(dirs):
    """D_w = D_u + w·(D_c − D_u): w = 1 is the conditional network and w = 0 the unconditional
    one (the null label), bit for bit; w = 2.5 mixes the ε channels (one batch of 2B) and keeps
    the conditional variance; outside the σ interval the output is the conditional one. The
    same for a denoiser. A model without a null label refuses classifier-free guidance."""
    pipe = gaussdiff.load(dirs["cond"], device="cpu")
    F, null = pipe.model, NUM_CLASSES
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        c, u = F(x, t, y=y), F(x, t, y=torch.full_like(y, null))
        assert torch.equal(ClassifierFree(F, 1.0, null)(x, t, y=y), c)
        assert torch.equal(ClassifierFree(F, 0.0, null)(x, t, y=y), u)
        w = ClassifierFree(F, 2.5, null)(x, t, y=y)
        torch.testing.assert_close(w[:, :1], u[:, :1] + 2.5 * (c[:, :1] - u[:, :1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w[:, 1:], c[:, 1:], rtol=1e-5, atol=1e-5)
        sigma_of = table_sigma(pipe.diffusion.alphas_cumprod)
        s50 = float(sigma_of(t)[1])
        inside = ClassifierFree(F, 2.5, null, (0.99 * s50, 1.01 * s50), sigma_of)(x, t, y=y)
        torch.testing.assert_close(inside[[0, 2]], c[[0, 2]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inside[1], w[1], rtol=1e-5, atol=1e-5)
        D = DiscreteDenoiser(F, pipe.diffusion.alphas_cumprod)
        xs, sigma = 2 * x.double(), torch.full((3,), 0.8, dtype=F64)
        assert torch.equal(ClassifierFree(D, 1.0, null)(xs, sigma, y=y), D(xs, sigma, y=y))
        assert torch.equal(ClassifierFree(D, 0.0, null)(xs, sigma, y=y), D(xs, sigma, y=torch.full_like(y, null)))
    with pytest.raises(UsageError, match="label-dropout"):
        gaussdiff.load(dirs["plain"], device="cpu").sample(1, guidance=Guidance(cfg_scale=2.0), progress=False)


# ----------------------------------------------------------------------- temperature
def test_temperature_noise_scales_the_added_noise(dirs):
    """Temperature mode noise (ADM section I): a DDPM step's sample − mean is τ times the τ = 1
    one (same draw), and so is DDIM's noise at η > 0; for σ-space samplers it is S_noise = τ;
    samplers that add no noise refuse it."""
    diffusion = make_diffusion("linear", T, "eps", "fixed_small", respacing="10")
    F, x, t, kw, tau = toy_model(), x_at(6), torch.full((3,), 6), {"y": Y}, 0.7
    mean = diffusion.p_mean_variance(F, x, t, model_kwargs=kw)["mean"]
    one = diffusion.p_sample(F, x, t, model_kwargs=kw, generator=gens())["sample"]
    cold = diffusion.p_sample(F, x, t, model_kwargs=kw, generator=gens(), noise_scale=tau)["sample"]
    torch.testing.assert_close(cold - mean, tau * (one - mean), rtol=1e-9, atol=1e-13)
    step = partial(diffusion.ddim_sample, F, x, t, model_kwargs=kw, eta=0.6)
    det = step(generator=gens(), noise_scale=0.0)["sample"]
    torch.testing.assert_close(step(generator=gens(), noise_scale=tau)["sample"] - det,
                               tau * (step(generator=gens())["sample"] - det), rtol=1e-9, atol=1e-13)
    pipe = gaussdiff.load(dirs["cond"], device="cpu")
    kw = dict(num=2, steps=3, seed=1, progress=False)
    a, _ = pipe.sample(sampler="euler_ancestral", guidance=Guidance(temperature=tau), **kw)
    np.testing.assert_array_equal(a, pipe.sample(sampler="euler_ancestral", snoise=tau, **kw)[0])
    pipe.sample(sampler="ddim", eta=0.5, guidance=Guidance(temperature=tau), **kw)
    for sampler in ("ddim", "dpmpp_2m", "heun"):
        with pytest.raises(UsageError, match="temperature"):
            pipe.sample(sampler=sampler, guidance=Guidance(temperature=tau), **kw)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_temperature_eps_divides_eps(mean_type):
    """Temperature mode eps: whatever the network predicts (ε, x0 or v; out' = A·x_t + (out −
    A·x_t)/τ), the ε it implies becomes ε/τ; for a denoiser, (x − D̂)/σ = (x − D)/(σ·τ)."""
    diffusion = make_diffusion("linear", T, mean_type, "fixed_small")
    F, x, t, tau = toy_model(), x_at(7), torch.tensor([3, 30, 59]), 0.8
    wrapped = EpsTemperature(F, tau, eps_offset(diffusion.alphas_cumprod, mean_type))

    def eps_of(model):
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs={"y": Y})
        return diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    torch.testing.assert_close(eps_of(wrapped), eps_of(F) / tau, rtol=1e-9, atol=1e-12)
    D, sigma = DiscreteDenoiser(F, diffusion.alphas_cumprod, mean_type), torch.tensor([0.3, 2.0, 9.0], dtype=F64)
    xs, s = 3 * x, sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close((xs - EpsTemperature(D, tau)(xs, sigma, y=Y)) / s,
                               (xs - D(xs, sigma, y=Y)) / (s * tau), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------- training
def _labelled_npz(path, n=48, size=8, classes=NUM_CLASSES, seed=0):
    """Images whose pixels all equal 40 + 80·label (so a batch's labels can be read back)."""
    labels = np.random.default_rng(seed).integers(0, classes, n)
    images = np.broadcast_to((40 + 80 * labels)[:, None, None, None], (n, size, size, 1)).astype(np.uint8)
    np.savez(path, images.copy(), labels)
    return str(path)


TINY = dict(model_channels=32, channel_mult="1", num_res_blocks=1, attention_resolutions="0",
            diffusion_steps=100, batch_size=16, sample_every=0, log_every=1, ema="0.9")


def test_label_dropout_trains_a_null_label(tmp_path):
    """--label-dropout P: the label embedding gets a row for the null label num_classes (config
    model.null_class), and each label of a batch is the data's, or with probability P the null
    label. Without --class-cond it is an error."""
    data = _labelled_npz(tmp_path / "d.npz")
    opts = dict(DEFAULTS, data=data, class_cond=True, label_dropout=0.3, steps=1, **TINY)
    trainer = Trainer(opts, str(tmp_path / "run"), device="cpu", progress=False)
    assert trainer.model.label_emb.num_embeddings == NUM_CLASSES + 1
    assert trainer.config["model"]["null_class"] is True
    dropped = kept = 0
    for _ in range(40):
        x, kw = trainer.next_batch()
        truth = ((x[:, 0, 0, 0] + 1) * 127.5 - 40).round().long() // 80
        null = kw["y"] == NUM_CLASSES
        assert torch.equal(kw["y"][~null], truth[~null])
        dropped, kept = dropped + int(null.sum()), kept + int((~null).sum())
    assert 0.22 < dropped / (dropped + kept) < 0.38
    with pytest.raises(UsageError, match="class-cond"):
        Trainer(dict(opts, class_cond=False), str(tmp_path / "bad"), device="cpu", progress=False)


def test_classifier_objective_is_cross_entropy_on_noised_images():
    """The classifier's loss is the cross-entropy of classifier(q_sample(x_0, t, noise), t) and
    its accuracy (argmax == y), per sample."""
    diffusion = make_diffusion("linear", T)
    x0, t, noise = x_at(8), torch.tensor([0, 20, 59]), x_at(9)
    seen = {}

    def model(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.stack([x_t.mean((1, 2, 3)), -x_t.mean((1, 2, 3)), torch.zeros(3, dtype=F64)], 1)
    objective = ClassifierObjective(diffusion, make_schedule_sampler("uniform", T), {})
    per_sample, out = objective.losses(model, x0, Draw(t, noise, torch.ones(3)), {"y": Y})
    assert torch.equal(per_sample, out["loss"])   # uniform t: importance weights 1
    assert torch.equal(seen["x_t"], diffusion.q_sample(x0, t, noise)) and torch.equal(seen["t"], t)
    logits = model(seen["x_t"], t).float()
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(logits, Y, reduction="none"))
    assert out["acc"].tolist() == (logits.argmax(1) == Y).float().tolist()


CLS_TINY = dict(TINY, channel_mult="1", attention_resolutions="8", num_head_channels=32, ema="0.9,0.99")


def test_classifier_training_logs_accuracy_by_noise_range(tmp_path):
    """train-classifier's log.jsonl has loss and accuracy overall and by quarter of the process:
    acc_q<q> is the mean accuracy of the step's rows with t in [qT/4, (q+1)T/4), recomputed here
    from the objective's own outputs. The directory loads as a classifier, not as a model."""
    data, out = _labelled_npz(tmp_path / "d.npz"), str(tmp_path / "cls")
    trainer = ClassifierTrainer(dict(data=data, steps=3, save_every=3, **CLS_TINY), out,
                                device="cpu", progress=False)
    records, losses = [], trainer.objective.losses

    def spy(net, x0, draw, kwargs):
        per_sample, result = losses(net, x0, draw, kwargs)
        records.append((draw.levels.clone(), result))
        return per_sample, result
    trainer.objective.losses = spy
    trainer.run()
    log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and len(records) == 3
    for rec, (t, result) in zip(log, records):
        assert rec["acc"] == pytest.approx(float(result["acc"].mean()))
        assert rec["loss"] == pytest.approx(float(result["loss"].detach().mean()))
        for q in range(4):
            sel = (t * 4 // 100) == q
            if sel.any():
                assert rec[f"acc_q{q}"] == pytest.approx(float(result["acc"][sel].mean()))
                assert 0 <= rec[f"acc_q{q}"] <= 1
            else:
                assert f"acc_q{q}" not in rec
    assert json.load(open(f"{out}/config.json"))["kind"] == "classifier"
    cls = load_classifier(out, device="cpu")
    assert cls.num_classes == NUM_CLASSES
    with pytest.raises(UsageError, match="classifier"):
        gaussdiff.load(out, device="cpu")


def test_train_classifier_resume_is_bit_exact(tmp_path):
    """4 classifier steps in one go, or 2 and then --resume to 4 in a new trainer, write
    byte-identical weights, EMA and optimizer/RNG state (timesteps, noise, data order)."""
    data = _labelled_npz(tmp_path / "d.npz")
    opts = dict(data=data, save_every=2, flip=True, **CLS_TINY)
    ClassifierTrainer(dict(opts, steps=4), str(tmp_path / "full"), device="cpu", progress=False).run()
    ClassifierTrainer(dict(opts, steps=2), str(tmp_path / "split"), device="cpu", progress=False).run()
    ClassifierTrainer(dict(opts, steps=4), str(tmp_path / "split"), resume=True, device="cpu",
                      progress=False).run()
    for name in ("model.safetensors", "ema_0.9.safetensors", "ema_0.99.safetensors", "state.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name


# ----------------------------------------------------------------------- the encoder
def test_attention_pool_matches_guided_diffusion():
    """AttentionPool2d is guided-diffusion's: the mean token prepended, the positional embedding
    added, QKVAttention in the "new" order (q, k, v thirds, each split into heads, q and k
    scaled by ch^(-1/4)), c_proj, token 0; the encoder's parameter names are guided-diffusion's."""
    torch.manual_seed(0)
    pool = AttentionPool2d(4, 16, 2, 5)
    x = torch.randn(3, 16, 4, 4)
    h = x.reshape(3, 16, -1)
    h = torch.cat([h.mean(-1, keepdim=True), h], -1) + pool.positional_embedding[None]
    qkv = pool.qkv_proj(h)
    bs, width, length = qkv.shape
    ch, heads = width // (3 * 2), 2
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(bs * heads, ch, length),
                          (k * scale).reshape(bs * heads, ch, length)).softmax(-1)
    a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * heads, ch, length)).reshape(bs, -1, length)
    torch.testing.assert_close(pool(x), pool.c_proj(a)[:, :, 0], rtol=1e-5, atol=1e-6)
    enc = EncoderUNetModel(EncoderConfig(image_size=8, in_channels=1, model_channels=16, out_channels=3,
                                         channel_mult=(1, 2), attention_resolutions=(4,),
                                         num_head_channels=8, norm_groups=8, resblock_updown=True))
    names = dict((k, tuple(v.shape)) for k, v in enc.state_dict().items())
    assert names["out.2.positional_embedding"] == (32, 4 * 4 + 1)
    assert names["out.2.qkv_proj.weight"] == (96, 32, 1) and names["out.2.c_proj.weight"] == (3, 32, 1)
    assert "input_blocks.2.0.in_layers.2.weight" in names and "middle_block.1.qkv.weight" in names
    assert enc(torch.randn(2, 1, 8, 8), torch.tensor([0, 99])).shape == (2, 3)


# ----------------------------------------------------------------------- CLI
def test_cli_train_classifier_and_guided_sampling(dirs, tmp_path, capsys):
    """train-classifier makes a classifier directory; sample takes --classifier,
    --classifier-scale, --classifier-grad-at, --cfg-scale, --cfg-interval, --temperature and
    --temperature-mode; misuse is a one-line error with exit status 2."""
    data, cls, out = _labelled_npz(tmp_path / "d.npz"), str(tmp_path / "cls"), str(tmp_path / "s.npz")
    assert cli_main(["train-classifier", "--data", data, "--out", cls, "--steps", "2",
                     "--batch-size", "8", "--model-channels", "32", "--channel-mult", "1",
                     "--attention-resolutions", "8", "--num-head-channels", "32",
                     "--diffusion-steps", "100", "--log-every", "1", "--device", "cpu",
                     "--ema-warmup", "true", "--keep", "1", "--no-progress"]) == 0
    assert "acc_q0" in open(f"{cls}/log.jsonl").read()
    training = json.load(open(f"{cls}/config.json"))["training"]
    assert training["ema_warmup"] is True and training["keep"] == 1   # train's options, shared
    # export copies the classifier's config and its EMA weights into a bundled directory
    assert cli_main(["export", cls, str(tmp_path / "cls-ema"), "--ema", "0.999"]) == 0
    from gaussdiff.training.classifier import load_classifier
    a, b = load_classifier(cls, device="cpu", ema="0.999"), load_classifier(str(tmp_path / "cls-ema"), device="cpu")
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    base = ["sample", dirs["cond"], "--num", "2", "--steps", "3", "--out", out, "--device", "cpu",
            "--no-progress"]
    assert cli_main(base + ["--sampler", "ddpm", "--classifier", cls, "--classifier-scale", "2",
                            "--classifier-grad-at", "mean", "--cfg-scale", "2",
                            "--cfg-interval", "0.5,50", "--temperature", "0.9"]) == 0
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    assert cli_main(base + ["--sampler", "heun", "--classifier", cls, "--temperature", "0.9",
                            "--temperature-mode", "eps", "--label", "1"]) == 0
    assert np.load(out)["arr_1"].tolist() == [1, 1]
    capsys.readouterr()
    for bad, word in ((["--classifier-scale", "2"], "--classifier"),
                      (["--sampler", "ddim", "--temperature", "0.5"], "temperature"),
                      (["--cfg-interval", "1,2"], "--cfg-scale"),
                      (["--classifier", dirs["cond"]], "classifier")):
        assert cli_main(base + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    assert cli_main(["sample", dirs["plain"], "--cfg-scale", "2", "--out", out, "--device", "cpu"]) == 2
    assert "label-dropout" in capsys.readouterr().err


def test_noisy_classifier_log_prob_and_sigma_form_from_first_principles(dirs):
    """The real noisy-classifier path, checked against its definition, not its own output:
    log_prob is the log-softmax of the encoder's logits at the label (so Σ_y exp = 1 and it is
    ≤ 0); sigma_log_prob at a discrete level σ_t is log_prob of x_t = x/sqrt(1 + σ_t²) = the
    VP-scaled input at that very t; and classifier guidance with it raises log p(y | x_t)."""
    import torch.nn.functional as Fn
    cls = load_classifier(dirs["cls"], device="cpu")
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    logits = cls.model(x_t, t)
    for y in range(NUM_CLASSES):
        labels = torch.full((4,), y)
        torch.testing.assert_close(cls.log_prob(x_t, t, labels), Fn.log_softmax(logits, -1)[:, y])
    total = sum(cls.log_prob(x_t, t, torch.full((4,), y)).exp() for y in range(NUM_CLASSES))
    torch.testing.assert_close(total, torch.ones(4))
    sigma = torch.from_numpy(np.sqrt(1 / cls.alphas_cumprod - 1))[t]
    x = x_t * (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()        # x = x_t / sqrt(ᾱ_t)
    torch.testing.assert_close(cls.sigma_log_prob(x.double(), sigma, Y.repeat(2)[:4]).double(),
                               cls.log_prob(x_t, t, Y.repeat(2)[:4]).double(), rtol=1e-5, atol=1e-5)
    # one small guided step raises the label's log-probability (the sign of the guidance)
    D = lambda x, s, y=None: torch.zeros_like(x)   # noqa: E731
    guided = ClassifierGuidedDenoiser(D, cls.sigma_log_prob, 0.5)
    s = torch.full((4,), 2.0, dtype=F64)
    x = x.double()
    labels = Y.repeat(2)[:4]
    step = guided(x, s, y=labels)   # = s·σ²·∇ log p, the move of D
    before = cls.sigma_log_prob(x, s, labels)
    after = cls.sigma_log_prob(x + step, s, labels)
    assert (after >= before - 1e-6).all() and float((after - before).sum()) > 1e-4


# ----------------------------------------------------------------------- the wrappers, exactly
E = torch.randn((NUM_CLASSES + 1,) + SHAPE[1:], generator=torch.Generator().manual_seed(8), dtype=F64)
NULL = NUM_CLASSES


def cond_net(x, s, y=None, low_res=None, gain=1.0, table=None, shift=None):
    """An analytic conditional network (or denoiser) with label embedding E (row NULL: no label;
    label weights [B, K + 1] embed as y @ E) that uses every kind of extra argument: a per-row
    tensor low_res [B, ...], a number gain, a table [5] (not per row) and a 0-dim tensor shift."""
    emb = torch.einsum("bk,kchw->bchw", y.to(F64), E) if y.is_floating_point() else E[y]
    out = gain * torch.tanh(0.6 * x) + emb.to(x.dtype) * (1 + 0.1 * s.to(x.dtype).reshape(-1, 1, 1, 1))
    if low_res is not None:
        out = out + 0.3 * low_res
    if table is not None:
        out = out + table.sum()
    if shift is not None:
        out = out - shift
    return out


class QuadraticClassifier:
    """An analytic noisy classifier, log p(y | x_t) = −|x_t − G_y|²/2 + const, so that
    ∇_{x_t} = G_y − x_t depends on where it is taken; in σ-space it sees x_t = x/sqrt(1 + σ²)."""

    def __init__(self, num_classes=NUM_CLASSES):
        self.num_classes = num_classes

    def discrete_log_prob(self, alphas_cumprod):
        return lambda x_t, t, y: -0.5 * ((x_t - G[y]) ** 2).flatten(1).sum(1)

    def sigma_log_prob(self, x, sigma, y):
        return self.discrete_log_prob(None)(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), None, y)


def _pipe(mean_type="eps", null_class=True, path=""):
    """A Pipeline of a 3-class model on the linear T = 60 diffusion (the network is not used)."""
    return Pipeline(model=None, diffusion=make_diffusion("linear", T, mean_type, "fixed_small"),
                    config={"model": {"num_classes": NUM_CLASSES, "null_class": null_class}}, path=path)


def _raises(message, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises a UsageError whose text is exactly `message`."""
    with pytest.raises(UsageError) as e:
        fn(*args, **kwargs)
    assert str(e.value) == message


NOT_STOCHASTIC = ("temperature mode noise scales the noise a sampler adds; {} adds none here: use "
                  "--temperature-mode eps, or a stochastic sampler (ddpm, --eta > 0, --churn > 0, "
                  "euler_ancestral)")
MEAN_ONLY_DDPM = ("the gradient at the predicted mean applies to classifier guidance with the ddpm "
                  "sampler (others take the score at x_t)")


def test_cfg_mixes_each_row_with_its_own_conditioning():
    """Ho & Salimans eq. 6 row by row, D_w = D_u + w·(D_c − D_u), D_c and D_u the network on the B
    rows alone: per-row tensors (low_res [B, ...]) go with their rows into the batch of 2B, other
    arguments (a number, a table [5], a 0-dim tensor) pass unchanged; w = 1 and w = 0 are D_c
    and D_u bit for bit with the same arguments; w = 2.1 is mixed in float64, not its float32
    rounding; B = 3 rows of C = 2 channels."""
    x, s = x_at(10), torch.tensor([0.3, 1.0, 4.0], dtype=F64)
    cond = dict(low_res=x_at(11), gain=1.5, table=torch.arange(5.0, dtype=F64),
                shift=torch.tensor(0.25, dtype=F64))
    c, u = cond_net(x, s, y=Y, **cond), cond_net(x, s, y=torch.full_like(Y, NULL), **cond)
    assert torch.equal(ClassifierFree(cond_net, 1.0, NULL)(x, s, y=Y, **cond), c)
    assert torch.equal(ClassifierFree(cond_net, 0.0, NULL)(x, s, y=Y, **cond), u)
    torch.testing.assert_close(ClassifierFree(cond_net, 2.1, NULL)(x, s, y=Y, **cond), u + 2.1 * (c - u),
                               rtol=1e-13, atol=1e-13)


def test_cfg_with_label_weights_takes_the_one_hot_null_label():
    """Label weights y [B, K + 1] (interpolated labels): the unconditional half is the null label's
    embedding E[null], so D_w = D(null) + w·(D(y) − D(null)); null_like gives the one-hot of the
    null index in y's width and dtype (also for a null label that is not the last column) and
    integer labels the null index itself."""
    x, s = x_at(12), torch.tensor([0.3, 1.0, 4.0], dtype=F64)
    weights = torch.tensor([[0.5, 0.5, 0, 0], [0, 0.2, 0.8, 0], [1, 0, 0, 0]], dtype=F64)
    c, u = cond_net(x, s, y=weights), cond_net(x, s, y=torch.full_like(Y, NULL))
    torch.testing.assert_close(ClassifierFree(cond_net, 0.0, NULL)(x, s, y=weights), u, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ClassifierFree(cond_net, 2.5, NULL)(x, s, y=weights), u + 2.5 * (c - u),
                               rtol=1e-13, atol=1e-13)
    null = ClassifierFree(cond_net, 2.5, 1).null_like(torch.zeros(2, 4, dtype=torch.float32))
    assert null.dtype == torch.float32 and null.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert ClassifierFree(cond_net, 2.5, NULL).null_like(Y).tolist() == [NULL] * 3


def test_cfg_interval_is_closed_and_compares_the_exact_sigma():
    """Guidance applies for σ ∈ [lo, hi] with both ends included (σ = lo and σ = hi mix, σ > hi is
    the conditional output), and σ is compared at its exact value: a float32 σ = fl32(0.1) =
    0.10000000149 lies above hi = 0.1, so that row is conditional."""
    x, s = x_at(13), torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    c, u = cond_net(x, s, y=Y), cond_net(x, s, y=torch.full_like(Y, NULL))
    expected = torch.cat([u[:2] + 3 * (c[:2] - u[:2]), c[2:]])
    torch.testing.assert_close(ClassifierFree(cond_net, 3.0, NULL, (0.5, 1.0))(x, s, y=Y), expected,
                               rtol=1e-13, atol=1e-13)
    x32, s32 = x.float(), torch.tensor([0.1, 0.05, 0.2], dtype=torch.float32)
    inside = [0.05 <= float(v) <= 0.1 for v in s32]
    assert inside == [False, True, False]
    c, u = cond_net(x32, s32, y=Y), cond_net(x32, s32, y=torch.full_like(Y, NULL))
    expected = torch.stack([u[i] + 3 * (c[i] - u[i]) if inside[i] else c[i] for i in range(3)])
    torch.testing.assert_close(ClassifierFree(cond_net, 3.0, NULL, (0.05, 0.1))(x32, s32, y=Y), expected)


def test_eps_temperature_keeps_the_variance_channels():
    """With a learned variance the network has 2C outputs: ε/τ changes the first C (= 2) channels
    only; the variance channels pass unchanged."""
    diffusion = make_diffusion("linear", T, "eps", "learned_range")
    F, x, t, tau = toy_model(True), x_at(14), torch.tensor([3, 30, 59]), 0.8
    out, ref = EpsTemperature(F, tau, eps_offset(diffusion.alphas_cumprod, "eps"))(x, t, y=Y), F(x, t, y=Y)
    torch.testing.assert_close(out[:, :2], ref[:, :2] / tau, rtol=1e-14, atol=0)
    assert torch.equal(out[:, 2:], ref[:, 2:])


def test_wrappers_pass_the_other_conditioning_through():
    """WithoutLabels drops y only; ClassifierGuidedDenoiser gives D its other arguments too
    (D̂ − D(x, σ, y, low_res) = s·σ²·G_y/sqrt(1 + σ²)); classifier_grad passes keyword arguments
    to log_prob (∇_x Σ c·x² = 2c·x). Without labels the guidance wrappers refuse to run."""
    x, low_res, sigma = x_at(15), x_at(16), torch.tensor([0.5, 1.7, 3.0], dtype=F64)

    def uncond(x, s, low_res=None):
        return 0.5 * x + low_res
    assert torch.equal(WithoutLabels(uncond)(x, sigma, y=Y, low_res=low_res), 0.5 * x + low_res)
    guided = ClassifierGuidedDenoiser(cond_net, sigma_log_prob, 2.0)
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(guided(x, sigma, y=Y, low_res=low_res) - cond_net(x, sigma, y=Y, low_res=low_res),
                               2.0 * s2 * G[Y] / (1 + s2).sqrt(), rtol=1e-12, atol=1e-12)
    grad = classifier_grad(lambda x, c: c * (x ** 2).flatten(1).sum(1), x, c=1.5)
    torch.testing.assert_close(grad, 3.0 * x, rtol=1e-15, atol=0)
    for wrapper in (ClassifierCondFn(log_prob, 1.0), guided):
        _raises("classifier guidance needs class labels y", wrapper, x, sigma)
    _raises("classifier-free guidance needs class labels y", ClassifierFree(cond_net, 2.0, NULL), x, sigma)


def test_table_sigma_and_eps_offset_closed_forms():
    """table_sigma: σ(t) = sqrt(1/ᾱ_t − 1) at integer t, linear between neighbours at fractional t
    (t of any dtype, bfloat16 too), in float64 even for a float32 ᾱ table (1/ᾱ − 1 from its exact
    values, not in float32); eps_offset: A(t) = 0, 1/sqrt(ᾱ_t) and −sqrt(1/ᾱ_t − 1) for eps, x0
    and v, in float64 likewise."""
    a32 = make_diffusion("linear", T).alphas_cumprod.astype(np.float32)
    a = [float(v) for v in a32]
    sig = [math.sqrt(1 / v - 1) for v in a]
    sigma_of, t = table_sigma(a32), [0, 1, 30, 59]
    np.testing.assert_allclose(sigma_of(torch.tensor(t)).numpy(), [sig[i] for i in t], rtol=1e-13, atol=0)
    frac = torch.tensor([0.5, 10.25, 58.75], dtype=torch.bfloat16)
    np.testing.assert_allclose(sigma_of(frac).numpy(), [(sig[0] + sig[1]) / 2, 0.75 * sig[10] + 0.25 * sig[11],
                                                        0.25 * sig[58] + 0.75 * sig[59]], rtol=1e-13, atol=0)
    for mean_type, ref in (("eps", [0.0] * T), ("x0", [1 / math.sqrt(v) for v in a]), ("v", [-v for v in sig])):
        A = eps_offset(a32, mean_type)(torch.tensor(t))
        assert A.dtype == F64
        np.testing.assert_allclose(A.numpy(), [ref[i] for i in t], rtol=1e-14, atol=0)


# ----------------------------------------------------------------------- Guidance
def test_guidance_checks_its_settings():
    """Guidance(...) refuses bad settings with one line naming the choices or the range; the cfg
    interval's closed ends (lo = 0, lo = hi) are accepted."""
    for kwargs, message in (
            (dict(grad_at="mu"), "unknown gradient point 'mu': choose one of x_t, mean"),
            (dict(temperature_mode="cold"), "unknown temperature mode 'cold': choose one of noise, eps"),
            (dict(temperature=0.0), "--temperature 0.0: must be positive (1: off)"),
            (dict(cfg_scale=2.0, cfg_interval=(2.0, 1.0)), "--cfg-interval LO,HI needs 0 <= LO <= HI, got 2.0,1.0"),
            (dict(cfg_scale=2.0, cfg_interval=(-1, 1)), "--cfg-interval LO,HI needs 0 <= LO <= HI, got -1,1"),
            (dict(cfg_interval=(0.5, 1.0)), "--cfg-interval applies with --cfg-scale")):
        _raises(message, Guidance, **kwargs)
    Guidance(cfg_scale=2.0, cfg_interval=(0.0, 1.0))
    Guidance(cfg_scale=2.0, cfg_interval=(0.5, 0.5))


def test_guidance_refuses_what_the_model_or_sampler_cannot_do():
    """One line naming the model directory ("this model" for a pipeline without one): classifier-
    free guidance without a null label, a classifier with another number of classes, the gradient
    at the mean other than with a classifier and ddpm; a noise temperature for a sampler that adds
    no noise, or together with --snoise."""
    no_null = ("{}: classifier-free guidance needs a model trained with --label-dropout (it has no "
               "null label)")
    cls = QuadraticClassifier()
    for guidance, pipe, sampler, message in (
            (Guidance(cfg_scale=2.0), _pipe(null_class=False), "ddpm", no_null.format("this model")),
            (Guidance(cfg_scale=2.0), _pipe(null_class=False, path="runs/m"), "heun", no_null.format("runs/m")),
            (Guidance(QuadraticClassifier(5)), _pipe(), "ddim", "this model has 3 classes, the classifier 5"),
            (Guidance(cls, grad_at="mean"), _pipe(), "ddim", MEAN_ONLY_DDPM),
            (Guidance(cls, grad_at="mean"), _pipe(), "heun", MEAN_ONLY_DDPM),
            (Guidance(grad_at="mean"), _pipe(), "ddpm", MEAN_ONLY_DDPM),
            (Guidance(temperature=0.5), _pipe(), "ddim", NOT_STOCHASTIC.format("ddim")),
            (Guidance(temperature=0.5), _pipe(), "heun", NOT_STOCHASTIC.format("heun")),
            (Guidance(temperature=0.5), _pipe(), "dpmpp_2m", NOT_STOCHASTIC.format("dpmpp_2m"))):
        if sampler in ("ddpm", "ddim"):
            _raises(message, guidance.for_discrete, pipe, sampler, {})
        else:
            _raises(message, guidance.for_sigma_space, pipe, cond_net, sampler, {}, False)
    for sampler, options in (("euler_ancestral", {"eta": 0.0}), ("ddim_sigma", {"eta": 0.0})):
        _raises(NOT_STOCHASTIC.format(sampler), Guidance(temperature=0.5).for_sigma_space, _pipe(), cond_net,
                sampler, options, False)
    _raises("--snoise and --temperature-mode noise both set the noise scale: give one",
            Guidance(temperature=0.5).for_sigma_space, _pipe(), cond_net, "heun",
            {"churn": 1.0, "noise_scale": 0.9}, False)


def test_for_discrete_wraps_cfg_on_the_sigma_interval_then_eps_temperature():
    """Guidance.for_discrete on a v-prediction model: wrap(F) mixes w only where σ(t) = sqrt(1/ᾱ_t
    − 1) of the model's table is in the interval (σ, not t), then divides ε by τ = 2: out' =
    A·x_t + (out_w − A·x_t)/τ with A = −sqrt(1/ᾱ_t − 1); the loop gets no noise scale. In noise
    mode the network is untouched and ddpm (and ddim with η > 0) get noise_scale = τ."""
    pipe = _pipe("v")
    a = pipe.diffusion.alphas_cumprod
    x, t = x_at(17), torch.tensor([5, 30, 55])
    sig = np.sqrt(1 / a - 1)
    lo, hi = 0.9 * sig[30], 1.1 * sig[30]
    assert [bool(lo <= sig[i] <= hi) for i in t] == [False, True, False] and not any(lo <= i <= hi for i in t)
    wrap, loop = Guidance(cfg_scale=2.5, cfg_interval=(lo, hi), temperature=2.0,
                          temperature_mode="eps").for_discrete(pipe, "ddim", {})
    assert loop == {}
    c, u = cond_net(x, t, y=Y), cond_net(x, t, y=torch.full_like(Y, NULL))
    out_w = torch.stack([c[0], u[1] + 2.5 * (c[1] - u[1]), c[2]])
    A = torch.tensor([-math.sqrt(1 / a[i] - 1) for i in t], dtype=F64).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(wrap(cond_net)(x, t, y=Y), A * x + (out_w - A * x) / 2, rtol=1e-12, atol=1e-12)
    for sampler, options in (("ddpm", {}), ("ddim", {"eta": 0.5})):
        wrap, loop = Guidance(temperature=0.5).for_discrete(pipe, sampler, options)
        assert loop == {"noise_scale": 0.5}
        assert torch.equal(wrap(cond_net)(x, t, y=Y), cond_net(x, t, y=Y))


def test_for_discrete_classifier_guidance_takes_the_gradient_where_asked():
    """Classifier guidance in the discrete loops: ddpm's cond_fn is s·∇ log p_φ, taken at x_t, or
    at the unguided mean μ with grad_at="mean": the step's mean moves by s·Σ·(G_y − x_t), or
    s·Σ·(G_y − μ) (the classifier's gradient is G_y − x there); ddim gets clip_guided as set."""
    pipe = _pipe()
    diffusion, F, x, t, kw, s = pipe.diffusion, toy_model(), x_at(18), torch.full((3,), 20), {"y": Y}, 1.5
    out = diffusion.p_mean_variance(F, x, t, model_kwargs=kw)
    plain = diffusion.p_sample(F, x, t, model_kwargs=kw, generator=gens())["sample"]
    for grad_at, at in (("mean", out["mean"]), ("x_t", x)):
        _, loop = Guidance(QuadraticClassifier(), s, grad_at=grad_at).for_discrete(pipe, "ddpm", {})
        guided = diffusion.p_sample(F, x, t, model_kwargs=kw, generator=gens(), **loop)["sample"]
        torch.testing.assert_close(guided - plain, s * out["variance"] * (G[Y] - at), rtol=1e-9, atol=1e-13)
    for clip in (True, False):
        _, loop = Guidance(QuadraticClassifier(), s, clip_guided=clip).for_discrete(pipe, "ddim", {})
        assert set(loop) == {"cond_fn", "clip_guided"} and loop["clip_guided"] is clip


def test_for_sigma_space_order_of_wrappers_and_noise_options():
    """Guidance.for_sigma_space: CFG (w on σ ∈ [lo, hi] only) and ε/τ on the raw D, D' = x +
    (D_w − x)/τ; with a classifier D̂ = D + s·σ²·(G_y − x_t)/sqrt(1 + σ²), x_t = x/sqrt(1 + σ²),
    clamped to [-1, 1] only with clip_denoised (before the shift) and clip_guided (after it);
    a noise temperature becomes noise_scale = τ for the samplers that add noise (churn > 0,
    η > 0, euler_ancestral at its default η = 1)."""
    pipe, x, sigma = _pipe(), 3 * x_at(19), torch.tensor([0.7, 1.5, 3.0], dtype=F64)
    den, opts = Guidance(cfg_scale=2.5, cfg_interval=(0.5, 2.0), temperature=2.0,
                         temperature_mode="eps").for_sigma_space(pipe, cond_net, "heun", {}, False)
    c, u = cond_net(x, sigma, y=Y), cond_net(x, sigma, y=torch.full_like(Y, NULL))
    D_w = torch.cat([u[:2] + 2.5 * (c[:2] - u[:2]), c[2:]])
    assert opts == {}
    torch.testing.assert_close(den(x, sigma, y=Y), x + (D_w - x) / 2, rtol=1e-12, atol=1e-12)
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    shift = 3.0 * s2 * (G[Y] - x / (1 + s2).sqrt()) / (1 + s2).sqrt()
    assert (c + shift).abs().max() > 2
    for clip_denoised, clip_guided, expected in ((False, True, c + shift), (True, False, c.clamp(-1, 1) + shift),
                                                 (True, True, (c.clamp(-1, 1) + shift).clamp(-1, 1))):
        den, _ = Guidance(QuadraticClassifier(), 3.0, clip_guided=clip_guided).for_sigma_space(
            pipe, cond_net, "euler", {}, clip_denoised)
        torch.testing.assert_close(den(x, sigma, y=Y), expected, rtol=1e-12, atol=1e-12)
    for sampler, options in (("heun", {"churn": 0.5}), ("euler", {"churn": 2.0}), ("ddim_sigma", {"eta": 0.5}),
                             ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.3})):
        _, opts = Guidance(temperature=0.5).for_sigma_space(pipe, cond_net, sampler, options, False)
        assert opts == {**options, "noise_scale": 0.5}

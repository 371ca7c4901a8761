"""Parity with the original code: openai/guided-diffusion as packaged on PyPI
(`guided-diffusion-sdk`, installed by the Makefile with --no-deps; a test extra, never on the
runtime path). The same betas, model and noise go into both engines; outputs must agree to
float64 round-off. This is an independent reference, unlike tests/openai_reference.py.

Covers: respacing (lists as section counts), q_sample, the posterior, p_mean_variance with
learned-range variances, L_hybrid (improved-diffusion's rescaled MSE + VB), DDIM at every η,
and classifier guidance in both of ADM's forms (DDPM mean shift, DDIM score)."""
import math

import numpy as np
import pytest
import torch

from gaussdiff.diffusion import GaussianDiffusion
from gaussdiff.sampling.guidance import ClassifierCondFn
from gaussdiff.diffusion.schedules import beta_schedule, space_timesteps

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")   # conftest fails instead in CI
respace = pytest.importorskip("guided_diffusion.respace")

F64 = torch.float64
T = 200


@pytest.fixture(autouse=True)
def float64_coefficients(monkeypatch):
    """guided-diffusion casts its schedule coefficients to float32 when it gathers them
    (`_extract_into_tensor`); gather them in float64 instead, so that both engines compute in
    float64 and agree to round-off (1e-10), not to float32's 1e-7. Nothing else is changed."""
    def extract(arr, timesteps, broadcast_shape):
        res = torch.from_numpy(arr).to(timesteps.device)[timesteps].double()
        while len(res.shape) < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)
    monkeypatch.setattr(gd, "_extract_into_tensor", extract)
SHAPE = (3, 2, 4, 4)


def theirs(schedule, use_timesteps, learned=True, fixed_large=False):
    betas = gd.get_named_beta_schedule(schedule, T)
    var = (gd.ModelVarType.LEARNED_RANGE if learned else
           gd.ModelVarType.FIXED_LARGE if fixed_large else gd.ModelVarType.FIXED_SMALL)
    return respace.SpacedDiffusion(use_timesteps=use_timesteps, betas=betas,
                                   model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=var,
                                   loss_type=gd.LossType.RESCALED_MSE if learned else gd.LossType.MSE,
                                   rescale_timesteps=False)


def ours(schedule, use_timesteps, learned=True, fixed_large=False):
    var = "learned_range" if learned else "fixed_large" if fixed_large else "fixed_small"
    return GaussianDiffusion(beta_schedule(schedule, T), mean_type="eps", var_type=var,
                             loss_type="hybrid" if learned else "mse", timesteps=use_timesteps)


def model(learned=True):
    """A smooth network of (x_t, original t): ε and the variance interpolation v."""
    def F(x, t, y=None):
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1)
        eps = 0.8 * torch.tanh(0.7 * x + 0.002 * tt)
        if y is not None:
            eps = eps + 0.05 * y.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(0.3 * x - 0.001 * tt)], 1) if learned else eps
    return F


G = torch.randn((3,) + SHAPE[1:], generator=torch.Generator().manual_seed(3), dtype=F64)
Y = torch.tensor([0, 2, 1])


def log_prob(x, t, y):
    """A classifier whose gradient depends on x and t: log p = <G_y, tanh(x)>·(1 + t/T)."""
    return (G[y] * torch.tanh(x)).flatten(1).sum(1) * (1 + t.to(x.dtype) / T)


def cond_fn_theirs(s):
    def fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            return torch.autograd.grad(log_prob(x_in, t, y).sum(), x_in)[0] * s
    return fn


def x_at(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("spec", [[20, 5, 30], [10], [7, 7], (3, 7, 1, 9), "20,5,30", "250",
                                  "ddim50", "ddim25", [1, 1, 1]])
def test_respacing_matches_guided_diffusion(spec):
    """A list is read as section counts, as improved-diffusion reads it."""
    assert space_timesteps(1000, spec) == sorted(respace.space_timesteps(1000, spec))


def test_respacing_random_specs_match():
    rng = np.random.default_rng(0)
    for _ in range(50):
        T_ = int(rng.integers(10, 400))
        n = int(rng.integers(1, 5))
        counts = [int(c) for c in rng.integers(1, T_ // n + 1, size=n)]
        assert space_timesteps(T_, counts) == sorted(respace.space_timesteps(T_, counts)), (T_, counts)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_and_p_mean_variance_match(schedule):
    use = space_timesteps(T, "17")
    a, b, F = ours(schedule, use), theirs(schedule, use), model()
    x0, x, noise = x_at(0).clamp(-1, 1), x_at(1), x_at(2)
    for k in (0, 5, 16):
        t = torch.full((3,), k)
        torch.testing.assert_close(a.q_sample(x0, t, noise), b.q_sample(x0, t, noise), rtol=1e-12, atol=1e-12)
        for u, v in zip(a.q_posterior_mean_variance(x0, x, t), b.q_posterior_mean_variance(x0, x, t)):
            torch.testing.assert_close(u.expand_as(v), v, rtol=1e-12, atol=1e-12)
        for clip in (True, False):
            pa = a.p_mean_variance(F, x, t, clip_denoised=clip)
            pb = b.p_mean_variance(F, x, t, clip_denoised=clip)
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                torch.testing.assert_close(pa[key].expand_as(pb[key]), pb[key], rtol=1e-10, atol=1e-12)


def test_hybrid_loss_matches_rescaled_mse_plus_vb():
    """L_hybrid: improved-diffusion's RESCALED_MSE with learned-range variances (mse + vb·T/1000)."""
    use = list(range(T))
    a, b, F = ours("cosine", use), theirs("cosine", use), model()
    x0, noise, t = x_at(3).clamp(-1, 1), x_at(4), torch.tensor([0, 57, 199])
    la, lb = a.training_losses(F, x0, t, noise=noise), b.training_losses(F, x0, t, noise=noise)
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(la[key], lb[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
def test_ddim_loop_matches_at_every_eta(eta):
    """DDIM (Song et al. eq. 12) at 0 < η < 1 too: σ_t = η·sqrt((1−ᾱ')/(1−ᾱ))·sqrt(1−ᾱ/ᾱ').
    Both draw one randn_like per step from the global generator (theirs also at η = 0)."""
    use = space_timesteps(T, "12")
    a, b, F = ours("cosine", use, learned=False), theirs("cosine", use, learned=False), model(False)
    z = x_at(5)
    kw = dict(noise=z, clip_denoised=True, model_kwargs={})
    theirs_kw = dict(kw, device=torch.device("cpu"))
    torch.manual_seed(11)
    out_b = b.ddim_sample_loop(F, z.shape, eta=eta, **theirs_kw)
    torch.manual_seed(11)   # (at η = 0 theirs draws noise and multiplies it by σ = 0; ours draws none)
    out_a = a.ddim_sample_loop(F, z.shape, eta=eta, **kw)
    torch.testing.assert_close(out_a, out_b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_guided_steps_match_adm(sampler):
    """ADM Algorithm 1 (ddpm: μ + s·Σ·∇log p) and Algorithm 2 (ddim: ε − s·sqrt(1−ᾱ)·∇log p),
    our ADM form (clip_guided=False) against guided-diffusion's cond_fn hooks, on a respaced
    learned-variance diffusion, with a classifier that sees the original timestep."""
    use = space_timesteps(T, "15")
    a, b, F = ours("linear", use), theirs("linear", use), model()
    x, s, kw = x_at(6), 2.5, {"y": Y}
    ca, cb = ClassifierCondFn(log_prob, s), cond_fn_theirs(s)
    for k in (0, 7, 14):
        t = torch.full((3,), k)
        torch.manual_seed(3)
        if sampler == "ddpm":
            ra = a.p_sample(F, x, t, model_kwargs=kw, cond_fn=ca)
        else:
            ra = a.ddim_sample(F, x, t, model_kwargs=kw, cond_fn=ca, eta=0.5)
        torch.manual_seed(3)
        if sampler == "ddpm":
            rb = b.p_sample(F, x, t, model_kwargs=kw, cond_fn=cb)
        else:
            rb = b.ddim_sample(F, x, t, model_kwargs=kw, cond_fn=cb, eta=0.5)
        # their condition_mean computes μ + Σ·g in float32 (`.float()`): agreement to float32
        tol = dict(rtol=1e-6, atol=1e-6) if sampler == "ddpm" else dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ra["sample"], rb["sample"].to(F64), **tol)


def test_guided_ddim_on_cosine_adm_form_equals_theirs_and_clip_guided_differs():
    """On a cosine schedule the ADM form reproduces guided-diffusion's first step exactly,
    x̂_0 thrown far outside [-1, 1]; clip_guided keeps it in range (a deliberate difference,
    documented in GaussianDiffusion.condition_score)."""
    use = space_timesteps(T, "10")
    a, b, F = ours("cosine", use, learned=False), theirs("cosine", use, learned=False), model(False)
    x, s, kw = x_at(7), 1.0, {"y": Y}
    t = torch.full((3,), len(use) - 1)
    out = a.p_mean_variance(F, x, t, model_kwargs=kw)
    guided_a = a.condition_score(ClassifierCondFn(log_prob, s), out, x, t, kw)
    guided_b = b.condition_score(cond_fn_theirs(s), b.p_mean_variance(F, x, t, model_kwargs=kw), x, t, kw)
    torch.testing.assert_close(guided_a["pred_xstart"], guided_b["pred_xstart"], rtol=1e-9, atol=1e-9)
    assert guided_a["pred_xstart"].abs().max() > 10 * math.sqrt(1)   # far outside the data range
    clipped = a.ddim_sample(F, x, t, model_kwargs=kw, cond_fn=ClassifierCondFn(log_prob, s),
                            clip_guided=True)
    assert clipped["pred_xstart"].abs().max() <= 1


# ----------------------------------------------------------------------------- convert-openai
script_util = pytest.importorskip("guided_diffusion.script_util")

CONVERT_CASES = {
    # ADM-style: new attention order, BigGAN up/down, AdaGN, class-conditional, learned Σ
    "unet-adm": ("model", "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 2 "
                 "--num_head_channels 16 --attention_resolutions 16,8 --resblock_updown True "
                 "--use_new_attention_order True --class_cond True --learn_sigma True"),
    # DDPM-style: the embedding added, legacy attention with other heads upstream
    "unet-legacy": ("model", "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 "
                    "--num_heads 2 --num_heads_upsample 4 --attention_resolutions 8 "
                    "--use_scale_shift_norm False"),
    "superres": ("sr", "--large_size 64 --small_size 32 --num_channels 32 --num_res_blocks 1 "
                 "--attention_resolutions 8 --num_head_channels 32 --learn_sigma True "
                 "--resblock_updown True"),
    "classifier": ("classifier", "--image_size 64 --classifier_width 32 --classifier_depth 1 "
                   "--classifier_attention_resolutions 32,8 --classifier_pool attention"),
}
BUILDERS = {"model": ("model_and_diffusion_defaults", "create_model"),
            "sr": ("sr_model_and_diffusion_defaults", "sr_create_model"),
            "classifier": ("classifier_and_diffusion_defaults", "create_classifier")}


def their_model(kind, flags):
    """Their network, built as their scripts build it: defaults updated by the flags."""
    defaults_fn, create_fn = (getattr(script_util, n) for n in BUILDERS[kind])
    opts = defaults_fn()
    words = flags.split()
    for key, value in zip(words[::2], words[1::2]):
        key = key[2:]
        d = opts[key]
        opts[key] = (value == "True") if isinstance(d, bool) else value if isinstance(d, str) else type(d)(value)
    names = create_fn.__code__.co_varnames[:create_fn.__code__.co_argcount]
    model = create_fn(**{k: opts[k] for k in names if k in opts})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert_openai_reproduces_guided_diffusion_networks(case, tmp_path):
    """A state dict of guided-diffusion's own UNetModel / SuperResModel / EncoderUNetModel
    (random weights), converted with the same flag string, gives their outputs (1e-5)."""
    import gaussdiff
    from gaussdiff.training.classifier import load_classifier
    from gaussdiff.cli import main
    kind, flags = CONVERT_CASES[case]
    model = their_model(kind, flags)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    assert main(["convert-openai", str(tmp_path / "ckpt.pt"), "--flags", flags,
                 "--out", str(tmp_path / "out")]) == 0
    words = flags.split()
    size = int(words[words.index("--large_size" if kind == "sr" else "--image_size") + 1])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, size, size, generator=g), torch.tensor([0, 417, 999])
    kw = {}
    if kind == "classifier":
        ours = load_classifier(str(tmp_path / "out"), device="cpu").model
    else:
        ours = gaussdiff.load(str(tmp_path / "out"), device="cpu").model
        if "--class_cond True" in flags:
            kw["y"] = torch.tensor([1, 500, 999])
        if kind == "sr":
            kw["low_res"] = torch.randn(3, 3, size // 2, size // 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, **kw), model(x, t, **kw), rtol=1e-5, atol=1e-5)

"""Mixed precision and memory options of the trainer: ADM's dynamic loss scaling, half precision
on a CPU, microbatching, gradient checkpointing; and the default step's random draws."""
import numpy as np
import pytest
import torch

from gaussdiff.training import precision as amp
from gaussdiff.training.precision import DynamicLossScaler, make_scaler, resolve_precision
from gaussdiff.training.trainer import DEFAULTS, Trainer


# ------------------------------------------------------------------------ loss scaler
def fake_params(*grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        params.append(p)
    return params


def test_loss_scaler_starts_at_two_to_the_twenty_and_unscales():
    """ADM's initial scale 2^20; unscale_ divides the gradients by the scale."""
    s = DynamicLossScaler()
    assert s.scale == 2.0 ** 20
    assert float(s.scale_loss(torch.tensor(3.0))) == 3.0 * 2 ** 20
    params = fake_params([2.0 ** 20, -2.0 ** 21], [2.0 ** 19])
    assert s.unscale_(params) is True
    assert params[0].grad.tolist() == [1.0, -2.0] and params[1].grad.tolist() == [0.5]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_loss_scaler_overflow_skips_and_halves(bad):
    """A non-finite gradient anywhere: unscale_ says False (the step is skipped), the scale is
    halved and the clean-step count restarts."""
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    s.update(True)
    s.update(True)
    assert s.good_steps == 2
    assert s.unscale_(fake_params([1.0, 2.0], [3.0, bad])) is False
    s.update(False)
    assert (s.scale, s.good_steps, s.skipped) == (512.0, 0, 1)
    s.update(False)
    assert s.scale == 256.0 and s.skipped == 2


def test_loss_scaler_grows_after_n_clean_steps():
    """The scale doubles after growth_interval clean steps in a row, not before; an overflow
    in between restarts the count; it never drops below min_scale."""
    s = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    for expected in (8.0, 8.0, 16.0, 16.0, 16.0, 32.0):
        s.update(True)
        assert s.scale == expected
    s.update(True)
    s.update(True)
    s.update(False)   # overflow after two clean steps: halve, count from zero
    assert s.scale == 16.0
    s.update(True)
    s.update(True)
    assert s.scale == 16.0
    s.update(True)
    assert s.scale == 32.0
    tiny = DynamicLossScaler(init_scale=2.0, min_scale=1.0)
    for _ in range(3):
        tiny.update(False)
    assert tiny.scale == 1.0


def test_loss_scaler_state_round_trip():
    s = DynamicLossScaler(init_scale=64.0, growth_interval=5)
    s.update(True)
    s.update(False)
    s.update(True)
    r = DynamicLossScaler()
    r.load_state_tensors(s.state_tensors())
    assert (r.scale, r.good_steps) == (s.scale, s.good_steps) == (32.0, 1)
    assert make_scaler("fp32").state_tensors() == {} and make_scaler("bf16").scale == 1.0


def test_half_precision_on_cpu_without_support_warns_and_uses_fp32(capsys, monkeypatch):
    """On a CPU without fp16/bf16 instructions, asking for them gives fp32 and one warning line
    on stderr, unless forced; a CPU that has them keeps them, silently."""
    monkeypatch.setattr(amp, "cpu_supports", lambda precision: precision == "fp32")
    assert resolve_precision("fp16", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "fp32"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("warning" in e and "--force-precision" in e for e in err)
    assert resolve_precision("bf16", torch.device("cpu"), force=True) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(amp, "cpu_supports", lambda precision: True)
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, rng.integers(0, 256, size=(24, 8, 8, 1), dtype=np.uint8),
             rng.integers(0, 3, size=24))
    return str(path)


def make_trainer(data, out, **opts):
    o = dict(DEFAULTS, data=data, model_channels=16, channel_mult="1,2", num_res_blocks=1,
              attention_resolutions="4", norm_groups=8, diffusion_steps=50, var_type="learned_range",
              loss="hybrid", batch_size=8, steps=10, lr=1e-3, ema="0.9", seed=1, flip=True,
              class_cond=True, sample_every=0)
    o.update(opts)
    tr = Trainer(o, str(out), device="cpu", progress=False)
    # leave no layer at zero (the output convolutions start at zero, which would keep every
    # gradient but the last layer's at exactly zero in the first step)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return tr


def params(tr):
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def grads(tr):
    return {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("micro", [2, 3])
def test_microbatch_step_equals_full_batch(data, tmp_path, micro):
    """Batch 8 run in chunks of 2 (or 3, 3, 2) with accumulated gradients takes the same step as
    batch 8 at once: the same losses and gradients up to float32 summation order, and
    parameters within 1e-6 after the AdamW step. (Adam divides by sqrt(v) + 1e-8, which blows
    the rounding noise of gradients near 1e-9 up to ~1e-2·lr, hence lr 1e-4 here.)"""
    full = make_trainer(data, tmp_path / "full", lr=1e-4)
    chunked = make_trainer(data, tmp_path / "chunked", lr=1e-4, microbatch=micro)
    out_full, out_chunked = full.train_step(), chunked.train_step()
    for k in ("loss", "mse", "vb", "quarter"):
        torch.testing.assert_close(out_chunked[k], out_full[k], rtol=1e-5, atol=1e-6)
    assert_close(grads(chunked), grads(full), 1e-6)
    assert_close(params(chunked), params(full), 1e-6)
    assert torch.equal(chunked.gen.get_state(), full.gen.get_state())


def test_grad_checkpoint_gives_the_same_gradients(data, tmp_path):
    """Recomputing the ResBlock/AttentionBlock activations in the backward pass (dropout masks
    replayed) gives the gradients of the plain backward pass."""
    plain = make_trainer(data, tmp_path / "plain", dropout=0.3)
    ckpt = make_trainer(data, tmp_path / "ckpt", dropout=0.3, grad_checkpoint=True)
    assert any(getattr(m, "grad_checkpoint", False) for m in ckpt.model.modules())
    torch.manual_seed(7)
    plain.train_step()
    torch.manual_seed(7)
    ckpt.train_step()
    assert_close(grads(ckpt), grads(plain), 1e-6)
    assert_close(params(ckpt), params(plain), 1e-6)


def test_fp16_overflow_step_is_skipped(data, tmp_path):
    """fp16 (forced on this CPU): a step whose scaled gradients overflow changes neither the
    weights nor the EMA, halves the loss scale and still counts as a step; the next one trains."""
    tr = make_trainer(data, tmp_path / "fp16", precision="fp16", force_precision=True)
    assert tr.precision == "fp16" and tr.scaler.scale == 2.0 ** 20
    tr.scaler.scale = 3e38   # any gradient times this overflows
    before, ema_before = params(tr), {k: v.clone() for k, v in tr.ema.shadows[0.9].items()}
    tr.train_step()
    assert tr.step == 1 and tr.scaler.scale == 1.5e38 and tr.scaler.skipped == 1
    assert_close(params(tr), before, 0.0)
    assert_close(tr.ema.shadows[0.9], ema_before, 0.0)
    tr.scaler.scale = 2.0 ** 10
    out = tr.train_step()
    assert tr.scaler.skipped == 1 and torch.isfinite(out["loss"]).all()
    assert max((params(tr)[k] - before[k]).abs().max() for k in before) > 0


def test_unsupported_half_precision_on_cpu_trains_in_fp32(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(amp, "cpu_supports", lambda precision: precision == "fp32")
    tr = make_trainer(data, tmp_path / "warn", precision="bf16")
    assert "training in fp32" in capsys.readouterr().err
    assert tr.precision == "fp32" and tr.train_net is tr.model


def test_default_step_draws_the_same_random_numbers(data, tmp_path):
    """With default options a step draws, from the trainer's generator, exactly the plain
    loop's numbers in its order: flips [B], timesteps [B], noise [B, C, H, W] (so runs started
    before the performance options resume and reproduce bit for bit)."""
    tr = make_trainer(data, tmp_path / "draws")
    expected = torch.Generator().manual_seed(tr.o["seed"] + 1)
    for _ in range(2):
        tr.train_step()
        torch.rand(8, generator=expected)
        torch.randint(0, 50, (8,), generator=expected)
        torch.randn((8, 1, 8, 8), generator=expected)
    assert torch.equal(tr.gen.get_state(), expected.get_state())


# ------------------------------------------------------------------------ exact resume
def _run(data, out, steps, resume=None, **opts):
    o = dict(DEFAULTS, data=data, model_channels=16, channel_mult="1,2", num_res_blocks=1,
             attention_resolutions="4", norm_groups=8, diffusion_steps=50, var_type="learned_range",
             loss="hybrid", batch_size=8, steps=steps, lr=1e-3, ema="0.9", seed=1, flip=True,
             class_cond=True, sample_every=0, save_every=1, log_every=1, force_precision=True)
    o.update(opts)
    return Trainer(o, str(out), resume=resume, device="cpu", progress=False).run()


def _log(run_dir):
    import json
    with open(run_dir / "log.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in f]


@pytest.mark.parametrize("precision, microbatch", [("fp32", 0), ("fp32", 4), ("bf16", 0),
                                                   ("fp16", 0), ("fp16", 4)])
def test_resume_is_bit_exact_for_every_precision(data, tmp_path, precision, microbatch):
    """Stopping after 2 of 5 steps and resuming gives the uninterrupted run's weights, EMA,
    optimizer state, loss scale (fp16: its overflows halve it, so it moves) and log records
    (loss_scale and skipped_steps included), bit for bit."""
    kw = dict(precision=precision, microbatch=microbatch)
    ref = _run(data, tmp_path / "ref", 5, **kw)
    _run(data, tmp_path / "cut", 2, **kw)
    cut = _run(data, tmp_path / "cut", 5, resume="auto", **kw)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, cut.model.state_dict()[k]), k
    for k, v in ref.ema.shadows[0.9].items():
        assert torch.equal(v, cut.ema.shadows[0.9][k]), k
    for pid, s in ref.opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(cut.opt.state_dict()["state"][pid][k]))
    assert (ref.scaler.scale, ref.scaler.skipped) == (cut.scaler.scale, cut.scaler.skipped)
    assert _log(tmp_path / "ref") == _log(tmp_path / "cut")
    assert {r["precision"] for r in _log(tmp_path / "cut")} == {precision}   # the one that ran
    if precision == "fp16":   # the test means something only if the scale moved
        assert ref.scaler.scale < amp.DynamicLossScaler().scale


# ------------------------------------------------------------------------ sampling precision
def test_sampling_under_bf16_autocast_is_close_and_leaves_the_model_as_it_was(tmp_path):
    """Pipeline.sample(precision="bf16"): the network runs under autocast (its convolutions
    in bf16), the sampler in float64; the images stay within a few 8-bit levels of fp32's
    (bf16 keeps 8 bits of mantissa), and afterwards the model is the plain fp32 module again
    (fp32 sampling then reproduces the first fp32 run bit for bit)."""
    import gaussdiff
    from guided_models import make_model_dir
    pipe = gaussdiff.load(make_model_dir(tmp_path / "m", num_classes=None), device="cpu")
    kw = dict(num=3, sampler="heun", steps=4, seed=2, progress=False)
    ref, _ = pipe.sample(**kw)
    seen = []
    conv = next(m for m in pipe.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype == torch.bfloat16))
    half, _ = pipe.sample(precision="bf16", **kw)
    assert seen and all(seen)
    assert "forward" not in vars(pipe.model)
    diff = np.abs(half.astype(int) - ref.astype(int))
    assert diff.mean() < 3 and diff.max() <= 40
    seen.clear()
    again, _ = pipe.sample(**kw)
    assert np.array_equal(again, ref) and not any(seen)


def test_precision_auto_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(amp, "cpu_supports", lambda p: p == "fp32")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(amp, "cpu_supports", lambda p: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"

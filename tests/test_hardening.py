"""No silent garbage: numeric options out of range, non-finite weights or samples and blank
images for the metrics are one line on stderr, exit status 2, and nothing written."""
import math

import numpy as np
import pytest
import torch

import gaussdiff
from gaussdiff.cli import main
from gaussdiff.errors import UsageError
from gaussdiff.metrics.evaluate import check_images
from gaussdiff.modeldir import WEIGHTS_NAME, load_tensors, save_tensors
from gaussdiff.validate import check_sampling_numbers

from guided_models import make_classifier_dir, make_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    return dict(model=make_model_dir(root / "m", num_classes=None),
                cond=make_model_dir(root / "c", null_class=True),
                cls=make_classifier_dir(root / "cls"))


def one_line(err: str, *mentions):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for m in mentions:
        assert m in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("sampler, extra, flag", [
    ("ddim", ["--eta", "5"], "--eta"),
    ("ddim", ["--eta", "-1"], "--eta"),
    ("ddim_sigma", ["--eta", "nan"], "--eta"),
    ("heun", ["--churn", "-5"], "--churn"),
    ("heun", ["--churn", "inf"], "--churn"),
    ("heun", ["--churn", "10", "--snoise", "nan"], "--snoise"),
    ("heun", ["--churn", "10", "--tmin", "5", "--tmax", "1"], "--tmin"),
    ("heun", ["--tmax", "nan"], "--tmax"),
    ("heun", ["--rho", "0"], "--rho"),
    ("heun", ["--sigma-min", "-1"], "--sigma-min"),
    ("heun", ["--sigma-min", "5", "--sigma-max", "1"], "--sigma-min"),
    ("adaptive", ["--rtol", "0", "--atol", "0"], "--rtol"),
    ("adaptive", ["--atol", "-1"], "--atol"),
    ("ddim", ["--temperature", "nan"], "--temperature"),
    ("ddim", ["--temperature", "0"], "--temperature"),
])
def test_out_of_range_sampling_numbers_exit_2_and_write_nothing(dirs, tmp_path, capsys, sampler,
                                                                 extra, flag):
    out, grid = tmp_path / "s.npz", tmp_path / "s.png"
    code = main(["sample", dirs["model"], "--num", "2", "--sampler", sampler, "--steps", "3",
                 "--out", str(out), "--grid", str(grid), "--no-progress", *extra])
    assert code == 2
    one_line(capsys.readouterr().err, flag)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, flag", [
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--cfg-scale", "inf"], "--cfg-scale"),
    (["--classifier", "CLS", "--classifier-scale", "nan"], "--classifier-scale"),
])
def test_non_finite_guidance_scales_exit_2(dirs, tmp_path, capsys, extra, flag):
    extra = [dirs["cls"] if a == "CLS" else a for a in extra]
    out = tmp_path / "s.npz"
    assert main(["sample", dirs["cond"], "--num", "2", "--steps", "3", "--out", str(out),
                 "--no-progress", *extra]) == 2
    one_line(capsys.readouterr().err, flag)
    assert not out.exists()


def test_the_allowed_ranges_pass():
    """The boundaries themselves are allowed: η ∈ {0, 1}, S_churn = 0, tmin = tmax, tmax = inf,
    negative guidance scales (guiding away), rtol = 0 with an atol."""
    check_sampling_numbers(eta=0.0, churn=0.0, tmin=1.0, tmax=1.0, snoise=0.0, rho=0.5,
                           sigma_min=0.002, sigma_max=80, rtol=0.0, atol=1e-3, cfg_scale=-1.0,
                           classifier_scale=0.0, temperature=0.5)
    check_sampling_numbers(eta=1.0, tmax=math.inf)


def test_nan_weights_are_refused_on_load(dirs, tmp_path, capsys):
    """A model file holding NaN never samples: one line naming the file and the tensor."""
    import shutil
    d = tmp_path / "nan"
    shutil.copytree(dirs["model"], d)
    state = load_tensors(str(d / WEIGHTS_NAME))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    save_tensors(str(d / WEIGHTS_NAME), state)
    with pytest.raises(UsageError, match="NaN or inf"):
        gaussdiff.load(str(d), device="cpu")
    out = tmp_path / "s.npz"
    assert main(["sample", str(d), "--num", "2", "--out", str(out), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, WEIGHTS_NAME, key)
    assert not out.exists()


def test_non_finite_samples_are_never_written(dirs, monkeypatch):
    """If a sampler's result is not finite (a model that overflows), Pipeline.sample raises
    instead of returning NaN turned into black uint8 images."""
    pipe = gaussdiff.load(dirs["model"], device="cpu")
    real_forward = pipe.model.forward
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: real_forward(*a, **k) * float("nan"))
    with pytest.raises(UsageError, match="NaN or infinite"):
        pipe.sample(2, sampler="heun", steps=2, progress=False)


def test_metrics_refuse_blank_or_non_finite_images():
    check_images(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(UsageError, match="constant value 0"):
        check_images(np.zeros((4, 8, 8, 1), dtype=np.uint8))
    bad = np.random.default_rng(0).random((4, 8, 8, 1))
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        check_images(bad, "the reference")


def test_eval_cli_refuses_blank_samples(tmp_path, capsys):
    samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, np.zeros((4, 8, 8, 1), dtype=np.uint8))
    np.savez(ref, np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8))
    out = tmp_path / "e.json"
    assert main(["eval", str(samples), "--ref", str(ref), "--metrics", "fid", "--out", str(out),
                 "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "constant")
    assert not out.exists()


# ----------------------------------------------------------------------------- checkpoints
def test_ctrl_c_while_checkpointing_still_prunes_to_keep(tmp_path, monkeypatch):
    """A SIGINT that arrives while a checkpoint is written is held back until the checkpoint,
    the top-level files and the pruning are done: then KeyboardInterrupt, and no more than
    `keep` checkpoints remain. The top-level files are copies (their own inodes), so damaging
    one leaves the checkpoint intact."""
    import os
    import signal
    from gaussdiff.training import checkpoint as ck
    files = lambda v: {"model.safetensors": {"w": torch.full((3,), float(v))}, "state.json": {"step": v}}  # noqa: E731
    ck.write_checkpoint(str(tmp_path), 1, files(1), keep=1)
    real = ck.write_file
    sent = []

    def interrupting(path, data):
        if not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
        real(path, data)
    monkeypatch.setattr(ck, "write_file", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ck.write_checkpoint(str(tmp_path), 2, files(2), keep=1)
    assert sent and [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [2]
    newest = tmp_path / "checkpoints" / "step0000002" / "model.safetensors"
    top = tmp_path / "model.safetensors"
    assert top.read_bytes() == newest.read_bytes()
    assert os.stat(top).st_ino != os.stat(newest).st_ino and os.stat(newest).st_nlink == 1
    top.write_bytes(b"damaged")
    ck.verify(str(newest.parent))   # the checkpoint still verifies


def test_resume_removes_the_copy_a_killed_run_left(tmp_path):
    """A SIGKILL while a top-level file is copied up leaves `.NAME.PID.copy` in the run
    directory; the resume's refresh deletes it and restores the top-level files (seen in CI)."""
    from gaussdiff.training import checkpoint as ck
    d = ck.write_checkpoint(str(tmp_path), 1, {"model.safetensors": {"w": torch.ones(3)}}, keep=1)
    stale = tmp_path / ".model.safetensors.12345.copy"
    stale.write_bytes(b"half")
    (tmp_path / "model.safetensors").write_bytes(b"one step behind")
    ck.refresh_top_level(str(tmp_path), d)
    assert not stale.exists()
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "checkpoints" / "step0000001"
                                                             / "model.safetensors").read_bytes()


def test_failed_setup_leaves_no_run_directory(tmp_path, capsys):
    """`train --resume` into a new directory and contradictory options are errors that leave no
    empty run directory behind."""
    from cli_helpers import TINY, make_npz
    data = make_npz(tmp_path / "d.npz")
    for extra, mention in ((["--resume"], "holds no checkpoint"),
                           (["--loss", "hybrid", "--var-type", "fixed_small"], "--var-type")):
        out = tmp_path / "run"
        args = ["train", "--data", str(data), "--out", str(out), "--steps", "1", *TINY]
        args = [a for a in args]
        if "--var-type" in extra:   # TINY sets learned_range: replace it
            i = args.index("--var-type")
            del args[i:i + 2]
        assert main(args + extra) == 2
        one_line(capsys.readouterr().err, mention)
        assert not out.exists()


# ----------------------------------------------------------------------------- training data
def _trainer(tmp_path, images, resume=None, **opts):
    from gaussdiff.training.trainer import DEFAULTS, Trainer
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "d.npz"
    np.savez(path, images)
    o = dict(DEFAULTS, data=str(path), model_channels=16, channel_mult="1", num_res_blocks=1,
             attention_resolutions="0", norm_groups=8, diffusion_steps=50, batch_size=8, steps=6,
             lr=1e-3, ema="0.9", seed=3, sample_every=0, save_every=100, log_every=1)
    o.update(opts)
    return Trainer(o, str(tmp_path / "run"), resume=resume, device="cpu", progress=False)


def test_flips_are_horizontal(tmp_path):
    """--flip true mirrors images left-right (the W axis, as DDPM and ADM do), never upside
    down: every row of a batch is its image or that image's mirror, and both occur."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 8, 8, 1), dtype=np.uint8)
    tr = _trainer(tmp_path, images, flip=True, batch_size=8)
    seen = {"same": 0, "mirrored": 0}
    for _ in range(4):
        idx_state = tr.sampler.state_tensors()
        x, _ = tr.next_batch()
        tr.sampler.load_state_tensors(idx_state)
        idx = tr.sampler.next_indices()
        for row, i in zip(x, idx):
            original = torch.from_numpy(images[int(i)].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
            if torch.allclose(row, original):
                seen["same"] += 1
            else:
                torch.testing.assert_close(row, original.flip(-1))   # W, the last axis
                seen["mirrored"] += 1
    assert seen["same"] > 0 and seen["mirrored"] > 0


def test_warmup_is_linear_over_the_given_steps(tmp_path):
    """--warmup W: the learning rate of step k (1-based) is lr·min(1, k/W), as the optimizer
    sees it and as log.jsonl records it."""
    images = np.random.default_rng(1).integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    tr = _trainer(tmp_path, images, warmup=4, steps=6)
    applied = []
    real_step = tr.opt.step

    def spy(*a, **k):
        applied.append(tr.opt.param_groups[0]["lr"])
        return real_step(*a, **k)
    tr.opt.step = spy
    tr.run()
    expected = [1e-3 * min(1, k / 4) for k in range(1, 7)]
    assert applied == pytest.approx(expected, rel=1e-12)
    import json
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert logged == pytest.approx(expected, rel=1e-12)


def test_lr_anneal_is_improved_diffusions_linear_decay(tmp_path):
    """--lr-anneal-steps N: step k (1-based) runs at lr·min(1, k/W)·(1 − (k−1)/N), improved-
    diffusion's _anneal_lr (frac_done = step/lr_anneal_steps with its 0-based step), which
    reaches 0 at step N; after a --resume the schedule continues where it stopped."""
    images = np.random.default_rng(1).integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    expected = [1e-3 * min(1, k / 2) * (1 - (k - 1) / 6) for k in range(1, 7)]
    applied = []
    for steps, resume in ((3, None), (6, "auto")):
        tr = _trainer(tmp_path, images, warmup=2, steps=steps, lr_anneal_steps=6, save_every=3,
                      resume=resume)
        real_step = tr.opt.step

        def spy(*a, _real=real_step, _tr=tr, **k):
            applied.append(_tr.opt.param_groups[0]["lr"])
            return _real(*a, **k)
        tr.opt.step = spy
        tr.run()
    assert applied == pytest.approx(expected, rel=1e-12)
    assert applied[-1] == pytest.approx(1e-3 / 6)
    for bad in (-1, 5):
        with pytest.raises(UsageError, match=f"--lr-anneal-steps must be 0 .* got {bad}"):
            _trainer(tmp_path / "other", images, steps=6, lr_anneal_steps=bad)


def test_image_folder_channels_come_from_the_data(tmp_path):
    """A folder of greyscale PNGs is a 1-channel dataset (not silently RGB); grey among colour
    images become RGB; --channels still forces either."""
    from PIL import Image
    from gaussdiff.data import load_dataset
    rng = np.random.default_rng(0)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(grey / f"{i}.png")
    ds = load_dataset(str(grey))
    assert ds.images.shape == (3, 8, 8, 1)
    assert load_dataset(str(grey), channels=3).images.shape == (3, 8, 8, 3)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(grey / "c.png")
    mixed = load_dataset(str(grey))
    assert mixed.images.shape == (4, 8, 8, 3)
    g0 = np.asarray(Image.open(grey / "0.png"))
    assert all(np.array_equal(mixed.images[0][..., c], g0) for c in range(3))


# ----------------------------------------------------------------------------- long sampling
def test_sharded_sampling_resumes_after_an_interruption(dirs, tmp_path, capsys, monkeypatch):
    """--num above --shard-size: shards go to OUT.parts/ one by one; a run interrupted after
    the first shard continues from it when rerun, and the result equals an uninterrupted
    run's, byte for byte; the parts directory is removed at the end; a rerun with other
    settings is refused, not mixed in."""
    import gaussdiff.modeldir as md
    common = ["sample", dirs["model"], "--num", "5", "--shard-size", "2", "--sampler", "ddim",
              "--steps", "3", "--no-progress"]
    ref = tmp_path / "ref.npz"
    assert main(common + ["--out", str(ref)]) == 0
    out = tmp_path / "cut.npz"
    calls = []
    real = md.Pipeline.sample

    def interrupted(self, num, *a, **k):
        calls.append(k.get("start_index"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, num, *a, **k)
    monkeypatch.setattr(md.Pipeline, "sample", interrupted)
    assert main(common + ["--out", str(out)]) == 130
    capsys.readouterr()
    assert not out.exists() and sorted(p.name for p in (tmp_path / "cut.npz.parts").iterdir()) == \
        ["settings.json", "shard_000000.npz"]
    monkeypatch.setattr(md.Pipeline, "sample", real)
    calls.clear()
    assert main(common[:-1] + ["--seed", "1", "--no-progress", "--out", str(out)]) == 2
    one_line(capsys.readouterr().err, "other settings", "seed")
    assert main(common + ["--out", str(out)]) == 0
    assert "1 of 3 shards" in capsys.readouterr().err
    with np.load(ref) as a, np.load(out) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert not (tmp_path / "cut.npz.parts").exists()


# ----------------------------------------------------------------------------- EMA
def test_ema_warmup_rate_and_initial_weight_share():
    """EMA: without warm-up, after n updates the average holds exactly r^n of the initial
    weights; with warm-up the rate of update k is min(r, (1+k)/(10+k)), so the initial share is
    Π_k min(r, (1+k)/(10+k)) — computed here from that product, in float64."""
    from gaussdiff.training.trainer import EMA
    w = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        w.weight.fill_(1.0)
    plain, warm = EMA(w, [0.99]), EMA(w, [0.99], warmup=True)
    for e in (plain, warm):   # double shadows, so that the products compare to round-off
        e.shadows = {r: {k: v.double() for k, v in s.items()} for r, s in e.shadows.items()}
    with torch.no_grad():
        w.weight.fill_(0.0)   # trained weights 0: the shadow is the initial weight's share
    for n in range(50):
        plain.update(w, n)
        warm.update(w, n)
    assert float(plain.shadows[0.99]["weight"]) == pytest.approx(0.99 ** 50, rel=1e-12)
    expected = math.prod(min(0.99, (1 + k) / (10 + k)) for k in range(50))
    assert float(warm.shadows[0.99]["weight"]) == pytest.approx(expected, rel=1e-12)
    assert expected < 1e-9 and 0.99 ** 50 > 0.6   # warm-up forgets the start far faster


def test_export_warns_about_an_ema_that_is_mostly_initial_weights(tmp_path, capsys):
    """export --ema 0.999 of a 6-step run: 0.999^6 = 99% of the weights are the initial ones;
    one warning line says so and how to avoid it; --ema raw gives none."""
    from cli_helpers import TINY, make_npz
    data = make_npz(tmp_path / "d.npz")
    args = [a if a != "0.9,0.99" else "0.999" for a in TINY]
    i = args.index("--save-every")
    args[i + 1] = "6"
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "6", *args]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "m"), "--ema", "0.999"]) == 0
    one_line(capsys.readouterr().err, "99%", "0.999^6", "--ema-warmup")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "m2"), "--ema", "raw"]) == 0
    assert capsys.readouterr().err == ""

"""Reliability and security: crash-safe checkpoints, the NaN/inf guard, disk errors, hostile
datasets and configs (property-based tests and a fuzz run), and that nothing read runs code.

The crash tests run `gaussdiff train` as a user does (subprocesses, killed with SIGKILL); the rest
runs in-process on a tiny network (32 channels, one level, no attention, 8x8 images).
"""
import errno
import gzip
import io
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import time
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gaussdiff
from gaussdiff.training import checkpoint as ckpt
from gaussdiff.cli import main
from gaussdiff.data import load_dataset, load_image_folder, load_npz, read_idx, read_image
from gaussdiff.errors import UsageError
from gaussdiff.nn.unet import UNetConfig

from cli_helpers import TINY as TINY_BASE, cli, data_dir, log_records

TINY = TINY_BASE + ["--save-every", "1"]   # a checkpoint after every step (the last flag wins)
STEPS = 16
FILES = ("model.safetensors", "ema_0.9.safetensors", "ema_0.99.safetensors", "state.safetensors")
HYPOTHESIS = settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


def run_ok(*args, cwd):
    proc = cli(*args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return err


def one_line(text: str, *mentions):
    """A single line (no traceback) that names each of `mentions`."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return data_dir(tmp_path_factory, "reliability")


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted run of STEPS steps, a checkpoint after every step."""
    run_ok("train", "--data", "data.npz", "--out", "ref", "--steps", STEPS, *TINY, cwd=workdir)
    return workdir / "ref"


def assert_same_run(run, ref):
    """Bit-identical weights, EMA and optimizer/RNG/data-order state; the log holds every step
    once, with the losses of the uninterrupted run (so each step saw the same batch)."""
    for f in FILES:
        assert (run / f).read_bytes() == (ref / f).read_bytes(), f
    got, want = log_records(run), log_records(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        assert (g["loss"], g["mse"], g["vb"]) == (w["loss"], w["mse"], w["vb"]), g["step"]


# ----------------------------------------------------------------------------- crash safety
def checkpoint_steps(run):
    return [s for s, _ in ckpt.list_checkpoints(str(run))]


def test_sigkill_three_times_then_resume_is_bit_exact(workdir, reference):
    """SIGKILL a run at random moments (while training or writing a checkpoint) three times,
    resuming each time with --resume: the final weights, EMA, optimizer, RNG and data-order state
    equal the uninterrupted run's byte for byte, no step's data is lost or repeated (the log's
    per-step losses match), only --keep checkpoints remain and no temporary files are left."""
    rng = random.Random(20240607)
    run = workdir / "killed"
    kills, finished = 0, False
    while not finished:
        had = checkpoint_steps(run)
        args = ["train", "--data", "data.npz", "--out", "killed", "--steps", STEPS, "--keep", 2, *TINY]
        if had:
            args.append("--resume")
        with open(workdir / "stderr.txt", "w") as err:
            proc = cli(*args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err)
            if kills < 3:
                # wait for two new checkpoints (start-up takes seconds), the time between them
                # being one step; then kill at a random moment within the next step, be it
                # computing or writing its checkpoint
                deadline, last, marks = time.time() + 120, (had[-1] if had else 0), []
                while proc.poll() is None and time.time() < deadline and len(marks) < 2:
                    steps = checkpoint_steps(run)
                    if steps and steps[-1] > last + len(marks):
                        marks.append(time.time())
                    time.sleep(0.005)
                if len(marks) == 2:
                    time.sleep(rng.uniform(0.0, marks[1] - marks[0]))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
            finished = proc.wait(timeout=300) == 0
            assert finished or proc.returncode == -signal.SIGKILL, (workdir / "stderr.txt").read_text()
        if had:   # each resume took the newest checkpoint and said so
            m = re.search(r"continuing from (\S+) \(step (\d+)\)", (workdir / "stderr.txt").read_text())
            assert m and int(m.group(2)) == had[-1], (workdir / "stderr.txt").read_text()
    assert kills == 3
    assert_same_run(run, reference)
    assert checkpoint_steps(run) == [STEPS - 1, STEPS]                    # --keep 2
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]
    assert not [n for n in os.listdir(run) if n.endswith((".tmp", ".copy"))]
    ckpt.verify(str(run / "checkpoints" / f"step{STEPS:07d}"))


def test_corrupt_checkpoints_are_named_and_skipped(workdir, reference):
    """A truncated newest checkpoint and a bit-flipped one before it are each reported by name
    and skipped; --resume auto continues from the newest intact one and still ends bit-exact."""
    run_ok("train", "--data", "data.npz", "--out", "corrupt", "--steps", 10, "--keep", 3, *TINY,
           cwd=workdir)
    run = workdir / "corrupt"
    assert checkpoint_steps(run) == [8, 9, 10]
    newest = run / "checkpoints" / "step0000010" / "model.safetensors"
    data = newest.read_bytes()
    os.truncate(newest, len(data) // 2)
    flipped = run / "checkpoints" / "step0000009" / "state.safetensors"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    flipped.write_bytes(bytes(raw))
    err = run_ok("train", "--data", "data.npz", "--out", "corrupt", "--steps", STEPS, "--resume",
                 "auto", "--keep", 3, *TINY, cwd=workdir)
    assert "skipping corrupt checkpoint" in err and "step0000010: model.safetensors has" in err, err
    assert "step0000009: state.safetensors does not match its sha256" in err, err
    assert re.search(r"continuing from \S+step0000008 \(step 8\)", err), err
    assert_same_run(run, reference)


def _opts(data, **kw):
    from gaussdiff.training.trainer import DEFAULTS
    o = dict(DEFAULTS)
    o.update(data=str(data), model_channels=32, channel_mult="1", num_res_blocks=1,
             attention_resolutions="0", diffusion_steps=50, batch_size=8,
             var_type="learned_range", loss="hybrid", lr=1e-3, ema="0.9", save_every=1,
             sample_every=0, log_every=1, seed=0, steps=4, keep=3)
    o.update(kw)
    return o


def _trainer(data, out, **kw):
    from gaussdiff.training.trainer import Trainer
    return Trainer(_opts(data, **kw), str(out), device="cpu", progress=False)


def _params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _poison_loss(trainer, step, factor):
    """Multiply the per-sample losses of `step` by `factor` (NaN or inf), keeping the graph."""
    losses = trainer.objective.losses

    def poisoned(net, x0, draw, kwargs):
        per_sample, out = losses(net, x0, draw, kwargs)
        if trainer.step + 1 == step:
            per_sample, out["loss"] = per_sample * factor, out["loss"] * factor
        return per_sample, out
    trainer.objective.losses = poisoned


def test_nonfinite_loss_or_gradient_skips_the_step(workdir, tmp_path):
    """A step with a NaN loss (step 2) or a NaN gradient with a finite loss (step 4) makes no
    optimizer or EMA update; the steps around them do; log.jsonl counts one bad step at each."""
    tr = _trainer(workdir / "data.npz", tmp_path / "run", steps=5)
    _poison_loss(tr, 2, float("nan"))
    first = next(tr.model.parameters())
    first.register_hook(lambda g: g * float("nan") if tr.step + 1 == 4 else g)
    changed = []
    for _ in range(5):
        before, ema_before = _params(tr), {k: v.clone() for k, v in tr.ema.shadows[0.9].items()}
        tr.train_step()
        changed.append((not _same(before, _params(tr)), not _same(ema_before, tr.ema.shadows[0.9])))
    assert changed == [(True, True), (False, False), (True, True), (False, False), (True, True)]
    assert tr.guard.total == 2 and tr.guard.consecutive == 0

    tr2 = _trainer(workdir / "data.npz", tmp_path / "logged", steps=3)
    _poison_loss(tr2, 2, float("inf"))
    tr2.run()
    assert [r["bad_steps"] for r in log_records(tmp_path / "logged")] == [0, 1, 0]


def test_consecutive_bad_steps_stop_training(workdir, tmp_path, monkeypatch, capsys):
    """Always-NaN losses: after --max-bad-steps 3 consecutive skipped steps, train exits with
    status 2 and one line saying so; the checkpoints written hold the finite initial weights."""
    from gaussdiff.diffusion import GaussianDiffusion
    real = GaussianDiffusion.training_losses

    def always_nan(self, *a, **k):
        out = real(self, *a, **k)
        return {**out, "loss": out["loss"] * float("nan")}
    monkeypatch.setattr(GaussianDiffusion, "training_losses", always_nan)
    out = tmp_path / "nan"
    code = main(["train", "--data", str(workdir / "data.npz"), "--out", str(out), "--steps", "10",
                 "--max-bad-steps", "3", *TINY])
    assert code == 2
    one_line(capsys.readouterr().err, "training stopped at step 3", "3 consecutive", "non-finite")
    assert checkpoint_steps(out) == [1, 2]
    pipe = gaussdiff.load(str(out), device="cpu", ema=None)
    assert all(torch.isfinite(p).all() for p in pipe.model.parameters())


def test_nonfinite_model_is_never_checkpointed(workdir, tmp_path):
    """A NaN weight: save_checkpoint refuses with a one-line error naming the file, and the
    checkpoints on disk stay as they were."""
    tr = _trainer(workdir / "data.npz", tmp_path / "run", steps=2)
    tr.run()
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    with torch.no_grad():
        next(tr.model.parameters()).view(-1)[0] = float("nan")
    tr.step += 1
    with pytest.raises(ckpt.CheckpointError) as e:
        tr.save_checkpoint()
    one_line(str(e.value), "step 3", "model.safetensors", "non-finite")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before


@pytest.mark.parametrize("failure", ["disk full", "unwritable"])
def test_write_failure_leaves_previous_checkpoint_intact(workdir, tmp_path, monkeypatch, failure):
    """A full disk (ENOSPC on the second file of a checkpoint) or an unwritable run directory
    (EACCES): one clear line naming the checkpoint, the error and the intact previous
    checkpoint; nothing half-written stays behind, the top-level files are unchanged, and once
    the disk has room the same trainer saves and a new run resumes from it."""
    tr = _trainer(workdir / "data.npz", tmp_path / "run", steps=2)
    tr.run()
    run = tmp_path / "run"
    top = {f: (run / f).read_bytes() for f in ("model.safetensors", "state.json", "config.json")}
    tr.train_step()
    if failure == "disk full":
        real, calls = ckpt.write_file, []

        def full(path, data):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            real(path, data)
        monkeypatch.setattr(ckpt, "write_file", full)
        expect = "No space left on device"
    else:
        def denied(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run / "checkpoints"))
        monkeypatch.setattr(ckpt.tempfile, "mkdtemp", denied)
        expect = "Permission denied"
    with pytest.raises(ckpt.CheckpointError) as e:
        tr.save_checkpoint()
    one_line(str(e.value), "step0000003", expect, "step0000002 is intact")
    assert sorted(os.listdir(run / "checkpoints")) == ["step0000001", "step0000002"]
    ckpt.verify(str(run / "checkpoints" / "step0000002"))
    assert {f: (run / f).read_bytes() for f in top} == top
    monkeypatch.undo()
    tr.save_checkpoint()
    from gaussdiff.training.trainer import Trainer
    resumed = Trainer(_opts(workdir / "data.npz", steps=3), str(run), resume="auto", device="cpu",
                      progress=False)
    assert resumed.step == 3 and _same(_params(resumed), _params(tr))


def test_cli_disk_full_is_one_line_exit_2(workdir, tmp_path, monkeypatch, capsys):
    """`gaussdiff train` hitting a full disk at its third checkpoint: exit status 2, one line,
    checkpoints 1 and 2 intact."""
    real, calls = ckpt.write_checkpoint, []

    def full_at_third(run_dir, step, files, keep=0, log=None):
        calls.append(step)
        if len(calls) == 3:
            raise ckpt.CheckpointError(f"cannot write checkpoint step{step:07d}: No space left on "
                                       f"device; step0000002 is intact")
        return real(run_dir, step, files, keep, log)
    monkeypatch.setattr("gaussdiff.training.trainer.write_checkpoint", full_at_third)
    code = main(["train", "--data", str(workdir / "data.npz"), "--out", str(tmp_path / "r"),
                 "--steps", "5", *TINY])
    assert code == 2
    one_line(capsys.readouterr().err, "No space left on device")
    assert checkpoint_steps(tmp_path / "r") == [1, 2]


def test_cli_unwritable_run_directory_is_one_line_exit_2(workdir, tmp_path, capsys):
    """--out below a regular file (no directory can be made there): exit 2, one line naming
    the path and the system's reason, no traceback."""
    (tmp_path / "a_file").write_text("x")
    code = main(["train", "--data", str(workdir / "data.npz"), "--out",
                 str(tmp_path / "a_file" / "run"), "--steps", "1", *TINY])
    assert code == 2
    one_line(capsys.readouterr().err, "a_file", "Not a directory")


def test_resume_of_a_run_without_checkpoint_directories(workdir, tmp_path, capsys):
    """A run directory written before per-step checkpoints (top-level files only) still
    resumes, and says so."""
    tr = _trainer(workdir / "data.npz", tmp_path / "old", steps=2)
    tr.run()
    shutil.rmtree(tmp_path / "old" / "checkpoints")
    from gaussdiff.training.trainer import Trainer
    resumed = Trainer(_opts(workdir / "data.npz", steps=3), str(tmp_path / "old"), resume=True,
                      device="cpu", progress=False)
    assert resumed.step == 2
    assert "continuing from the files in" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile datasets
def _png(arr, mode=None):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def expect_usage_error(fn, *mentions):
    with pytest.raises(UsageError) as e:
        fn()
    return one_line(str(e.value), *mentions)


def test_image_modes_are_converted(tmp_path):
    """Greyscale, RGBA, palette and 16-bit images load as 8-bit RGB: grey replicated to the three
    channels, alpha dropped, 16-bit values divided by 257 (65535 -> 255)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    deep = (rng.integers(0, 256, (8, 8)) * 257).astype(np.uint16)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)], -1)
    for name, data in [("a_rgb.png", _png(rgb)), ("b_grey.png", _png(grey)),
                       ("c_rgba.png", _png(rgba)), ("d_deep.png", _png(deep))]:
        (tmp_path / name).write_bytes(data)
    ds = load_image_folder(str(tmp_path), channels=3)
    assert ds.images.shape == (4, 8, 8, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[0], rgb)
    np.testing.assert_array_equal(ds.images[1], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(ds.images[2], rgb)
    np.testing.assert_array_equal(ds.images[3], np.repeat((deep // 257)[..., None], 3, -1).astype(np.uint8))
    assert read_image(io.BytesIO(_png(deep)), None, None).shape == (8, 8, 1)   # native: grey


def test_bad_images_one_line_each_or_skipped_and_counted(tmp_path):
    """A corrupt and a truncated PNG fail with one line naming the file; --skip-bad-images skips
    and counts them; mixed sizes name the folder and the fix; an empty folder says so."""
    good = _png(np.zeros((8, 8, 3), np.uint8))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"ok{i}.png").write_bytes(good)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    expect_usage_error(lambda: load_image_folder(str(folder)), "corrupt.png")
    (folder / "corrupt.png").unlink()
    (folder / "truncated.png").write_bytes(good[:len(good) // 2])
    expect_usage_error(lambda: load_image_folder(str(folder)), "truncated.png", "corrupt image")
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    ds = load_dataset(str(folder), skip_bad=True)
    assert len(ds) == 3 and ds.skipped == 2
    assert sorted(os.path.basename(p) for p in ds.skipped_files) == ["corrupt.png", "truncated.png"]
    (folder / "big.png").write_bytes(_png(np.zeros((16, 16, 3), np.uint8)))
    expect_usage_error(lambda: load_dataset(str(folder), skip_bad=True), "mixed sizes", "--image-size")
    assert load_dataset(str(folder), image_size=8, skip_bad=True).images.shape == (4, 8, 8, 3)
    (tmp_path / "empty").mkdir()
    expect_usage_error(lambda: load_dataset(str(tmp_path / "empty")), "empty", "no images found")


def test_npz_with_wrong_keys_dtypes_or_shapes(tmp_path):
    """Each malformed .npz gives one line naming the file and what is wrong; an object array is
    refused without unpickling it."""
    def npz(name, **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        return str(path)
    u8 = np.zeros((4, 8, 8, 1), np.uint8)
    expect_usage_error(lambda: load_npz(npz("keys.npz", images=u8)), "keys.npz", "arr_0")
    expect_usage_error(lambda: load_npz(npz("float.npz", arr_0=u8.astype(np.float32))),
                       "float.npz", "uint8")
    expect_usage_error(lambda: load_npz(npz("rank.npz", arr_0=u8[..., 0])), "rank.npz", "NHWC")
    expect_usage_error(lambda: load_npz(npz("labels.npz", arr_0=u8, arr_1=np.zeros(3, int))),
                       "labels.npz", "arr_1")
    expect_usage_error(lambda: load_npz(npz("neg.npz", arr_0=u8, arr_1=-np.ones(4, int))),
                       "neg.npz", "non-negative")
    np.savez(tmp_path / "obj.npz", np.array([{"x": 1}, None], dtype=object))
    expect_usage_error(lambda: load_npz(str(tmp_path / "obj.npz")), "obj.npz")
    np.save(tmp_path / "plain.npy", u8)
    os.rename(tmp_path / "plain.npy", tmp_path / "plain.npz")
    expect_usage_error(lambda: load_npz(str(tmp_path / "plain.npz")), "plain.npz", "not an .npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04garbage")
    expect_usage_error(lambda: load_npz(str(tmp_path / "junk.npz")), "junk.npz")
    expect_usage_error(lambda: load_dataset(npz("none.npz", arr_0=u8[:0])), "none.npz", "no images")
    expect_usage_error(lambda: load_dataset(npz("wide.npz", arr_0=np.zeros((2, 8, 6, 1), np.uint8))),
                       "wide.npz", "square")


def _idx(shape, data=None, dtype_code=0x08):
    data = bytes(math.prod(shape)) if data is None else data
    return bytes([0, 0, dtype_code, len(shape)]) + struct.pack(">" + "I" * len(shape), *shape) + data


def test_idx_with_bad_headers(tmp_path):
    """Bad magic, a non-byte data type, a truncated header, a size mismatch (also one a
    product overflow could fake), corrupt gzip: one line each naming the file."""
    cases = {"magic.idx": b"\x01\x02\x08\x01" + bytes(8), "dtype.idx": _idx((2,), bytes(2), 0x0D),
             "header.idx": _idx((4, 4))[:9], "short.idx": _idx((4, 4), bytes(10)),
             "overflow.idx": _idx((2 ** 32 - 1,) * 4, bytes(3))}
    expected = {"magic.idx": "magic", "dtype.idx": "0x0d", "header.idx": "truncated IDX header",
                "short.idx": "promises 16 bytes", "overflow.idx": "promises"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        expect_usage_error(lambda: read_idx(str(tmp_path / name)), name, expected[name])
    good = gzip.compress(_idx((2, 3)))
    (tmp_path / "bad.gz").write_bytes(good[:12] + b"\xff" * 20 + good[32:])
    expect_usage_error(lambda: read_idx(str(tmp_path / "bad.gz")), "bad.gz", "cannot read IDX")
    assert read_idx(str(_write(tmp_path / "ok.gz", good))).shape == (2, 3)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_edm_zip_rejects_unsafe_entries(tmp_path):
    """Zip datasets with an absolute path or a '..' entry are refused as a whole (naming the
    entry), before any image is decoded; a bad dataset.json or a missing label is one line."""
    png = _png(np.zeros((8, 8, 3), np.uint8))
    for bad in ("../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png"):
        path = tmp_path / "bad.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("00000/img00000000.png", png)
            zf.writestr(bad, png)
        expect_usage_error(lambda: load_dataset(str(path)), "bad.zip", "unsafe entry", bad)
    path = tmp_path / "labels.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", png)
        zf.writestr("b.png", png)
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 1]]}))
    expect_usage_error(lambda: load_dataset(str(path), class_cond=True), "labels.zip", "b.png")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", png)
        zf.writestr("dataset.json", "{not json")
    expect_usage_error(lambda: load_dataset(str(path)), "dataset.json", "invalid JSON")


# ----------------------------------------------------------------------------- configs
@pytest.fixture(scope="module")
def model_dir(workdir):
    from gaussdiff.training.trainer import Trainer
    Trainer(_opts(workdir / "data.npz", steps=1), str(workdir / "model"), device="cpu",
            progress=False).run()
    return workdir / "model"


def _edited(model_dir, dest, edit):
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("name,edit,mentions", [
    ("unknown", lambda c: c["model"].update(colour="blue"), ["unknown model config keys", "colour"]),
    ("type", lambda c: c["model"].update(model_channels="32"), ["model_channels", "integer"]),
    ("range", lambda c: c["model"].update(num_res_blocks=0), ["num_res_blocks"]),
    ("heads", lambda c: c["model"].update(num_heads=0), ["num_heads"]),
    ("steps", lambda c: c["diffusion"].update(steps=-5), ["steps"]),
    ("schedule", lambda c: c["diffusion"].update(schedule="quadratic"), ["schedule"]),
    ("lambda", lambda c: c["diffusion"].update(hybrid_lambda=float("nan")), ["hybrid_lambda"]),
    ("dkey", lambda c: c["diffusion"].update(gamma=1), ["unknown keys", "gamma"]),
    ("data", lambda c: c["data"].update(channels=3), ["channels"]),
    ("section", lambda c: c.update(model=[1, 2]), ["model"]),
    ("weights", lambda c: c["model"].update(model_channels=64), ["safetensors", "do not match"]),
])
def test_bad_config_is_one_line(model_dir, tmp_path, name, edit, mentions):
    """Unknown keys, wrong types, out-of-range values and config/weights mismatches in a model
    directory: gaussdiff.load raises one line naming config.json (or the weights file)."""
    d = _edited(model_dir, tmp_path / name, edit)
    line = expect_usage_error(lambda: gaussdiff.load(str(d), device="cpu"), *mentions)
    assert ("config.json" in line) or ("safetensors" in line)


def test_bad_config_and_flags_exit_2_from_the_cli(model_dir, workdir, tmp_path, capsys):
    """The CLI turns a bad config.json and out-of-range flags into exit status 2 and one line."""
    d = _edited(model_dir, tmp_path / "cfg", lambda c: c["model"].update(dropout="high"))
    assert main(["sample", str(d), "--num", "2", "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "config.json", "dropout")
    for flag, value in (("--save-every", "0"), ("--keep", "-1"), ("--max-bad-steps", "-2"),
                        ("--num-heads", "0"), ("--log-every", "0")):
        code = main(["train", "--data", str(workdir / "data.npz"), "--out", str(tmp_path / "t"),
                     "--steps", "1", *TINY, flag, value])
        assert code == 2
        one_line(capsys.readouterr().err, flag)
        assert not (tmp_path / "t" / "checkpoints").exists()


# ----------------------------------------------------------------------------- properties
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40)
                    | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
FIELDS = [f for f in UNetConfig().to_dict()]


@HYPOTHESIS
@given(st.dictionaries(st.sampled_from(FIELDS + ["extra", ""]), JSON, max_size=6))
def test_property_unet_config_parser(d):
    """UNetConfig.from_dict on any JSON object: a UsageError, or a config whose to_dict()
    parses back to the same config (no other exception, whatever the keys, types, values)."""
    try:
        c = UNetConfig.from_dict(d)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert UNetConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@HYPOTHESIS
@given(section=st.sampled_from(["model", "diffusion", "data", "precond", "training", None]),
       key=st.sampled_from(FIELDS + ["steps", "schedule", "var_type", "hybrid_lambda", "channels",
                                     "type", "sigma_data", "image_size", "x"]),
       value=JSON)
def test_property_read_config(model_dir, section, key, value):
    """read_config (and load) on a valid config.json with one entry replaced by any JSON value:
    a config, or a one-line UsageError; never another exception."""
    import tempfile
    from gaussdiff.modeldir import read_config
    cfg = json.loads((model_dir / "config.json").read_text())
    if section is None:
        cfg[key] = value
    else:
        cfg[section] = dict(cfg.get(section) or {}, **{key: value})
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        try:
            read_config(d)
        except UsageError as e:
            assert "\n" not in str(e)


@HYPOTHESIS
@given(st.one_of(st.binary(max_size=80),
                 st.builds(lambda dims, code, extra: _idx(dims, bytes(min(math.prod(dims), 64)) + extra, code),
                           st.lists(st.integers(0, 2 ** 32 - 1), min_size=0, max_size=4),
                           st.sampled_from([0x08, 0x08, 0x09, 0x0D]), st.binary(max_size=4))))
@example(b"\x00\x00\x08\x03\x00\x00\x00\x00\xa8\x00\x00\x00\xc3\x0c1\x00")   # 0 x 2.8e9 x 3.3e9
def test_property_read_idx(data):
    """read_idx on any bytes: an array whose size is what the header promises, or a UsageError
    (found by this test in CI: an empty array whose other sides overflow made numpy raise)."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".idx", delete=False) as f:
        f.write(data)
    try:
        arr = read_idx(f.name)
        assert arr.dtype == np.uint8 and arr.size == len(data) - 4 - 4 * arr.ndim
    except UsageError as e:
        assert "\n" not in str(e)
    finally:
        os.unlink(f.name)


@HYPOTHESIS
@given(st.dictionaries(st.sampled_from(["arr_0", "arr_1", "x"]),
                       st.builds(lambda shape, dtype: np.zeros(shape, dtype),
                                 st.lists(st.integers(0, 4), max_size=5),
                                 st.sampled_from([np.uint8, np.int64, np.float32, np.bool_, np.int8])),
                       max_size=3))
def test_property_load_npz(arrays):
    """load_npz on any arrays under any keys: uint8 NHWC images (1 or 3 channels) with int64
    labels, or a UsageError."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.npz")
        np.savez(path, **arrays)
        try:
            ds = load_npz(path)
        except UsageError as e:
            assert "\n" not in str(e)
            return
    assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and ds.images.shape[-1] in (1, 3)
    assert ds.labels is None or (ds.labels.dtype == np.int64 and len(ds.labels) == len(ds.images))


@HYPOTHESIS
@given(st.binary(max_size=200), st.sampled_from([None, 1, 3]), st.sampled_from([None, 4]))
def test_property_read_image(data, channels, size):
    """read_image on any bytes: a uint8 [H, W, C] array or a UsageError."""
    try:
        arr = read_image(io.BytesIO(data), channels, size, name="x.png")
    except UsageError as e:
        assert "\n" not in str(e) and "x.png" in str(e)
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3


def _mutations(data: bytes, n: int, seed: int):
    """n random mutations of `data`: byte flips, truncations, insertions, chunk duplications."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:
            for i in rng.integers(0, len(b), rng.integers(1, 9)):
                b[i] = rng.integers(256)
        elif kind == 1:
            del b[rng.integers(0, len(b)):]
        elif kind == 2:
            i = rng.integers(0, len(b))
            b[i:i] = rng.integers(0, 256, rng.integers(1, 16), dtype=np.uint8).tobytes()
        else:
            i, j = sorted(rng.integers(0, len(b), 2))
            b[j:j] = b[i:j]
        yield bytes(b)


def test_fuzz_image_and_idx_readers(tmp_path):
    """300 random mutations each of a valid PNG (RGB and 16-bit grey), a raw IDX file and a
    gzipped one: every read returns an image / array or raises UsageError, nothing else."""
    rng = np.random.default_rng(0)
    pngs = [_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
            _png((rng.integers(0, 256, (6, 6)) * 257).astype(np.uint16))]
    outcomes = {"ok": 0, "error": 0}
    for k, png in enumerate(pngs):
        for data in _mutations(png, 150, k):
            try:
                read_image(io.BytesIO(data), 3, 8)
                outcomes["ok"] += 1
            except UsageError:
                outcomes["error"] += 1
    raw = _idx((3, 4, 4), rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
    for k, (name, base) in enumerate([("f.idx", raw), ("f.idx.gz", gzip.compress(raw))]):
        for data in _mutations(base, 150, 10 + k):
            (tmp_path / name).write_bytes(data)
            try:
                read_idx(str(tmp_path / name))
                outcomes["ok"] += 1
            except UsageError:
                outcomes["error"] += 1
    assert sum(outcomes.values()) == 600 and outcomes["error"] > 100 and outcomes["ok"] > 10


# ----------------------------------------------------------------------------- security
def _calls(tree):
    """(dotted name, keywords) of every call in a module."""
    import ast
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            parts.append(f.id if isinstance(f, ast.Name) else "<expr>")
            yield ".".join(reversed(parts)), {k.arg: k.value for k in node.keywords}, node.lineno


def test_nothing_read_can_execute_code():
    """The package's syntax tree: no pickle module; every torch.load passes weights_only=True;
    no np.load with allow_pickle=True; no shell, os.system, eval or exec; no archive
    extraction; the one TorchScript load is the sha1-verified FID network's."""
    import ast
    root = os.path.dirname(gaussdiff.__file__)
    problems = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path, encoding="utf-8").read())
            rel = os.path.relpath(path, root)
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports {names}")
            for name, kw, line in _calls(tree):
                where = f"{rel}:{line}: {name}"
                true = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value is True  # noqa
                if name == "torch.load" and not true("weights_only"):
                    problems.append(f"{where} without weights_only=True")
                if name.endswith("load") and name.split(".")[0] in ("np", "numpy") and "allow_pickle" in kw \
                        and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                    problems.append(f"{where} with allow_pickle")
                if "shell" in kw or name in ("os.system", "os.popen", "eval", "exec") \
                        or name.endswith("extractall") \
                        or (name.endswith(".extract") and re.search("zip|tar", name, re.I)):
                    problems.append(where)
                if name == "torch.jit.load" and rel != os.path.join("metrics", "inception.py"):
                    problems.append(where)
    assert not problems, problems


def test_dataset_file_names_never_reach_a_shell(tmp_path, monkeypatch):
    """Image files named like shell commands are read as plain files: loading a folder and
    writing it in EDM's layout start no process."""
    import subprocess as sp
    def forbidden(*a, **k):
        raise AssertionError("a process was started")
    for fn in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(sp, fn, forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(["$(touch pwned).png", "a; rm -rf x.png", "`id`.png", "b|c&d.png"]):
        (folder / name).write_bytes(_png(np.full((8, 8, 3), i, np.uint8)))
    ds = load_dataset(str(folder))
    assert len(ds) == 4
    from gaussdiff.data.edm import write_edm
    write_edm(ds, str(tmp_path / "out.zip"))
    assert not (tmp_path / "pwned").exists() and len(load_dataset(str(tmp_path / "out.zip"))) == 4

"""End-to-end `gaussdiff train | sample` on a tiny config, run as a user runs it (a subprocess).

Each CLI run costs a Python + torch start-up, so the runs are shared: one trained model directory
serves the resume, sampling and model-directory error tests.
"""
import json
import os
import shutil

import numpy as np
import pytest

from cli_helpers import TINY, data_dir, log_records, run_cli

def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def assert_usage_error(proc, *mentions):
    """Exit status 2, no traceback, exactly one line on stderr that names what was wrong."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for m in mentions:
        assert m in lines[0], (m, lines[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return data_dir(tmp_path_factory, "cli")


@pytest.fixture(scope="module")
def trained(workdir):
    """An uninterrupted 4-step run (hybrid loss, dropout, flips, warm-up, two EMA rates)."""
    ok(run_cli("train", "--data", "data.npz", "--out", "full", "--steps", 4, *TINY, cwd=workdir))
    return workdir / "full"


WEIGHT_FILES = ("model.safetensors", "ema_0.9.safetensors", "ema_0.99.safetensors", "state.safetensors")


def test_train_writes_model_directory(trained):
    """train writes config.json (model, diffusion and data sections) + safetensors weights, and
    logs every step."""
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"]["out_channels"] == 2 and cfg["model"]["in_channels"] == 1   # learned σ: 2C
    assert cfg["diffusion"]["var_type"] == "learned_range" and cfg["diffusion"]["steps"] == 50
    assert cfg["data"]["image_size"] == 8 and cfg["data"]["channels"] == 1
    assert json.loads((trained / "state.json").read_text())["step"] == 4
    for f in WEIGHT_FILES:
        assert (trained / f).stat().st_size > 0
    log = log_records(trained)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["vb"]) for r in log)


def test_resume_equals_uninterrupted_run(trained, workdir):
    """2 steps, then --resume to 4 steps, writes byte-identical weights, EMA and optimizer/RNG state
    to the uninterrupted 4-step run (data order, flips, dropout, timesteps and noise included)."""
    ok(run_cli("train", "--data", "data.npz", "--out", "split", "--steps", 2, *TINY, cwd=workdir))
    half = (workdir / "split" / "model.safetensors").read_bytes()
    assert half != (trained / "model.safetensors").read_bytes()
    ok(run_cli("train", "--data", "data.npz", "--out", "split", "--steps", 4, "--resume", *TINY, cwd=workdir))
    for f in WEIGHT_FILES:
        assert (workdir / "split" / f).read_bytes() == (trained / f).read_bytes(), f


def test_sample_npz_and_grid_same_seed_same_images(trained, workdir):
    """sample writes an ADM-compatible .npz (uint8 NHWC under arr_0) and a PNG grid; the same seed
    gives the same images with another batch size."""
    from PIL import Image
    ok(run_cli("sample", trained, "--num", 5, "--steps", 5, "--seed", 3, "--batch-size", 5,
               "--out", "a.npz", "--grid", "a.png", "--no-progress", cwd=workdir))
    ok(run_cli("sample", trained, "--num", 5, "--steps", 5, "--seed", 3, "--batch-size", 2,
               "--sampler", "ddim", "--out", "b.npz", "--no-progress", cwd=workdir))
    with np.load(workdir / "a.npz", allow_pickle=False) as f:
        assert list(f.keys()) == ["arr_0"]
        a = f["arr_0"]
    with np.load(workdir / "b.npz", allow_pickle=False) as f:
        b = f["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert len({im.tobytes() for im in a}) == 5
    with Image.open(workdir / "a.png") as im:
        im.load()
        assert im.format == "PNG" and im.mode == "L"
        assert im.size[0] > 2 * 8 and im.size[1] > 8


# --------------------------------------------------------------------------------- bad input
def test_unknown_dataset(workdir):
    """An unknown dataset name: exit 2, one line naming it, no run directory created."""
    proc = run_cli("train", "--data", "no-such-dataset", "--out", "bad1", "--steps", 1, *TINY, cwd=workdir)
    assert_usage_error(proc, "no-such-dataset")
    assert not (workdir / "bad1").exists()


def test_missing_dataset_file(workdir):
    """A dataset path that does not exist: exit 2, one line naming the file."""
    proc = run_cli("train", "--data", "missing.npz", "--out", "bad2", "--steps", 1, *TINY, cwd=workdir)
    assert_usage_error(proc, "missing.npz")
    assert not (workdir / "bad2").exists()


def test_corrupt_image_in_folder(workdir):
    """One corrupt file in an image folder: exit 2, one line naming that file."""
    from PIL import Image
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    proc = run_cli("train", "--data", folder, "--out", "bad3", "--steps", 1, *TINY, cwd=workdir)
    assert_usage_error(proc, "broken.png")
    assert not (workdir / "bad3").exists()


def test_wrong_channel_count(workdir):
    """--channels 3 for a 1-channel dataset: exit 2, one line about the channel count."""
    proc = run_cli("train", "--data", "data.npz", "--channels", 3, "--out", "bad4", "--steps", 1, *TINY,
                   cwd=workdir)
    assert_usage_error(proc, "channels")
    assert not (workdir / "bad4").exists()


def test_unknown_choice_is_rejected_by_argparse(workdir):
    """argparse's own errors exit with status 2 too; its message (after the usage lines) is a
    single line naming the option."""
    proc = run_cli("train", "--data", "data.npz", "--out", "bad5", "--schedule", "quadratic", cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--schedule" in last and "quadratic" in last
    assert not (workdir / "bad5").exists()


def test_unknown_respacing_value(trained, workdir):
    """An option value the parser cannot check (--steps ddimX): exit 2, one line naming it, no
    output file."""
    proc = run_cli("sample", trained, "--steps", "ddimX", "--num", 2, "--out", "bad6.npz",
                   "--no-progress", cwd=workdir)
    assert_usage_error(proc, "ddimX")
    assert not (workdir / "bad6.npz").exists()


def _copy_model(trained, dest, edit):
    shutil.copytree(trained, dest)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_incompatible_format_version(trained, workdir):
    """A model directory written by an incompatible format version: exit 2, one line naming
    config.json and the version; neither --out nor --grid is written."""
    model = _copy_model(trained, workdir / "future", lambda c: c.update(format_version=99))
    proc = run_cli("sample", model, "--num", 2, "--out", "bad7.npz", "--grid", "bad7.png", cwd=workdir)
    assert_usage_error(proc, "config.json", "99")
    assert not (workdir / "bad7.npz").exists() and not (workdir / "bad7.png").exists()


def test_weights_not_matching_config(trained, workdir):
    """Weights that do not fit config.json (model_channels changed): exit 2, one line naming the
    weights file; nothing written."""
    model = _copy_model(trained, workdir / "mismatch", lambda c: c["model"].update(model_channels=64))
    proc = run_cli("sample", model, "--num", 2, "--out", "bad8.npz", cwd=workdir)
    assert_usage_error(proc, "safetensors", "config.json")
    assert not (workdir / "bad8.npz").exists()
    assert sorted(os.listdir(workdir / "mismatch")) == sorted(os.listdir(trained))   # nothing half-written

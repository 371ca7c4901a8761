"""`train --tensorboard`: the event files hold what log.jsonl holds, the sample grids, and each
step once after a resume; the gradient norm it logs is the norm of the gradients the optimizer
used (before clipping)."""
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from cli_helpers import TINY, data_dir, log_records, run_cli  # noqa: E402
from gaussdiff.training.trainer import DEFAULTS, Trainer  # noqa: E402

RUN = ["--data", "data.npz", "--steps", "4", *TINY, "--sample-every", "2", "--sample-num", "4",
       "--sample-steps", "2"]


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return data_dir(tmp_path_factory, "tensorboard")


@pytest.fixture(scope="module")
def run(workdir):
    r = run_cli("train", *RUN, "--out", "run", "--tensorboard", cwd=workdir)
    assert r.returncode == 0, r.stderr
    return workdir / "run"


def test_scalars_are_the_log_records(run):
    acc = events(run / "tensorboard")
    records = log_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "mse", "vb", "lr", "grad_norm", "images_per_s", "bad_steps"):
        got = acc.Scalars(f"train/{key}")
        assert [e.step for e in got] == [1, 2, 3, 4], key
        # event files hold float32
        np.testing.assert_allclose([e.value for e in got], [r[key] for r in records], rtol=1e-6,
                                   err_msg=key)


def test_sample_grids_are_images_at_their_steps(run):
    acc = events(run / "tensorboard")
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [2, 4]
    # 4 images of 8x8 in a 2x2 grid with 2-pixel padding: 2·(8+2)+2 = 22 pixels a side
    assert (grids[0].width, grids[0].height) == (22, 22)


def test_resume_shows_each_step_once(workdir, run):
    """A run stopped after step 4 whose last checkpoint is step 2 redoes steps 3 and 4: the
    events the stopped run wrote for them are purged."""
    resumed = workdir / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step0000004")
    r = run_cli("train", *RUN, "--out", "resumed", "--resume", cwd=workdir)   # --tensorboard inherited
    assert r.returncode == 0, r.stderr
    acc = events(resumed / "tensorboard")
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [g.step for g in acc.Images("samples")] == [2, 4]
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/loss")],
                               [r["loss"] for r in log_records(resumed)], rtol=1e-6)


def test_a_file_as_directory_is_refused_before_anything_is_written(workdir):
    (workdir / "afile").write_text("x")
    r = run_cli("train", *RUN, "--out", "refused", "--tensorboard", "afile", cwd=workdir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tensorboard afile" in lines[0], r.stderr
    assert not (workdir / "refused").exists()


def test_missing_package_is_a_one_line_error(workdir, monkeypatch):
    import importlib.util
    from gaussdiff.errors import UsageError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UsageError, match="pip install tensorboard"):
        Trainer(_opts(workdir, tensorboard=True), str(workdir / "nopkg"), device="cpu", progress=False)


def _opts(workdir, **kw):
    o = dict(DEFAULTS)
    o.update(data=str(workdir / "data.npz"), model_channels=32, channel_mult="1", num_res_blocks=1,
             attention_resolutions="0", diffusion_steps=50, batch_size=8, lr=1e-3, ema="0.9",
             sample_every=0, log_every=1, seed=0, steps=2)
    o.update(kw)
    return o


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_norm_is_the_norm_of_the_gradients_before_clipping(workdir, tmp_path, clip):
    """‖g‖ = sqrt(Σ g²) over every parameter's gradient, in float64; with --grad-clip c below
    it, the gradients the optimizer used have norm c while the logged norm is the unclipped one."""
    tr = Trainer(_opts(workdir, grad_clip=clip), str(tmp_path / "run"), device="cpu", progress=False)
    captured = {}
    step = tr.opt.step

    def spy(*a, **k):   # the gradients as the optimizer sees them
        captured["norm"] = float(torch.sqrt(sum((p.grad.double() ** 2).sum()
                                                for p in tr.model.parameters() if p.grad is not None)))
        return step(*a, **k)
    tr.opt.step = spy
    out = tr.train_step()
    logged = float(out["grad_norm"])
    if clip:
        assert logged > 10 * clip
        assert captured["norm"] == pytest.approx(clip, rel=1e-5)
    else:
        assert logged == pytest.approx(captured["norm"], rel=1e-6)


def test_without_the_option_nothing_is_written(workdir):
    r = run_cli("train", *RUN, "--out", "plain", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert not (workdir / "plain" / "tensorboard").exists()
    assert "grad_norm" in log_records(workdir / "plain")[0]


def test_training_time_evaluation_is_under_eval(tmp_path):
    """An --eval-every record (evaluation.py's keys eval_<metric>, eval_nfe, eval_seconds) goes
    to eval/<metric>; non-numbers and the step are not scalars."""
    from gaussdiff.training.tensorboard import TensorBoardLog
    tb = TensorBoardLog(str(tmp_path))
    tb.record({"step": 6, "eval_fid": 12.5, "eval_nfe": 35, "eval_seconds": 1.25, "note": "x",
               "flag": True})
    tb.close()
    acc = events(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["eval/fid", "eval/nfe", "eval/seconds"]
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(6, 12.5)]

"""`gaussdiff sweep` (metric against NFE per sampler) and `gaussdiff train --eval-every` (sample
metrics in log.jsonl), on a tiny model and a tiny feature net, in-process."""
import csv
import json
import os

import numpy as np
import pytest

from gaussdiff.cli import main

# a tiny discrete-time model: T = 20, 8 channels, one level, 8x8 greyscale
SMALL = ["--model-channels", "8", "--channel-mult", "1", "--num-res-blocks", "1",
         "--attention-resolutions", "0", "--norm-groups", "4", "--diffusion-steps", "20", "--schedule", "cosine",
         "--batch-size", "8", "--ema", "0.9", "--save-every", "100", "--sample-every", "0",
         "--log-every", "1", "--seed", "0", "--no-progress"]


def _labelled_npz(path, n=16, classes=4):
    """Images whose class decides a bright quadrant, labels under arr_1."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, 8, 8, 1))
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        x[i, r * 4:(r + 1) * 4, col * 4:(col + 1) * 4] += 180
    np.savez(path, x.clip(0, 255).astype(np.uint8), labels.astype(np.int64))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A labelled dataset, a 2-step model trained on it and a feature net named toy."""
    from gaussdiff.data import load_dataset
    from gaussdiff.metrics.classifier import save_feature_net, train_feature_classifier
    d = tmp_path_factory.mktemp("sweep")
    data = _labelled_npz(d / "data.npz")
    net = train_feature_classifier(load_dataset(data, class_cond=True), steps=3, batch_size=8,
                                   width=4, feature_dim=8, name="toy", progress=False)
    save_feature_net(net, str(d / "net"))
    assert main(["train", "--data", data, "--out", str(d / "model"), "--steps", "2", *SMALL]) == 0
    return dict(dir=d, data=data, net=str(d / "net"), model=str(d / "model"), cache=str(d / "cache"))


def _sweep(s, out, *extra):
    return main(["sweep", s["model"], "--metric", "fd", "--num", "4", "--ref", s["data"], "--out", str(out),
                 "--feature-net", s["net"], "--cache-dir", s["cache"], "--batch-size", "3",
                 "--no-progress", *extra])


def test_sweep_points_nfe_and_resume(setup, tmp_path, monkeypatch):
    """Each (sampler, NFE target) gets the most steps within the target (heun: N = (NFE+1)//2,
    recording its 2N - 1 evaluations), one CSV row per point with a finite fd; every point uses
    the same seeds; a rerun samples and scores nothing, and a lost .npz is redrawn identically."""
    import gaussdiff
    from gaussdiff.modeldir import Pipeline
    out = tmp_path / "sw"
    assert _sweep(setup, out, "--samplers", "ddim,heun", "--nfe", "2,4,5") == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["sampler", "steps", "nfe", "metric", "value", "num", "seconds"]
    points = {(r["sampler"], int(r["steps"])): int(r["nfe"]) for r in rows}
    # heun: targets 4 and 5 both give N = 2; ddim: one step per evaluation
    assert points == {("ddim", n): n for n in (2, 4, 5)} | {("heun", (t + 1) // 2): 2 * ((t + 1) // 2) - 1
                                                             for t in (2, 4, 5)}
    assert all(r["metric"] == "fd_toy" and np.isfinite(float(r["value"])) and r["num"] == "4" for r in rows)
    assert (out / "sweep.png").stat().st_size > 0
    # image i of every point comes from seed (0, i): the same as sampling the point alone
    pipe = gaussdiff.load(setup["model"], device="cpu")
    alone, _ = pipe.sample(2, "heun", 2, seed=0, batch_size=2, progress=False)
    with np.load(out / "samples_heun_3.npz") as f:
        first = f["arr_0"]
    assert first.shape == (4, 8, 8, 1) and first.dtype == np.uint8
    np.testing.assert_array_equal(first[:2], alone)

    files = sorted(out.glob("samples_*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    table = (out / "sweep.csv").read_text()

    def refuse(*a, **k):
        raise AssertionError("sampled or scored again")
    monkeypatch.setattr(Pipeline, "sample", refuse)
    monkeypatch.setattr("gaussdiff.metrics.sweep.evaluate", refuse)
    assert _sweep(setup, out, "--samplers", "ddim,heun", "--nfe", "2,4,5") == 0
    assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("samples_*.npz"))} == mtimes
    assert (out / "sweep.csv").read_text() == table
    monkeypatch.undo()

    calls = []
    real = Pipeline.sample
    monkeypatch.setattr(Pipeline, "sample", lambda self, num, sampler, steps, **k:
                        calls.append((sampler, steps)) or real(self, num, sampler, steps, **k))
    os.remove(out / "samples_heun_3.npz")   # as if interrupted before this point was written
    assert _sweep(setup, out, "--samplers", "ddim,heun", "--nfe", "2,4,5") == 0
    assert calls == [("heun", 2)]
    with np.load(out / "samples_heun_3.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], first)
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # another reference: the scores are recomputed, the samples reused
    calls.clear()
    assert _sweep(setup, out, "--samplers", "ddim,heun", "--nfe", "2,4,5", "--ref-num", "3") == 0
    assert calls == []
    with open(out / "sweep.csv") as f:
        again = list(csv.DictReader(f))
    assert len(again) == len(rows) and [r["value"] for r in again] != [r["value"] for r in rows]


@pytest.mark.parametrize("flags, mention", [
    (["--samplers", "ddim", "--nfe", "0"], "--nfe 0"),
    (["--samplers", "ddim", "--nfe", "25"], "T = 20"),          # more DDIM steps than T
    (["--samplers", "bogus", "--nfe", "4"], "bogus"),
    (["--samplers", "adaptive", "--nfe", "4"], "adaptive"),
])
def test_sweep_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, flags, mention):
    out = tmp_path / "never"
    assert _sweep(setup, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and mention in err[0], err
    assert not out.exists()


def _log(run):
    return [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]


def test_train_eval_every_logs_metrics_resumes_and_plots(setup, tmp_path):
    """--eval-every 2 over 5 steps logs eval_fd_toy at steps 2, 4 and 5 (the end), with the NFE
    of the default ddim:min(50, T); the training itself is unchanged by the evaluations;
    --resume keeps the eval options; `gaussdiff plot` draws the eval metric."""
    from gaussdiff.plot import plot_log
    run = str(tmp_path / "run")
    small = SMALL + ["--dropout", "0.1"]   # dropout draws from the global RNG: eval must not
    evals = ["--eval-every", "2", "--eval-samples", "4", "--eval-feature-net", setup["net"]]
    assert main(["train", "--data", setup["data"], "--out", run, "--steps", "5", *small, *evals]) == 0
    log = _log(run)
    ev = [r for r in log if "eval_fd_toy" in r]
    assert [r["step"] for r in ev] == [2, 4, 5]
    assert all(np.isfinite(r["eval_fd_toy"]) and r["eval_nfe"] == 20 and r["eval_seconds"] > 0 for r in ev)
    cfg = json.load(open(os.path.join(run, "config.json")))["training"]
    assert cfg["eval_every"] == 2 and cfg["eval_feature_net"] == os.path.abspath(setup["net"])

    plain = str(tmp_path / "plain")
    assert main(["train", "--data", setup["data"], "--out", plain, "--steps", "5", *small]) == 0
    assert [r["loss"] for r in _log(plain)] == [r["loss"] for r in log if "loss" in r]

    assert main(["train", "--data", setup["data"], "--out", run, "--steps", "6", "--resume", *small]) == 0
    assert [r["step"] for r in _log(run) if "eval_fd_toy" in r] == [2, 4, 5, 6]
    assert "eval_fd_toy" in plot_log(run, str(tmp_path / "curve.png"))
    assert main(["plot", run, "--out", str(tmp_path / "curve2.png")]) == 0


@pytest.mark.parametrize("flags, mention", [
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-every", "2", "--eval-metric", "fd"], "--eval-feature-net"),
    (["--eval-every", "2", "--eval-sampler", "ddim:30"], "T = 20"),
])
def test_train_bad_eval_options(setup, tmp_path, capsys, flags, mention):
    out = tmp_path / "never"
    assert main(["train", "--data", setup["data"], "--out", str(out), "--steps", "2", *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and mention in err[0], err
    assert not out.exists()


def test_train_eval_sigma_space_default_is_heun_18(setup, tmp_path):
    """A σ-space objective evaluates with heun, 18 steps by default: 2·18 - 1 = 35 NFE."""
    run = str(tmp_path / "edm")
    assert main(["train", "--data", setup["data"], "--out", run, "--steps", "1", "--objective", "edm",
                 *SMALL, "--eval-every", "1", "--eval-samples", "3", "--eval-feature-net", setup["net"]]) == 0
    ev = [r for r in _log(run) if "eval_fd_toy" in r]
    assert [(r["step"], r["eval_nfe"]) for r in ev] == [(1, 35)] and np.isfinite(ev[0]["eval_fd_toy"])


def test_tick_labels_never_crowd_and_heun_says_odd_nfe():
    """NFE 19 and 20 on one log axis keep one tick (labels would print as "1920"); heun's legend
    says it makes only odd NFE (N steps, 2N − 1 evaluations)."""
    from gaussdiff.metrics.sweep import _legend_label, thin_ticks
    assert thin_ticks([20, 19, 10, 9, 35, 50, 100]) == [9, 19, 35, 50, 100]
    ticks = thin_ticks(range(1, 200))
    assert all(b / a >= 1.15 for a, b in zip(ticks, ticks[1:]))
    assert "odd" in _legend_label("heun") and _legend_label("dpmpp_2m") == "dpmpp_2m"

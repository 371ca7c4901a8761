"""Ensembles by timestep range (gaussdiff.sampling.ensemble, `--ensemble MODEL_A:MODEL_B:K`):
per-row dispatch, identity with the single model, and the user errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import gaussdiff
from gaussdiff.cli import main
from gaussdiff.sampling.ensemble import TimestepEnsemble, load_ensemble, parse_ensemble_spec
from gaussdiff.errors import UsageError
from gaussdiff.modeldir import CONFIG_NAME, atomic_write_json, read_config

from guided_models import T, make_model_dir


class Toy(nn.Module):
    """out = a·x + t + 100·y: each row's output shows which model, timestep and label it got."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.calls = 0

    def forward(self, x, t, y=None, scale=1.0):
        self.calls += 1
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = self.a * x + t.to(x.dtype).reshape(shape)
        return scale * (out if y is None else out + 100 * y.to(x.dtype).reshape(shape))


@pytest.mark.parametrize("t_dtype", [torch.long, torch.float64])
def test_wrapper_dispatches_per_row(t_dtype):
    """Rows with K <= t <= T-1-K get model A, the others model B, in a mixed batch, with the
    row's own label; a batch inside one range is one call of one model."""
    A, B = Toy(1.0), Toy(-2.0)
    ens = TimestepEnsemble(A, B, K=3, T=10)
    t = torch.tensor([0, 2, 3, 5, 6, 7, 9, 2.5], dtype=t_dtype)
    x = torch.randn(len(t), 1, 2, 2, dtype=torch.float64)
    y = torch.arange(len(t))
    out = ens(x, t, y=y, scale=2.0)
    for i in range(len(t)):
        model = A if 3 <= float(t[i]) <= 6 else B
        ref = model(x[i:i + 1], t[i:i + 1], y=y[i:i + 1], scale=2.0)
        assert torch.equal(out[i:i + 1], ref), i
    A.calls = B.calls = 0
    ens(x, torch.full((len(t),), 4, dtype=t_dtype))
    assert (A.calls, B.calls) == (1, 0)
    ens(x, torch.full((len(t),), 9, dtype=t_dtype))
    assert (A.calls, B.calls) == (1, 1)


def test_wrapper_matches_unets_per_row(tmp_path):
    """With two different UNets, a mixed batch gives model A's output on the rows in range and
    model B's elsewhere (float32 networks: to rounding)."""
    pa = gaussdiff.load(make_model_dir(tmp_path / "a", num_classes=None, seed=0), device="cpu")
    pb = gaussdiff.load(make_model_dir(tmp_path / "b", num_classes=None, seed=7), device="cpu")
    ens = TimestepEnsemble(pa.model, pb.model, K=10, T=T)
    t = torch.tensor([0, 9, 10, 50, 89, 90, 99])
    x = torch.randn(len(t), 1, 8, 8)
    with torch.no_grad():
        out = ens(x, t)
        for i, ti in enumerate(t.tolist()):
            model = pa.model if 10 <= ti <= 89 else pb.model
            torch.testing.assert_close(out[i:i + 1], model(x[i:i + 1], t[i:i + 1]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pa.model(x[:1], t[:1]), pb.model(x[:1], t[:1]))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = root / "d.npz"
    np.savez(data, np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    return dict(root=root, a=make_model_dir(root / "a", num_classes=None, seed=0),
                b=make_model_dir(root / "b", num_classes=None, seed=7), data=str(data))


@pytest.mark.parametrize("sampler, steps", [("ddim", "5"), ("ddpm", "4"), ("heun", "2")])
def test_self_ensemble_samples_bit_identical(dirs, sampler, steps):
    """`sample --ensemble A:A:K` draws exactly the single model's images (discrete samplers,
    respaced, and a σ-space sampler through DiscreteDenoiser); A:B:K differs from both."""
    root, a, b = dirs["root"], dirs["a"], dirs["b"]
    common = ["--num", "3", "--sampler", sampler, "--steps", steps, "--seed", "2", "--no-progress"]
    outs = {}
    for name, src in [("single", [a]), ("self", ["--ensemble", f"{a}:{a}:20"]),
                      ("mixed", ["--ensemble", f"{a}:{b}:20"])]:
        path = root / f"{sampler}_{name}.npz"
        assert main(["sample", *src, *common, "--out", str(path)]) == 0
        outs[name] = np.load(path)["arr_0"]
    assert np.array_equal(outs["single"], outs["self"])
    assert not np.array_equal(outs["single"], outs["mixed"])


def test_self_ensemble_nll_bit_identical(dirs, capsys, tmp_path):
    """`nll --ensemble A:A:K` (VLB on 5 respaced steps, and the ODE with 1 Heun step) gives the
    single model's per-image values exactly; the JSON names the ensemble."""
    a, data = dirs["a"], dirs["data"]
    out = str(tmp_path / "nll.json")
    for extra in (["--steps", "5"], ["--ode", "--steps", "1"]):
        common = ["--data", data, "--num", "2", "--no-progress", "--out", out, *extra]
        assert main(["nll", a, *common]) == 0
        single = json.load(open(out))
        assert main(["nll", "--ensemble", f"{a}:{a}:30", *common]) == 0
        ens = json.load(open(out))
        assert ens["per_image"] == single["per_image"]
        assert ens["ensemble"]["K"] == 30 and "model" not in ens


def test_spec_parsing(tmp_path):
    """The last ':' field is K; paths with ':' split where both sides are directories."""
    assert parse_ensemble_spec("x/a:y/b:7") == ("x/a", "y/b", 7)
    (tmp_path / "p:1").mkdir()
    (tmp_path / "q").mkdir()
    spec = f"{tmp_path}/p:1:{tmp_path}/q:3"
    assert parse_ensemble_spec(spec) == (f"{tmp_path}/p:1", f"{tmp_path}/q", 3)
    for bad in ("a:b", "a:b:x", "a::3", "a:b:c:3"):
        with pytest.raises(UsageError):
            parse_ensemble_spec(bad)


def _variant(dirs, name, **change):
    """A copy of model A's directory with config.json sections changed."""
    import shutil
    path = dirs["root"] / name
    if not path.exists():
        shutil.copytree(dirs["a"], path)
        cfg = read_config(str(path))
        for section, values in change.items():
            cfg[section] = dict(cfg.get(section, {}), **values)
        atomic_write_json(str(path / CONFIG_NAME), cfg)
    return str(path)


@pytest.mark.parametrize("change, message", [
    (dict(diffusion={"schedule": "cosine"}), "diffusion schedule"),
    (dict(diffusion={"var_type": "learned"}), "diffusion var_type"),
    (dict(diffusion={"mean_type": "x0"}), "diffusion mean_type"),
    (dict(precond={"type": "edm", "sigma_data": 0.5}), "σ-space"),
])
def test_mismatched_models_exit_2(dirs, capsys, change, message):
    other = _variant(dirs, "v_" + message.split()[-1].replace("σ-", "s"), **change)
    for cmd in (["sample", "--out", str(dirs["root"] / "x.npz")], ["nll", "--data", dirs["data"]]):
        assert main([*cmd, "--ensemble", f"{dirs['a']}:{other}:10", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_mismatched_steps_and_classes_exit_2(dirs, capsys):
    """Different T and different class conditioning are named."""
    cond = make_model_dir(dirs["root"] / "cond", num_classes=3)
    assert main(["nll", "--ensemble", f"{dirs['a']}:{cond}:10", "--data", dirs["data"]]) == 2
    assert "num_classes" in capsys.readouterr().err
    with pytest.raises(UsageError, match="diffusion steps"):
        pipe_steps = _variant(dirs, "v_steps", diffusion={"steps": 50})
        load_ensemble(f"{dirs['a']}:{pipe_steps}:10", device="cpu")


@pytest.mark.parametrize("K", ["-1", "50", "70"])
def test_bad_K_exit_2(dirs, capsys, K):
    """K must lie in [0, T/2): T = 100 allows 0..49 (K = 49 leaves A the steps 49 and 50)."""
    spec = f"{dirs['a']}:{dirs['a']}:{K}"
    assert main(["sample", "--ensemble", spec, "--out", str(dirs["root"] / "k.npz"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "K = " in err and len(err.strip().splitlines()) == 1
    load_ensemble(f"{dirs['a']}:{dirs['a']}:49", device="cpu")


def test_model_and_ensemble_together_exit_2(dirs, capsys):
    spec = f"{dirs['a']}:{dirs['a']}:10"
    assert main(["sample", dirs["a"], "--ensemble", spec, "--out", str(dirs["root"] / "y.npz")]) == 2
    assert main(["nll", dirs["a"], "--ensemble", spec, "--data", dirs["data"]]) == 2
    assert main(["nll", "--data", dirs["data"]]) == 2
    assert capsys.readouterr().err.count("--ensemble MODEL_A:MODEL_B:K") == 3

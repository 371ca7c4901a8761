"""Installed like any PyTorch library: a wheel built by `python -m build` from the sources,
installed by pip in a fresh venv that holds only torch, gives a working `gaussdiff` command and
library, with no Makefile and no source tree (so the wheel's metadata declares every runtime
dependency), and samples the same images as the development install."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("build")


def run(*cmd, cwd, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_the_wheel_works_in_a_fresh_venv(tmp_path):
    src = tmp_path / "src"   # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    shutil.copytree(os.path.join(ROOT, "gaussdiff"), src / "gaussdiff",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", src,
        cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("gaussdiff-*.whl")

    venv = tmp_path / "venv"
    run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv, cwd=tmp_path)
    pip, py = venv / "bin" / "pip", venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env['PATH']}")
    # torch as a user installs it first (the build this suite runs on), then the wheel alone
    run(pip, "install", "-q", f"torch=={torch.__version__}", cwd=tmp_path, env=env)
    run(pip, "install", "-q", wheel, cwd=tmp_path, env=env)

    where = run(py, "-c", "import gaussdiff, sys; print(gaussdiff.__file__)", cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout   # not the source tree
    helped = run(venv / "bin" / "gaussdiff", "--help", cwd=tmp_path, env=env)
    assert "sample" in helped.stdout and "train" in helped.stdout

    model = os.path.join(ROOT, "models", "fashion-small")
    args = ["sample", model, "--num", "2", "--sampler", "ddim", "--steps", "3", "--seed", "1",
            "--no-progress"]
    run(venv / "bin" / "gaussdiff", *args, "--out", tmp_path / "wheel.npz", cwd=tmp_path, env=env)
    run(sys.executable, "-m", "gaussdiff", *args, "--out", tmp_path / "dev.npz", cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    with np.load(tmp_path / "wheel.npz") as a, np.load(tmp_path / "dev.npz") as b:
        assert a["arr_0"].shape == (2, 28, 28, 1)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])

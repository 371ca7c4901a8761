"""`torchrun -m gaussdiff train | sample` with 2 CPU processes (gloo), against one process.

Every process draws the global batch's data, flips, timesteps and noise and keeps its rows,
so 2 processes with global batch B take the single-process step with batch B (up to the order
of float additions in the gradient average), the saved state is global and resumes with another
number of processes, and sampling gives the single-process images bit for bit.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1",
        "--attention-resolutions", "4", "--norm-groups", "8", "--diffusion-steps", "50",
        "--var-type", "learned_range", "--loss", "hybrid", "--flip", "true", "--batch-size", "8",
        "--lr", "1e-4", "--ema", "0.9", "--save-every", "2", "--sample-every", "0",
        "--log-every", "1", "--seed", "4", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(args, cwd, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    proc = subprocess.run([*launcher, "-m", "gaussdiff", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", rng.integers(0, 256, size=(20, 8, 8, 1), dtype=np.uint8))
    return d


@pytest.fixture(scope="module")
def single(workdir):
    """One process, global batch 8, 4 steps."""
    run(["train", "--data", "data.npz", "--out", "single", "--steps", 4, *TINY], workdir)
    return workdir / "single"


def assert_same_run(a, b, atol):
    """Weights and EMA within atol; the global data, generator and step state identical."""
    for f in ("model.safetensors", "ema_0.9.safetensors"):
        wa, wb = load_file(a / f), load_file(b / f)
        assert wa.keys() == wb.keys()
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst <= atol, (f, worst)
    sa, sb = load_file(a / "state.safetensors"), load_file(b / "state.safetensors")
    for k in ("data.perm", "data.pos", "data.rng", "rng.gen"):
        assert torch.equal(sa[k], sb[k]), k
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())


def test_two_processes_take_the_single_process_step(single, workdir):
    """torchrun with 2 processes and global batch 8 (4 rows each, DDP over gloo) ends 4 steps
    with the weights of 1 process with batch 8; rank 0 alone logs (one record per step)."""
    run(["train", "--data", "data.npz", "--out", "two", "--steps", 4, *TINY], workdir, nproc=2)
    assert_same_run(workdir / "two", single, atol=1e-6)
    log = [json.loads(line) for line in (workdir / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    single_log = [json.loads(line) for line in (single / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in single_log], rtol=1e-5)


def test_resume_with_another_number_of_processes(single, workdir):
    """2 steps in one process, then --resume to 4 steps with 2 processes (with microbatches of
    2): the 4-step single-process run, as the saved state is global."""
    run(["train", "--data", "data.npz", "--out", "switch", "--steps", 2, *TINY], workdir)
    run(["train", "--data", "data.npz", "--out", "switch", "--steps", 4, "--resume",
         "--microbatch", 2, *TINY], workdir, nproc=2)
    assert_same_run(workdir / "switch", single, atol=1e-6)


def test_distributed_sampling_equals_single_process(single, workdir):
    """torchrun sample: ranks draw indices 0-2 and 3-6, rank 0 gathers them into one .npz equal
    bit for bit to the single-process one (other batches: image i depends on (seed, i) only)."""
    common = ["sample", single, "--num-samples", 7, "--steps", 4, "--seed", 11, "--no-progress"]
    run([*common, "--batch-size", 4, "--out", "one.npz"], workdir)
    out = run([*common, "--batch-size", "auto", "--out", "two.npz", "--grid", "two.png"],
              workdir, nproc=2).stdout
    assert out.count("wrote") == 2   # rank 0 only
    with np.load(workdir / "one.npz") as a, np.load(workdir / "two.npz") as b:
        assert a["arr_0"].shape == (7, 8, 8, 1)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_distributed_eval_equals_single_process(workdir):
    """torchrun eval: each rank extracts features of its share of the images; the gathered
    features give the single-process metrics (fd, precision/recall in the net's space), and only
    rank 0 prints the JSON."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 48)
    images = rng.integers(0, 90, size=(48, 8, 8, 1)) + 120 * (labels[:, None, None, None] > 0)
    np.savez(workdir / "lab.npz", images.astype(np.uint8), labels)
    np.savez(workdir / "fake.npz", rng.integers(0, 256, size=(11, 8, 8, 1), dtype=np.uint8))
    run(["train-feature-net", "--data", "lab.npz", "--out", "fnet", "--steps", 3,
         "--batch-size", 8, "--name", "toy", "--no-progress"], workdir)
    common = ["eval", "fake.npz", "--ref", "lab.npz", "--ref-num", 13, "--metrics", "fd,prec,rec",
              "--space", "net", "--feature-net", "fnet", "--no-progress"]
    one = json.loads(run([*common, "--cache-dir", "c1"], workdir).stdout)
    out = run([*common, "--cache-dir", "c2"], workdir, nproc=2).stdout
    two = json.loads(out)   # one JSON document: rank 1 printed nothing
    assert set(one["metrics"]) == {"fd_toy", "precision_toy", "recall_toy"}
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-9), k

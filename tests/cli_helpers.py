"""Helpers shared by the tests that run `gaussdiff` as a user does (in a subprocess)."""
import json
import os
import subprocess
import sys

import numpy as np

# A tiny network and run: 32 channels, one level, no attention, 8x8 images, T = 50.
TINY = ["--model-channels", "32", "--channel-mult", "1", "--num-res-blocks", "1",
        "--attention-resolutions", "0", "--diffusion-steps", "50", "--batch-size", "12",
        "--var-type", "learned_range", "--loss", "hybrid", "--dropout", "0.1", "--flip", "true",
        "--warmup", "3", "--lr", "1e-3", "--ema", "0.9,0.99", "--save-every", "2",
        "--sample-every", "0", "--log-every", "1", "--seed", "5", "--no-progress"]


def cli_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def cli(*args, cwd, **popen):
    """Start `python -m gaussdiff ARGS` in `cwd` (one thread, as the tests are tiny)."""
    return subprocess.Popen([sys.executable, "-m", "gaussdiff", *map(str, args)], cwd=cwd,
                            env=cli_env(), **popen)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gaussdiff", *map(str, args)], cwd=cwd,
                          env=cli_env(), capture_output=True, text=True, timeout=300)


def make_npz(path, n=32, channels=1, seed=0):
    """A random uint8 NHWC dataset of n 8x8 images under arr_0."""
    rng = np.random.default_rng(seed)
    np.savez(path, rng.integers(0, 256, size=(n, 8, 8, channels), dtype=np.uint8))
    return path


def data_dir(tmp_path_factory, name: str):
    """A module's working directory holding data.npz (make_npz)."""
    d = tmp_path_factory.mktemp(name)
    make_npz(d / "data.npz")
    return d


def log_records(run):
    """The records of a run's log.jsonl."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

"""Training curves from a run's log.jsonl (matplotlib, headless)."""
from __future__ import annotations

import io
import json
import os

from .errors import UsageError
from .modeldir import atomic_write_bytes


def read_log(run_dir: str) -> list:
    path = os.path.join(run_dir, "log.jsonl") if os.path.isdir(run_dir) else run_dir
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"{path}: no training log found") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: corrupt log line ({e})") from None


def plot_log(run_dir: str, out: str, keys=("loss", "mse", "vb")):
    """Plot the logged losses against the step on log axes; write a PNG to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = read_log(run_dir)
    if not log:
        raise UsageError(f"{run_dir}: the training log is empty")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key in keys:
        pts = [(r["step"], r[key]) for r in log if key in r and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per-sample mean; vb in bits/dim x T/1000)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())

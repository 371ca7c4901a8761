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


def new_figure(panels: int = 1):
    """(figure, [axes]): `panels` stacked panels (matplotlib, headless)."""
    # lazy: matplotlib with pyplot costs ~600 ms at start-up (measured); optional (the plot extra)
    import matplotlib
    matplotlib.use("Agg")   # before pyplot: headless
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(max(panels, 1), 1, figsize=(6, 3.6 * max(panels, 1)), dpi=110, squeeze=False)
    return fig, list(axes[:, 0])


def save_figure(fig, out: str):
    """Write `fig` as a PNG to `out` atomically and close it."""
    import matplotlib.pyplot as plt   # lazy: ~600 ms at start-up (measured), as in new_figure
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


EVAL_EXTRA = ("eval_nfe", "eval_seconds")   # logged with the eval metrics, not metrics themselves


def plot_log(run_dir: str, out: str, keys=("loss", "mse", "vb")) -> list:
    """Plot the logged losses against the step on log axes and, in a second panel, the sample
    metrics logged by --eval-every (eval_*); write a PNG to `out`. Returns the keys plotted."""
    log = read_log(run_dir)
    if not log:
        raise UsageError(f"{run_dir}: the training log is empty")
    evals = sorted({k for r in log for k in r if k.startswith("eval_") and k not in EVAL_EXTRA})
    fig, axes = new_figure(2 if evals else 1)
    ax, plotted = axes[0], []
    for key in keys:
        pts = [(r["step"], r[key]) for r in log if key in r and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1.2)
            plotted.append(key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per-sample mean; vb in bits/dim x T/1000)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    for key in evals:
        pts = [(r["step"], r[key]) for r in log if key in r]
        axes[1].plot(*zip(*pts), marker="o", ms=3, label=key[len("eval_"):], lw=1.2)
        plotted.append(key)
    if evals:
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("sample metric (EMA weights)")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    save_figure(fig, out)
    return plotted

"""`train --tensorboard [DIR]`: the training log as TensorBoard event files, beside log.jsonl.

Every log.jsonl record becomes scalars at its step: the loss terms (loss, mse, vb and the loss
by quarter of the process) as train/<key>, the learning rate, gradient norm, loss scale (fp16),
images/s and skipped steps likewise, and the training-time evaluation (`--eval-every`) as
eval/<metric>. Each sample grid (`--sample-every`) is the image "samples" at its step. The files
are written by PyTorch's own writer (`torch.utils.tensorboard.SummaryWriter`, which needs the
`tensorboard` package: the `tensorboard` extra), on the main process only.

A resumed run starts its writer with purge_step = the checkpoint's step + 1: TensorBoard then
drops the events a stopped run had written after its last checkpoint, as `--resume` drops them from
log.jsonl, so each step is shown once.
"""
from __future__ import annotations

import importlib.util
import numbers
import os

import numpy as np

from ..errors import UsageError

DEFAULT_SUBDIR = "tensorboard"   # `--tensorboard` without a directory: OUT/tensorboard


def tensorboard_dir(option, out_dir: str):
    """The event directory of the --tensorboard option (True: OUT/tensorboard; a path; None or
    False: off)."""
    if option is None or option is False:
        return None
    if option is True:
        return os.path.join(out_dir, DEFAULT_SUBDIR)
    if not isinstance(option, str) or not option.strip():
        raise UsageError(f"--tensorboard takes a directory (or nothing, for OUT/{DEFAULT_SUBDIR}), "
                         f"got {option!r}")
    return option


def check_tensorboard(log_dir: str):
    """Set-up checks, before anything is written: the package is there, the path can be a
    directory."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or the extra: pip install 'gaussdiff[tensorboard]')")
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UsageError(f"--tensorboard {log_dir} is a file: give a directory")


class TensorBoardLog:
    """Writes log records and sample grids to event files in `log_dir` (checked first by
    `check_tensorboard`)."""

    def __init__(self, log_dir: str, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter   # lazy: optional, ~1 s to import
        # records are written at the step just taken: a run resumed at step s redoes s + 1, ...
        self.writer = SummaryWriter(log_dir, purge_step=resumed_at + 1 if resumed_at else None)

    def record(self, rec: dict):
        """A log.jsonl record: each number but the step as a scalar at rec["step"]."""
        step = int(rec["step"])
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def image(self, grid: np.ndarray, step: int, tag: str = "samples"):
        """A uint8 [H, W, C] grid (C = 1 or 3)."""
        if grid.shape[-1] == 1:
            grid = np.repeat(grid, 3, axis=-1)
        self.writer.add_image(tag, grid, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()

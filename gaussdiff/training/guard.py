"""The NaN/inf guard of the training loop.

A step whose loss or gradient holds a NaN or an infinity is skipped: no optimizer step, no EMA
update (the step still counts, its batch is used up, as in guided-diffusion's fp16 trainer,
whose loss scaler skips overflowing steps the same way). The skipped steps are counted in the
log; after `max_bad_steps` consecutive ones training stops with a one-line error (exit 2)
instead of running on with a broken model.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import UsageError


class TrainingDiverged(UsageError):
    """Too many consecutive non-finite steps."""


@torch.no_grad()
def all_finite(loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether the loss and every parameter's .grad are finite (one host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    checks = [torch.isfinite(loss).all()]
    if grads:
        # the norms of the gradients are finite iff every gradient entry is
        checks.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    return bool(torch.stack(checks).all())


class BadStepGuard:
    """Counts skipped steps; `update(finite, step)` raises TrainingDiverged after
    `max_bad_steps` consecutive non-finite steps (0: never stop)."""

    def __init__(self, max_bad_steps: int = 20):
        if max_bad_steps < 0:
            raise UsageError(f"--max-bad-steps must be >= 0, got {max_bad_steps}")
        self.max_bad_steps = int(max_bad_steps)
        self.consecutive = 0
        self.total = 0          # skipped steps since the run started (kept across --resume)
        self.since_log = 0      # skipped steps since the last log record

    def update(self, finite: bool, step: int, recoverable: bool = False):
        """Record step `step`. recoverable: a skipped step that does not count towards the
        stop (an fp16 overflow while the loss scale can still drop)."""
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.since_log += 1
        if recoverable:
            return
        self.consecutive += 1
        if self.max_bad_steps and self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.consecutive} consecutive steps had a "
                f"non-finite loss or gradient (skipped, {self.total} in all); the last checkpoint "
                f"is intact: resume it with a lower --lr or with --grad-clip, or raise --max-bad-steps")

    def take_log_count(self) -> int:
        n, self.since_log = self.since_log, 0
        return n

"""Mixed precision: fp16 with dynamic loss scaling, bf16 autocast, and fp32 (the default).

The network's parameters, the optimizer state and the EMA shadows stay float32 in every mode
(they are the "master weights" of Micikevicius et al. 2018); only the forward and backward
passes run in half precision, through `torch.autocast`. ADM trains in fp16 this way in spirit:
guided-diffusion keeps fp32 master copies and scales the loss dynamically (fp16_util.py).

fp16 gradients underflow unless the loss is scaled up first, and a too-large scale overflows.
`DynamicLossScaler` follows ADM's rule (Dhariwal & Nichol 2021, guided-diffusion
`MixedPrecisionTrainer`): start at 2^20; when a step's gradients hold inf or NaN, skip the
step (no optimizer or EMA update) and halve the scale; after `growth_interval` clean steps,
double it. guided-diffusion raises log2(scale) by 0.001 per clean step, i.e. a doubling per
1000 clean steps, the default here.

On a CPU, half precision is only fast where the CPU has instructions for it (oneDNN uses
AVX512-BF16 / AMX for bf16, AVX512-FP16 / AMX-FP16 for fp16); elsewhere it is emulated and far
slower than fp32. Measured with bench/throughput.py on a 2-core AMD EPYC with AVX512-BF16 and
no fp16 support: 512x512 matmuls ran at ~200 GFLOP/s in fp32, ~400 in bf16 and ~3 in fp16, and
a training step of Improved DDPM's CIFAR-10 network was 2.2x faster under bf16 autocast than
in fp32. So `resolve_precision` keeps a half precision the CPU supports natively and falls
back to fp32, with a warning, for one it does not, unless forced.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterable, Optional

import torch

from ..errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_supports(precision: str) -> bool:
    """Whether this CPU runs `precision` natively (oneDNN's check for AVX512-BF16 / AMX, or
    AVX512-FP16 / AMX-FP16); fp32 always."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(precision)
    if check is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def cpu_description() -> str:
    """The CPU as measured numbers name it: "AMD EPYC, AVX2, 2 cores" (model name from
    /proc/cpuinfo where there is one; the widest vector extension: AVX512-BF16, AVX-512, AVX2)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        found = re.search(r"model name\s*:\s*(.*)", info)
        name = found.group(1).strip() if found else name
        flags = re.search(r"flags\s*:\s*(.*)", info)
        flags = set(flags.group(1).split()) if flags else set()
        flags = next((label for flag, label in (("avx512_bf16", ", AVX512-BF16"), ("avx512f", ", AVX-512"),
                                                ("avx2", ", AVX2")) if flag in flags), "")
    except OSError:
        pass
    return f"{name}{flags}, {os.cpu_count()} cores"


def native_bf16(device) -> bool:
    """Whether `device` runs bf16 natively: a CPU with AVX512-BF16/AMX, a CUDA GPU with bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports("bf16")


def resolve_precision(precision: str, device: torch.device, force: bool = False,
                      what: str = "training") -> str:
    """The precision to run in: `precision`; "auto" is bf16 where the device runs it natively,
    else fp32; on a CPU without native support for a half precision, fp32 with a warning on
    stderr, unless `force`."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}, auto")
    if torch.device(device).type == "cpu" and not force and not cpu_supports(precision):
        print(f"warning: --precision {precision}: this CPU has no {precision} instructions, so it "
              f"would be much slower than fp32; {what} in fp32 instead (--force-precision "
              f"uses {precision} anyway)", file=sys.stderr)
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of `precision` on `device` (a no-op context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


class Autocast:
    """Calls `fn` under autocast and returns float32 (or wider) outputs, so that everything
    after the network (losses, sampler arithmetic) runs in full precision."""

    def __init__(self, fn, precision: str, device):
        self.fn, self.precision, self.device = fn, precision, torch.device(device)

    def __call__(self, *args, **kwargs):
        with autocast(self.precision, self.device):
            out = self.fn(*args, **kwargs)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


@contextmanager
def autocast_forward(model: torch.nn.Module, precision: str):
    """Within the block, `model(...)` runs under autocast in `precision` and returns float32
    (Autocast); fp32 changes nothing. Whatever calls the model (a denoiser wrapper, a sampler)
    is left as it is, so its own arithmetic keeps its dtype."""
    if precision == "fp32":
        yield model
        return
    if precision not in DTYPES:
        raise UsageError(f"precision {precision!r}: choose fp32, bf16 or fp16")
    device = next(model.parameters()).device
    model.forward = Autocast(type(model).forward.__get__(model), precision, device)
    try:
        yield model
    finally:
        del model.forward   # back to the class's forward


class DynamicLossScaler:
    """ADM's dynamic loss scaling for fp16 (see the module docstring).

    Per step: `scale_loss(loss).backward()`, then `finite = unscale_(params)` divides the
    gradients by the scale and says whether they are all finite; take the optimizer step only
    if `finite`, then call `update(finite)`.
    """

    def __init__(self, init_scale: float = 2.0 ** 20, growth_interval: int = 1000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, min_scale: float = 1.0):
        if growth_interval < 1 or growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ValueError("need growth_interval >= 1, growth_factor > 1, 0 < backoff_factor < 1")
        self.scale, self.good_steps = float(init_scale), 0
        self.growth_interval, self.growth_factor = int(growth_interval), float(growth_factor)
        self.backoff_factor, self.min_scale = float(backoff_factor), float(min_scale)
        self.skipped = 0   # overflow steps skipped in the whole run (kept across --resume)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every .grad by the scale in place; True when all of them are finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return bool(finite)

    def update(self, finite: bool):
        """Halve the scale after an overflow; double it after `growth_interval` clean steps."""
        if not finite:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {"amp.scale": torch.tensor(self.scale, dtype=torch.float64),
                "amp.good_steps": torch.tensor(self.good_steps),
                "amp.skipped": torch.tensor(self.skipped)}

    def load_state_tensors(self, state: Dict[str, torch.Tensor]):
        if "amp.scale" in state:   # a run started in fp32 resumes with the initial scale
            self.scale = float(state["amp.scale"])
            self.good_steps = int(state["amp.good_steps"])
            # older checkpoints lack the count: it then restarts at 0 (as it did before)
            self.skipped = int(state["amp.skipped"]) if "amp.skipped" in state else 0


class NoScaler:
    """The loss scaler of fp32 and bf16: does nothing (same interface as DynamicLossScaler)."""
    scale, skipped = 1.0, 0

    def scale_loss(self, loss):
        return loss

    def unscale_(self, params) -> bool:
        return True

    def update(self, finite: bool):
        pass

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state):
        pass


def make_scaler(precision: str, init_scale: Optional[float] = None):
    if precision != "fp16":
        return NoScaler()
    return DynamicLossScaler() if init_scale is None else DynamicLossScaler(init_scale)

"""A model directory's network as a standalone TorchScript file, for deployment without gaussdiff.

    net = torch.jit.load("model.pt")            # needs only torch
    out = net(x, t)                              # unconditional
    out = net(x, t, y)                           # class-conditional (y: long class indices)
    out = net(x, t, low_res)                     # upsampler (low_res: [B, C, h, w] in [-1, 1])
    out = net(x, t, y, low_res)                  # class-conditional upsampler

x: [B, C, H, W] float32, t: [B] ORIGINAL timestep indices (long, or float for fractional ones),
as `gaussdiff.load(DIR).model` takes them (discrete-time models and noisy classifiers).

A model trained in σ-space (config.json has "precond": `train --objective edm|vp|ve|iddpm`) is
exported as its denoiser, preconditioning included, the function a user samples with:

    D = net(x, sigma[, y][, low_res])           # x = x_0 + σ·n, sigma: [B] float32 noise levels

i.e. D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)) (EDM eq. 7), not the bare F. The file also carries the model directory's
config.json (`torch.jit.load(path, _extra_files={"config.json": ""})`), so the diffusion
settings travel with the network. ONNX export is not offered: the onnx package is not a
dependency of gaussdiff. (torch 2.x marks TorchScript deprecated in favour of torch.export; the
traced file still loads and runs with torch.jit.load.)
"""
from __future__ import annotations

import io
import json
import warnings
from typing import List

import torch

from ..errors import UsageError
from ..modeldir import atomic_write_bytes, load, num_timesteps, read_config
from ..training.classifier import load_classifier


class PositionalModel(torch.nn.Module):
    """model(x, t, *cond) with the conditioning tensors given positionally, in the order of
    `names` (tracing records positional inputs only)."""

    def __init__(self, model: torch.nn.Module, names: List[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, x, t, *cond):
        return self.model(x, t, **dict(zip(self.names, cond)))


def example_inputs(config: dict, batch: int = 2, seed: int = 0):
    """(inputs, names of the conditioning inputs) for tracing the network of `config`."""
    g = torch.Generator().manual_seed(seed)
    m = config["model"]
    C, S = m["in_channels"], m["image_size"]
    steps = num_timesteps(config) or 1000   # σ-space: the σ input replaces t (export_torchscript)
    inputs = [torch.randn(batch, C, S, S, generator=g),
              torch.randint(0, steps, (batch,), generator=g)]
    names = []
    if config.get("kind") != "classifier" and m.get("num_classes"):
        inputs.append(torch.randint(0, m["num_classes"], (batch,), generator=g))
        names.append("y")
    task = config.get("task") or {}
    if task.get("type") == "upsample":
        low = int(task["low_res"])
        inputs.append(torch.randn(batch, C, low, low, generator=g))
        names.append("low_res")
    return inputs, names


def export_torchscript(model_dir: str, out: str, ema="auto") -> str:
    """Trace the network of `model_dir` (a diffusion model or a noisy classifier) on CPU in
    float32 and write it, with its config.json, as a TorchScript file `out` (atomically)."""
    cfg = read_config(model_dir)
    if cfg.get("kind") == "classifier":
        model = load_classifier(model_dir, device="cpu", ema=ema).model
    else:
        pipe = load(model_dir, device="cpu", ema=ema)
        # σ-space: the denoiser D(x; σ); the bare network would take c_noise, not σ
        model = pipe.denoiser if cfg.get("precond") else pipe.model
    model = model.float().eval()
    inputs, names = example_inputs(cfg)
    if cfg.get("precond"):
        inputs[1] = torch.exp(torch.randn(len(inputs[0]), generator=torch.Generator().manual_seed(1)))
    wrapped = PositionalModel(model, names).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.x deprecates TorchScript in favour of torch.export, but still runs it; the
        # tracer's warnings concern shapes, and the batch size stays free (tested)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(wrapped, tuple(inputs), check_trace=False)
        except Exception as e:
            raise UsageError(f"{model_dir}: the network could not be traced ({e})") from None
        torch.jit.save(traced, buf, _extra_files={"config.json": json.dumps(cfg)})
    atomic_write_bytes(out, buf.getvalue())
    return out

"""Ensembles by timestep range (Improved DDPM, appendix: one model for t ∈ [K, T − 1 − K],
another for the steps near both ends): `--ensemble MODEL_A:MODEL_B:K` of `gaussdiff sample`
and `gaussdiff nll`.

`TimestepEnsemble` is a network: forward(x, t, **kw) sends each row to model A when its
(original, possibly fractional) timestep lies in [K, T − 1 − K] and to model B otherwise. So the
discrete samplers (respaced or not), calc_bpd_loop and the σ-space samplers through
DiscreteDenoiser all run it unchanged. `load_ensemble` gives a Pipeline for it.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import UsageError
from ..modeldir import load
from .pipeline import Pipeline

ENSEMBLE_HELP = ("instead of MODEL: two discrete-time models with the same diffusion, A for the "
                 "timesteps t in [K, T-1-K], B for the rest (Improved DDPM appendix); K is the "
                 "last ':' field")


class TimestepEnsemble(nn.Module):
    """model_a(x, t) on rows with K <= t <= T − 1 − K, model_b(x, t) on the others.

    x: [B, ...]; t: [B] original timestep indices (long, or float as DiscreteDenoiser gives
    without quantize). Keyword tensors with B rows (y, low_res) are split with x; other
    keywords go to both models. A batch that falls wholly in one range is one call of one
    model, so the ensemble of a model with itself is bit-identical to the model.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, K: int, T: int):
        super().__init__()
        if not 0 <= K < T / 2:
            raise UsageError(f"ensemble K = {K}: K must lie in [0, T/2) for T = {T} steps, "
                             f"so that model A's range [K, T-1-K] is not empty")
        self.model_a, self.model_b, self.K, self.T = model_a, model_b, int(K), int(T)

    def in_range_a(self, t: torch.Tensor) -> torch.Tensor:
        """[B] bool: the rows model A serves."""
        return (t >= self.K) & (t <= self.T - 1 - self.K)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        a = self.in_range_a(t)
        if bool(a.all()):
            return self.model_a(x, t, **kwargs)
        if not bool(a.any()):
            return self.model_b(x, t, **kwargs)
        B = x.shape[0]

        def rows(mask):
            kw = {k: v[mask] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == B else v
                  for k, v in kwargs.items()}
            return x[mask], t[mask], kw

        xa, ta, kwa = rows(a)
        xb, tb, kwb = rows(~a)
        out_a, out_b = self.model_a(xa, ta, **kwa), self.model_b(xb, tb, **kwb)
        out = out_a.new_empty((B,) + out_a.shape[1:])
        out[a], out[~a] = out_a, out_b.to(out_a.dtype)
        return out


def parse_ensemble_spec(spec: str):
    """"MODEL_A:MODEL_B:K" -> (path_a, path_b, K). K is the last field; when the paths contain
    ':', the split of the rest is the one whose two sides are both existing directories."""
    head, sep, k = spec.rpartition(":")
    try:
        K = int(k)
    except ValueError:
        K = None
    if not sep or K is None or ":" not in head:
        raise UsageError(f"--ensemble {spec!r}: expected MODEL_A:MODEL_B:K with K an integer")
    cuts = [i for i, c in enumerate(head) if c == ":"]
    if len(cuts) > 1:
        valid = [i for i in cuts if os.path.isdir(head[:i]) and os.path.isdir(head[i + 1:])]
        if len(valid) != 1:
            raise UsageError(f"--ensemble {spec!r}: cannot tell where MODEL_A ends "
                             f"({'no' if not valid else 'more than one'} split gives two existing "
                             f"directories)")
        cuts = valid
    a, b = head[:cuts[0]], head[cuts[0] + 1:]
    if not a or not b:
        raise UsageError(f"--ensemble {spec!r}: expected MODEL_A:MODEL_B:K with two model directories")
    return a, b, K


def _check_same_diffusion(pa, pb, a: str, b: str):
    """A UsageError naming the first setting in which two discrete-time pipelines differ."""
    for path, pipe in ((a, pa), (b, pb)):
        if pipe.config.get("precond"):
            raise UsageError(f"--ensemble: {path} was trained in σ-space (objective "
                             f"{pipe.config['precond']['type']}): an ensemble needs two discrete-time models")
    da, db = pa.config["diffusion"], pb.config["diffusion"]
    checks = [(f"diffusion {k}", da.get(k), db.get(k)) for k in ("schedule", "steps", "mean_type", "var_type")]
    checks += [("image shape (C, H, W)", pa.image_shape, pb.image_shape),
               ("num_classes", pa.num_classes, pb.num_classes),
               ("null_class", bool(pa.config["model"].get("null_class")),
                bool(pb.config["model"].get("null_class"))),
               ("task", pa.config.get("task") or {"type": "generate"},
                pb.config.get("task") or {"type": "generate"})]
    for what, va, vb in checks:
        if va != vb:
            raise UsageError(f"--ensemble: {a} and {b} differ in {what} ({va!r} vs {vb!r}); "
                             f"the two models need the same diffusion")
    if not np.array_equal(pa.diffusion.betas, pb.diffusion.betas):
        raise UsageError(f"--ensemble: {a} and {b} differ in their β schedules")


def load_ensemble(spec: str, device=None, ema: Optional[str] = "auto"):
    """The Pipeline of `--ensemble MODEL_A:MODEL_B:K`: model A for t ∈ [K, T − 1 − K], model B
    elsewhere, with A's diffusion and config (plus an "ensemble" section) and path `spec`."""
    a, b, K = parse_ensemble_spec(spec)
    pa, pb = load(a, device=device, ema=ema), load(b, device=device, ema=ema)
    _check_same_diffusion(pa, pb, a, b)
    T = pa.diffusion.original_num_steps
    if not 0 <= K < T / 2:
        raise UsageError(f"--ensemble {spec!r}: K = {K} must lie in [0, T/2) = [0, {T / 2:g}) "
                         f"for T = {T} steps")
    model = TimestepEnsemble(pa.model, pb.model, K, T).eval()
    config = dict(pa.config, ensemble={"model_a": os.path.abspath(a),
                                       "model_b": os.path.abspath(b), "K": K})
    return Pipeline(model, pa.diffusion, config, spec)


def load_model_or_ensemble(model: Optional[str], ensemble: Optional[str], device=None,
                           ema: Optional[str] = "auto"):
    """The CLI's MODEL or --ensemble A:B:K (exactly one of them) as a Pipeline."""
    if (model is None) == (ensemble is None):
        raise UsageError("give a MODEL directory or --ensemble MODEL_A:MODEL_B:K (one of them)")
    return load(model, device=device, ema=ema) if ensemble is None else \
        load_ensemble(ensemble, device=device, ema=ema)

"""Model directories: config.json + *.safetensors; `load` returns the `Pipeline` that samples
from one (gaussdiff.sampling.pipeline).

The config travels with the weights, so sampling never needs the training flags repeated.
Nothing here unpickles anything: weights are safetensors, the config is JSON.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .diffusion.precond import make_precond
from .diffusion.process import make_diffusion
from .errors import UsageError
from .fileio import (atomic_write_bytes, atomic_write_json, check_output_file,  # noqa: F401 (re-export)
                     load_tensors, save_tensors)
from .nn.encoder import EncoderConfig, EncoderUNetModel
from .nn.unet import SuperResModel, UNetConfig, UNetModel
from .rng import seed_for  # noqa: F401 (re-export)
from .sampling.pipeline import Pipeline
from .sampling.samplers import SAMPLER_NAMES  # noqa: F401 (re-export)
from .validate import (DIFFUSION_KEYS, DIFFUSION_OPTIONAL, TASKS, check_config,  # noqa: F401
                       check_sampling_numbers, task_of)
from .version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

def ema_name(rate: float) -> str:
    return f"ema_{rate}.safetensors"


def diffusion_section(diffusion: dict) -> dict:
    """A config.json "diffusion" section with every key, the optional ones defaulted."""
    return {k: {**DIFFUSION_OPTIONAL, **diffusion}[k] for k in DIFFUSION_KEYS}


def make_config(model: UNetConfig, diffusion: Optional[dict], data: dict,
                training: Optional[dict] = None, sections: Optional[dict] = None) -> dict:
    """A config.json: the network, the discrete diffusion (all keys; None when `sections` holds
    the objective's own: a σ-space model's "precond" and "objective", a classifier's schedule),
    the data and the training options."""
    cfg = {"gaussdiff_version": __version__, "format_version": FORMAT_VERSION,
           "model": model.to_dict()}
    if diffusion is not None:
        cfg["diffusion"] = diffusion_section(diffusion)
    return {**cfg, **(sections or {}), "data": data, "training": training or {}}


def num_timesteps(cfg: dict) -> Optional[int]:
    """T of a discrete-time model or classifier (its "diffusion" section), None in σ-space."""
    return None if cfg.get("precond") else int(cfg["diffusion"]["steps"])


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise UsageError(f"{path}: model directory not found")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no {CONFIG_NAME}: not a gaussdiff model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{cfg_path}: model format version {cfg.get('format_version') if isinstance(cfg, dict) else '?'} "
                         f"is not supported by gaussdiff {__version__} (expects {FORMAT_VERSION})")
    if cfg.get("precond") is not None:
        # σ-space: the noise process is the "precond" section. Directories written before
        # the objective contract also hold a "diffusion" section their sampling never used.
        cfg.pop("diffusion", None)
    for key in ("model", "data") + (() if cfg.get("precond") is not None else ("diffusion",)):
        if not isinstance(cfg.get(key), dict):
            raise UsageError(f"{cfg_path}: missing section {key!r}")
    check_config(cfg, cfg_path)   # types and ranges, before anything is built from them
    return cfg


def build_model(cfg: dict) -> torch.nn.Module:
    """The network of a config: a UNetModel, a SuperResModel (a "task" section of type
    "upsample") or, for a classifier directory ("kind": "classifier"), an EncoderUNetModel."""
    if cfg.get("kind") == "classifier":
        return EncoderUNetModel(EncoderConfig.from_dict(cfg["model"]))
    upsample = task_of(cfg)["type"] == "upsample"
    return (SuperResModel if upsample else UNetModel)(UNetConfig.from_dict(cfg["model"]))


def load_state_into(model: torch.nn.Module, path: str):
    state = load_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape mismatch at {bad_shape[:3]}")
        raise UsageError(f"{path}: weights do not match config.json ({what})")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise UsageError(f"{path}: {len(broken)} weight tensor(s) hold NaN or inf (first: "
                         f"{broken[0]}): the file is damaged or the run diverged; use another "
                         f"checkpoint or EMA")
    model.load_state_dict(state)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_path(path: str, cfg: dict, ema: Optional[str] = "auto") -> str:
    """The weights file of a model directory: see `load` for `ema`."""
    if ema == "auto":
        preferred = cfg.get("training", {}).get("sample_ema")
        emas = sorted(f for f in os.listdir(path) if f.startswith("ema_") and f.endswith(".safetensors"))
        if preferred is not None and os.path.exists(os.path.join(path, ema_name(preferred))):
            return os.path.join(path, ema_name(preferred))
        if emas:
            return os.path.join(path, emas[0])
    elif ema is not None:
        try:
            rate = float(ema)
        except (TypeError, ValueError):
            raise UsageError(f"--ema {ema!r}: expected auto, raw or an EMA rate like 0.9999") from None
        return os.path.join(path, ema_name(rate))
    return os.path.join(path, WEIGHTS_NAME)


def load(path: str, device=None, ema: Optional[str] = "auto") -> Pipeline:
    """Load a model directory. ema="auto" takes the EMA weights named in config.json (or the
    only EMA file), falling back to model.safetensors; ema=None takes the raw weights;
    ema="0.9999" takes that rate."""
    cfg = read_config(path)
    if cfg.get("kind") == "classifier":
        raise UsageError(f"{path} holds a noisy classifier (gaussdiff train-classifier), not a "
                         f"diffusion model: pass it as --classifier "
                         f"(gaussdiff.training.classifier.load_classifier)")
    model = build_model(cfg)
    load_state_into(model, weights_path(path, cfg, ema))
    model.to(device or default_device()).eval()
    denoiser = None
    if cfg.get("precond"):   # σ-space objective: rebuild D(x; σ) around the network
        denoiser = make_precond(cfg["precond"], model).eval()
    diffusion = None if denoiser is not None else make_diffusion(**cfg["diffusion"])
    return Pipeline(model, diffusion, cfg, path, denoiser)

"""Model directories: config.json + *.safetensors, and the `Pipeline` that samples from them.

The config travels with the weights, so sampling never needs the training flags repeated.
Nothing here unpickles anything: weights are safetensors, the config is JSON.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from . import __version__
from .diffusion import GaussianDiffusion, make_diffusion
from .errors import UsageError
from .nn.unet import UNetConfig, UNetModel

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSION_KEYS = ("schedule", "steps", "mean_type", "var_type", "loss_type", "hybrid_lambda",
                  "vb_stop_grad")


def ema_name(rate: float) -> str:
    return f"ema_{rate}.safetensors"


def atomic_write_bytes(path: str, data: bytes):
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: str, tensors: dict, metadata: Optional[dict] = None):
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: str) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except Exception as e:
        raise UsageError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def make_config(model: UNetConfig, diffusion: dict, data: dict, training: Optional[dict] = None) -> dict:
    return {"gaussdiff_version": __version__, "format_version": FORMAT_VERSION,
            "model": model.to_dict(), "diffusion": {k: diffusion[k] for k in DIFFUSION_KEYS},
            "data": data, "training": training or {}}


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
    for key in ("model", "diffusion", "data"):
        if not isinstance(cfg.get(key), dict):
            raise UsageError(f"{cfg_path}: missing section {key!r}")
    return cfg


def build_model(cfg: dict) -> UNetModel:
    return UNetModel(UNetConfig.from_dict(cfg["model"]))


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
    model.load_state_dict(state)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_for(seed: int, index: int) -> int:
    """The seed of image `index` in a run with seed `seed` (independent of batching)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Pipeline:
    """A loaded model: `.model` (the network), `.diffusion` (its full-length GaussianDiffusion)
    and `.config` (config.json). `.sample(...)` draws images."""
    model: torch.nn.Module
    diffusion: GaussianDiffusion
    config: dict
    path: str = ""

    @property
    def image_shape(self):
        d = self.config["data"]
        return (d["channels"], d["image_size"], d["image_size"])

    @property
    def num_classes(self) -> Optional[int]:
        return self.config["model"].get("num_classes")

    def respaced(self, steps) -> GaussianDiffusion:
        """This model's diffusion respaced to `steps` (an int, "ddimN", "a,b,c" or a list)."""
        spacing = steps if not isinstance(steps, int) else str(steps)
        return make_diffusion(respacing=spacing, **self.config["diffusion"])

    @torch.no_grad()
    def sample(self, num: int, sampler: str = "ddim", steps=50, eta: float = 0.0, seed: int = 0,
               batch_size: int = 64, labels: Optional[Sequence[int]] = None, progress: bool = True,
               clip_denoised: bool = True, start_index: int = 0):
        """Draw `num` images. Returns (uint8 NHWC array, int64 labels or None).

        sampler: "ddpm" (ancestral) or "ddim" (with eta); steps: respacing of the original T.
        Image i depends only on (seed, start_index + i), never on the batch size.
        """
        from tqdm.auto import tqdm
        from .data import to_uint8
        from .rng import per_sample_generators
        if sampler not in ("ddpm", "ddim"):
            raise UsageError(f"unknown sampler {sampler!r}: choose ddpm or ddim")
        diffusion = self.respaced(steps)
        device = next(self.model.parameters()).device
        self.model.eval()
        out, out_labels = [], []
        nc = self.num_classes
        bar = tqdm(total=num, disable=not progress, desc=f"sampling ({sampler}, {diffusion.num_timesteps} steps)",
                   unit="img")
        for start in range(0, num, batch_size):
            idx = range(start_index + start, start_index + min(start + batch_size, num))
            gens = per_sample_generators([seed_for(seed, i) for i in idx])
            kwargs = {}
            if nc is not None:
                if labels is not None:
                    y = torch.as_tensor([labels[i - start_index] for i in idx], dtype=torch.long)
                else:
                    y = torch.tensor([int(torch.randint(nc, (1,), generator=g)) for g in gens])
                kwargs["y"] = y.to(device)
                out_labels.append(y.numpy())
            shape = (len(idx),) + self.image_shape
            noise = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
            if sampler == "ddpm":
                x = diffusion.p_sample_loop(self.model, shape, noise=noise, model_kwargs=kwargs,
                                            clip_denoised=clip_denoised, generator=gens)
            else:
                x = diffusion.ddim_sample_loop(self.model, shape, noise=noise, model_kwargs=kwargs,
                                               clip_denoised=clip_denoised, eta=eta, generator=gens)
            out.append(to_uint8(x))
            bar.update(len(idx))
        bar.close()
        return np.concatenate(out), (np.concatenate(out_labels) if out_labels else None)


def load(path: str, device=None, ema: Optional[str] = "auto") -> Pipeline:
    """Load a model directory. ema="auto" takes the EMA weights named in config.json (or the
    only EMA file), falling back to model.safetensors; ema=None takes the raw weights;
    ema="0.9999" takes that rate."""
    cfg = read_config(path)
    model = build_model(cfg)
    weights = os.path.join(path, WEIGHTS_NAME)
    if ema == "auto":
        preferred = cfg.get("training", {}).get("sample_ema")
        emas = sorted(f for f in os.listdir(path) if f.startswith("ema_") and f.endswith(".safetensors"))
        if preferred is not None and os.path.exists(os.path.join(path, ema_name(preferred))):
            weights = os.path.join(path, ema_name(preferred))
        elif emas:
            weights = os.path.join(path, emas[0])
    elif ema is not None:
        weights = os.path.join(path, ema_name(float(ema)))
    load_state_into(model, weights)
    model.to(device or default_device()).eval()
    return Pipeline(model, make_diffusion(**cfg["diffusion"]), cfg, path)

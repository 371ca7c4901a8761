"""A small classifier trained on the data, for fast proxy metrics named after it.

Inception features describe ImageNet photographs; on 28x28 greyscale data they are slow (~0.4 s
per image on a CPU) and partly beside the point. This CNN, trained on the data's labels, gives
    fd_<name>: the Fréchet distance in its 128-d penultimate feature space, and
    is_<name>: the Inception Score formula applied to its class probabilities.
They are named after the network (e.g. fd_fashion) so that they are never mistaken for FID or
the ImageNet Inception Score, and are only comparable between runs using the same network file.

Saved as a directory: config.json + model.safetensors (nothing pickled).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data import BatchSampler, ImageDataset, to_model_range
from ..errors import UsageError
from ..modeldir import atomic_write_json, load_state_into, save_tensors

KIND = "gaussdiff-feature-net"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class FeatureNet(nn.Module):
    """Three conv stages (widths w, 2w, 4w; 3x3 convs, ReLU, 2x2 max pools), global average
    pooling, a `feature_dim` ReLU layer (the features) and a linear classifier.

    Input: float [B, channels, image_size, image_size] in [-1, 1]."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 16,
                 feature_dim: int = 128, image_size: int = 28):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, width=width,
                           feature_dim=feature_dim, image_size=image_size)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, feature_dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> class logits [B, num_classes]."""
        return self.head(self.body(x))

    @property
    def sha1(self) -> str:
        """Identity of the weights (the safetensors file's sha1 when loaded from disk)."""
        if getattr(self, "_sha1", None) is None:
            h = hashlib.sha1()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()
        return self._sha1


def default_name(dataset_name: str) -> str:
    """fashion-mnist -> fashion; other names -> lower-case letters, digits and underscores."""
    base = dataset_name.split(":")[0].lower()
    base = {"fashion-mnist": "fashion"}.get(base, os.path.splitext(os.path.basename(base))[0])
    return re.sub(r"[^a-z0-9]+", "_", base).strip("_") or "net"


def _batch(images: np.ndarray, idx) -> torch.Tensor:
    return to_model_range(torch.from_numpy(images[idx]))


@torch.no_grad()
def accuracy(net: FeatureNet, data: ImageDataset, batch_size: int = 500) -> float:
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(data), batch_size):
        x = _batch(data.images, slice(i, i + batch_size)).to(device)
        correct += (net(x).argmax(1).cpu() == torch.from_numpy(data.labels[i:i + batch_size])).sum().item()
    return correct / max(len(data), 1)


def train_feature_classifier(dataset: ImageDataset, steps: int = 2000, batch_size: int = 128,
                             lr: float = 1e-3, seed: int = 0, width: int = 16, feature_dim: int = 128,
                             name: Optional[str] = None, device=None, progress: bool = True,
                             eval_data: Optional[ImageDataset] = None) -> FeatureNet:
    """Train a FeatureNet on a labelled dataset (uint8 NHWC images, int labels) with Adam and
    cross-entropy, no augmentation. Returns the network (eval mode, on CPU) with
    `.config` filled: architecture, name, dataset, steps and held-out accuracy if eval_data."""
    if dataset.labels is None:
        raise UsageError(f"dataset {dataset.name} has no labels: the feature classifier needs them")
    if steps < 1 or batch_size < 1:
        raise UsageError("--steps and --batch-size must be positive")
    n, h, w, c = dataset.images.shape
    if h != w:
        raise UsageError(f"dataset {dataset.name}: images must be square, got {h}x{w}")
    num_classes = int(dataset.num_classes)
    torch.manual_seed(seed)
    device = torch.device(device or "cpu")
    net = FeatureNet(c, num_classes, width, feature_dim, h).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sampler = BatchSampler(n, min(batch_size, n), seed)
    labels = torch.from_numpy(dataset.labels)
    net.train()
    bar = tqdm(range(steps), desc="feature net", unit="step", disable=not progress)
    for step in bar:
        idx = sampler.next_indices()
        x, y = _batch(dataset.images, idx.numpy()).to(device), labels[idx].to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net = net.cpu().eval()
    net.config.update(kind=KIND, format_version=FORMAT_VERSION,
                      name=name or default_name(dataset.name), dataset=dataset.name,
                      class_names=dataset.class_names, steps=steps, batch_size=batch_size,
                      lr=lr, seed=seed)
    if eval_data is not None:
        net.config["eval_accuracy"] = accuracy(net, eval_data)
        net.config["eval_data"] = eval_data.name
    return net


def save_feature_net(net: FeatureNet, path: str):
    """Write config.json + model.safetensors into directory `path` (created)."""
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, WEIGHTS_NAME), net.state_dict())
    atomic_write_json(os.path.join(path, CONFIG_NAME), net.config)


def load_feature_net(path: str, device=None) -> FeatureNet:
    """Load a directory written by save_feature_net. `.sha1` identifies the weights."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no {CONFIG_NAME}: not a feature network directory "
                         f"(make one with `gaussdiff train-feature-net`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != KIND or cfg.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{cfg_path}: not a gaussdiff feature network (format {FORMAT_VERSION})")
    arch = {k: cfg[k] for k in ("channels", "num_classes", "width", "feature_dim", "image_size")}
    net = FeatureNet(**arch)
    weights = os.path.join(path, WEIGHTS_NAME)
    load_state_into(net, weights)
    net.config = cfg
    with open(weights, "rb") as f:
        net._sha1 = hashlib.sha1(f.read()).hexdigest()
    return net.to(device or "cpu").eval()


def adapt_images(images: np.ndarray, channels: int, size: int) -> np.ndarray:
    """uint8 NHWC images converted to the network's channels (ITU-R 601 luma for RGB -> grey,
    repetition for grey -> RGB) and resized (PIL bilinear) to size x size."""
    x = images
    if x.shape[-1] == 3 and channels == 1:
        x = np.round(x.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None].clip(0, 255).astype(np.uint8)
    elif x.shape[-1] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = np.stack([np.asarray(Image.fromarray(im[..., 0] if channels == 1 else im)
                                 .resize((size, size), Image.BILINEAR)).reshape(size, size, channels)
                      for im in x])
    return x


@torch.no_grad()
def net_outputs(net: FeatureNet, images: np.ndarray, batch_size: int = 500, progress: bool = True,
                desc: str = "feature net") -> dict:
    """{"features": [N, feature_dim], "probs": [N, num_classes]} float64 for uint8 NHWC images."""
    cfg = net.config
    images = adapt_images(images, cfg["channels"], cfg["image_size"])
    device = next(net.parameters()).device
    feats, probs = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        f = net.features(_batch(images, slice(i, i + batch_size)).to(device))
        feats.append(f.double().cpu().numpy())
        probs.append(torch.softmax(net.head(f).double(), dim=1).cpu().numpy())
    return {"features": np.concatenate(feats), "probs": np.concatenate(probs)}

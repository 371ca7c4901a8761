"""`gaussdiff eval`: sample-quality metrics of generated images against a reference set.

Feature spaces and the metrics computed in each:
- Inception pool_3 (2048-d): fid, and kid / prec / rec with space="inception" (the default).
- Inception spatial (mixed_6/conv, 2023-d, ADM's sFID features): sfid.
- A feature classifier trained on the data (`gaussdiff train-feature-net`), named NAME in its
  config: fd (-> "fd_NAME"), is (-> "is_NAME"), and kid / prec / rec with space="net"
  (-> "kid_NAME", "precision_NAME", "recall_NAME"). Keys carry the name so these proxies are
  never mistaken for the Inception metrics.

Reference statistics (μ, Σ and the features that KID and precision/recall need) are cached in
one .npz per (reference content, number of reference images, feature network), so a second
evaluation against the same reference only costs the samples. The cache key hashes the
reference images themselves (sha1 of the uint8 array), not their path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from .classifier import net_outputs
from ..distributed import all_gather_cat, current, shard
from ..errors import UsageError
from .frechet import feature_statistics, frechet_distance
from .inception import InceptionFeatures, get_inception
from .inception_score import inception_score
from .kid import kernel_distance
from ..modeldir import atomic_write_bytes
from .precision_recall import precision_recall

METRICS = ("fid", "sfid", "kid", "prec", "rec", "is", "fd")
SPACES = ("inception", "net")
CACHE_ENV = "GAUSSDIFF_CACHE"
CACHE_VERSION = 1


def default_cache_dir(explicit: Optional[str] = None) -> str:
    """--cache-dir, else $GAUSSDIFF_CACHE, else ~/.cache/gaussdiff."""
    return explicit or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gaussdiff")


def parse_metrics(text: str) -> list:
    names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UsageError(f"--metrics: unknown metric(s) {', '.join(bad) or '(none given)'}: "
                         f"choose from {','.join(METRICS)}")
    return list(dict.fromkeys(names))


def needs_networks(metrics: Iterable[str], space: str = "inception"):
    """(needs Inception, needs a feature net) for metric names of METRICS in feature space `space`."""
    metrics, spaced = set(metrics), bool({"kid", "prec", "rec"} & set(metrics))
    return (bool({"fid", "sfid"} & metrics) or (space == "inception" and spaced),
            bool({"fd", "is"} & metrics) or (space == "net" and spaced))


def images_sha1(images: np.ndarray) -> str:
    h = hashlib.sha1(f"{images.dtype}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def _atomic_savez(path: str, arrays: Dict[str, np.ndarray]):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())   # temp file + rename: no half-written cache


def _network_spec(network) -> str:
    """The identity of a feature network for cache keys (weights hash + preprocessing)."""
    if isinstance(network, InceptionFeatures):
        return network.network_id
    return f"feature-net:{network.config.get('name')}:{network.sha1}"


def compute_features(network, images: np.ndarray, batch_size: int = 50, progress: bool = True,
                     desc: str = "") -> Dict[str, np.ndarray]:
    """Features of uint8 NHWC images. Inception: {"pool", "spatial"}; a FeatureNet:
    {"net", "probs"}. Under torchrun each rank extracts its contiguous share of the images and
    every rank gets all features, in image order."""
    dist = current()
    part = images[shard(len(images), dist)] if dist.enabled else images
    progress = progress and dist.is_main
    if isinstance(network, InceptionFeatures):
        feats = network.extract(part, batch_size=batch_size, spatial=True, progress=progress,
                                desc=f"inception {desc}".strip())
    else:
        out = net_outputs(network, part, batch_size=max(batch_size, 256), progress=progress,
                          desc=f"feature net {desc}".strip())
        feats = {"net": out["features"], "probs": out["probs"]}
    if dist.enabled:   # nccl gathers CUDA tensors, gloo CPU ones
        dev = (torch.device("cuda", dist.local_rank)
               if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
        feats = {k: all_gather_cat(torch.from_numpy(np.ascontiguousarray(v)).to(dev), dist).cpu().numpy()
                 for k, v in feats.items()}
    return feats


def reference_key(images: np.ndarray, network_spec: str, label: str, kind: str):
    """(key, file name) of the cached statistics of `images` under a feature network: the key
    names the images by hash, their count and the network; the name carries a digest of it."""
    key = json.dumps({"version": CACHE_VERSION, "images": images_sha1(images), "num": len(images),
                      "network": network_spec}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40] or "ref"
    return key, f"ref-{safe}-{kind}-{len(images)}-{digest}.npz"


def reference_statistics(network, images: np.ndarray, label: str, cache_dir: str,
                         batch_size: int = 50, progress: bool = True,
                         need: Iterable[str] = ()) -> Dict[str, np.ndarray]:
    """Cached statistics of reference images [M, H, W, C] for `network`.

    Inception: pool_features [M, 2048] float32, pool_mu, pool_sigma, spatial_mu, spatial_sigma.
    FeatureNet: net_features [M, d], net_mu, net_sigma. Also "_path" and "_hit" (was cached).
    need: the arrays the caller uses; a cache file without one of them (a compact copy made
    by `compact_reference`, e.g. FID statistics without the features) is recomputed.
    """
    kind = "inception" if isinstance(network, InceptionFeatures) else "net"
    key, name = reference_key(images, _network_spec(network), label, kind)
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key and set(need) <= set(f.files):
                    out = {k: f[k] for k in f.files if k != "key"}
                    return out | {"_path": path, "_hit": True}
        except Exception:
            pass   # unreadable or foreign: recompute and overwrite
    feats = compute_features(network, images, batch_size, progress, desc="(reference)")
    arrays: Dict[str, np.ndarray] = {"key": np.array(key)}
    if kind == "net":
        arrays["net_features"] = feats["net"]
        arrays["net_mu"], arrays["net_sigma"] = feature_statistics(feats["net"])
    else:
        arrays["pool_features"] = feats["pool"].astype(np.float32)
        arrays["pool_mu"], arrays["pool_sigma"] = feature_statistics(feats["pool"])
        arrays["spatial_mu"], arrays["spatial_sigma"] = feature_statistics(feats["spatial"])
    try:
        os.makedirs(cache_dir, exist_ok=True)
        if current().is_main:   # under torchrun every rank has the same arrays; one writes
            _atomic_savez(path, arrays)
    except OSError as e:
        raise UsageError(f"cannot write the reference cache {path} ({e}): choose another "
                         f"--cache-dir or set ${CACHE_ENV}") from None
    arrays.pop("key")
    return arrays | {"_path": path, "_hit": False}


def compact_reference(src: str, dest: str, keep: Iterable[str] = ("pool_mu", "pool_sigma"),
                      dtype=None):
    """A copy of the reference cache file `src` holding only the arrays `keep` (and its key),
    small enough to ship: FID against it needs no reference images and no features; metrics
    that need more recompute. dtype (e.g. np.float32) halves a float64 file; the Fréchet
    distance computes in float64 whatever it reads. `dest` is a directory (the file keeps
    its name) or a path."""
    with np.load(src, allow_pickle=False) as f:
        missing = [k for k in keep if k not in f.files]
        if missing:
            raise UsageError(f"{src} has no {', '.join(missing)}")
        arrays = {k: f[k] if dtype is None else f[k].astype(dtype) for k in keep}
        arrays["key"] = f["key"]
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(src))
    _atomic_savez(dest, arrays)
    return dest


def check_images(images: np.ndarray, what: str = "the samples"):
    """A UsageError for images no metric can mean anything on: non-finite values (a float
    array), or every pixel of every image the same value (e.g. NaN samples saved as black)."""
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UsageError(f"{what} hold NaN or infinite values: regenerate them")
    if images.size and images.min() == images.max():
        raise UsageError(f"{what}: all {len(images)} images are the constant value "
                         f"{images.flat[0]} (blank): nothing to evaluate; regenerate them")


def evaluate(samples: np.ndarray, reference: np.ndarray, metrics: Iterable[str] = ("fid",),
             reference_name: str = "reference", space: str = "inception", feature_net=None,
             cache_dir: Optional[str] = None, batch_size: int = 50, kid_subset_size: int = 1000,
             kid_subsets: int = 100, pr_k: int = 3, is_splits: int = 10, seed: int = 0,
             device=None, progress: bool = True) -> dict:
    """Metrics of uint8 NHWC `samples` [N, H, W, C] against `reference` [M, H', W', C'].

    metrics: names from METRICS. space: feature space of kid/prec/rec ("inception" or "net").
    feature_net: a loaded FeatureNet (needed by fd, is and space="net").
    Returns dict(metrics={...}, settings={...}, reference={...}, networks={...}).
    """
    metrics = list(metrics)
    if space not in SPACES:
        raise UsageError(f"unknown feature space {space!r}: choose inception or net")
    needs_inception, needs_net = needs_networks(metrics, space)
    if needs_net and feature_net is None:
        raise UsageError("metrics fd, is and --space net need a feature network: pass --feature-net DIR "
                         "(train one with `gaussdiff train-feature-net`)")
    if len(samples) < 2 or len(reference) < 2:
        raise UsageError(f"need at least 2 samples and 2 reference images, got {len(samples)} and {len(reference)}")
    for what, images in (("the samples", samples), ("the reference", reference)):
        check_images(images, what)
    cache_dir = default_cache_dir(cache_dir)
    out: Dict[str, float] = {}
    settings: dict = {"space": space}
    ref_info: dict = {"name": reference_name, "num": len(reference), "sha1": images_sha1(reference),
                      "cache": {}}
    networks: dict = {}

    if needs_inception:
        inc = get_inception(device)
        networks["inception"] = inc.network_id
        need = {"fid": ("pool_mu", "pool_sigma"), "sfid": ("spatial_mu", "spatial_sigma")}
        need = [k for m in metrics for k in need.get(m, ())] + \
            (["pool_features"] if space == "inception" and {"kid", "prec", "rec"} & set(metrics) else [])
        ref = reference_statistics(inc, reference, reference_name, cache_dir, batch_size, progress, need)
        ref_info["cache"]["inception"] = {"path": ref["_path"], "hit": ref["_hit"]}
        f = compute_features(inc, samples, batch_size, progress, desc="(samples)")
        if "fid" in metrics:
            out["fid"] = frechet_distance(*feature_statistics(f["pool"]), ref["pool_mu"], ref["pool_sigma"])
        if "sfid" in metrics:
            out["sfid"] = frechet_distance(*feature_statistics(f["spatial"]), ref["spatial_mu"], ref["spatial_sigma"])
        if space == "inception" and {"kid", "prec", "rec"} & set(metrics):
            _space_metrics(out, settings, metrics, f["pool"], ref["pool_features"], "",
                           kid_subset_size, kid_subsets, pr_k, seed)

    if needs_net:
        name = feature_net.config.get("name", "net")
        networks["net"] = {"name": name, "sha1": feature_net.sha1,
                           "path": getattr(feature_net, "path", None),
                           "dataset": feature_net.config.get("dataset")}
        f = compute_features(feature_net, samples, batch_size, progress, desc="(samples)")
        if "fd" in metrics or space == "net":
            need = ["net_mu", "net_sigma"] + (["net_features"] if space == "net" else [])
            ref = reference_statistics(feature_net, reference, reference_name, cache_dir, batch_size,
                                       progress, need)
            ref_info["cache"]["net"] = {"path": ref["_path"], "hit": ref["_hit"]}
            if "fd" in metrics:
                out[f"fd_{name}"] = frechet_distance(*feature_statistics(f["net"]), ref["net_mu"], ref["net_sigma"])
            if space == "net":
                _space_metrics(out, settings, metrics, f["net"], ref["net_features"], f"_{name}",
                               kid_subset_size, kid_subsets, pr_k, seed)
        if "is" in metrics:
            splits = max(1, min(is_splits, len(samples)))
            out[f"is_{name}"], out[f"is_{name}_std"] = inception_score(f["probs"], splits)
            settings["is_splits"] = splits
    return dict(metrics=out, settings=settings, num_samples=len(samples), reference=ref_info,
                networks=networks)


def _space_metrics(out, settings, metrics, fake, real, suffix, kid_subset_size, kid_subsets, pr_k, seed):
    if "kid" in metrics:
        mean, std, m = kernel_distance(fake, real, kid_subset_size, kid_subsets, seed)
        out[f"kid{suffix}"], out[f"kid{suffix}_std"] = mean, std
        settings.update(kid_subset_size=m, kid_subsets=kid_subsets, kid_seed=seed)
    if "prec" in metrics or "rec" in metrics:
        if min(len(fake), len(real)) <= pr_k:
            raise UsageError(f"precision/recall with k={pr_k} need more than {pr_k} samples and "
                             f"reference images")
        p, r = precision_recall(real, fake, k=pr_k)
        if "prec" in metrics:
            out[f"precision{suffix}"] = p
        if "rec" in metrics:
            out[f"recall{suffix}"] = r
        settings["pr_k"] = pr_k

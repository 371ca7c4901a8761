"""EDM's non-leaky augmentation (Karras et al. 2022, App. F.2 and Table 6; NVlabs/edm's
`AugmentPipe`, itself StyleGAN2-ADA's geometric pipeline).

Each training image undergoes a random geometric transform, and the network is told which one:
the transform's parameters form an augmentation label vector that conditions the network
(`UNetModel(..., augment_labels=...)`). At sampling time the label is zero ("no augmentation"),
so the augmentations do not leak into the generated images.

Table 6 (constants A_scale = A_aniso = 2^0.2, A_trans = 1/8), label entries in this order:

| augmentation          | transform                                    | draw                | label                       |
| x-flip                | Scale2D(1 − 2a_0, 1)                         | a_0 ~ U{0,1}, 100%  | a_0                         |
| y-flip                | Scale2D(1, 1 − 2a_1)                         | a_1 ~ U{0,1}, p     | a_1                         |
| integer translation   | shift by round(a·W/8) pixels, reflected      | a ~ U(−1,1)², p     | 2 values (off by default)   |
| isotropic scaling     | Scale2D(A_scale^a_2)                         | a_2 ~ N(0,1), p     | a_2                         |
| rotation              | Rotate2D(−a_3)                               | a_3 ~ U(−π,π), p    | cos a_3 − 1, sin a_3        |
| anisotropy            | Rotate(a_4)·Scale(A^a_5, A^−a_5)·Rotate(−a_4)| a_5 ~ N(0,1), p     | a_5 cos a_4, a_5 sin a_4    |
| fractional translation| Translate2D(A_trans·a_6·W, A_trans·a_7·H)     | a_6, a_7 ~ N(0,1), p| a_6, a_7                    |

With EDM's settings (`AugmentPipe(p)`: x-flip always drawn, y-flip, scaling, rotation,
anisotropy and fractional translation each with probability p, no integer translation) the
label has 9 entries. The continuous transforms are applied together, by resampling a 2x
upsampled copy (the orthonormal sym6 wavelet as up/down filter, reflect padding) with
`grid_sample`, as in StyleGAN2-ADA. Images whose parameters are all zero are returned exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

AUGMENT_DIM = 9   # the label length of EDM's settings

# Daubechies' symlet with 6 vanishing moments (orthonormal low-pass, sums to sqrt(2))
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


# 3x3 homogeneous 2-D transforms, batched: each row entry is a number or a [N] tensor
def _matrix(*rows, like: torch.Tensor) -> torch.Tensor:
    elems = [x for row in rows for x in row]
    n = max((e.shape[0] for e in elems if torch.is_tensor(e)), default=1)
    elems = [e.to(like) if torch.is_tensor(e) else torch.full((n,), float(e)).to(like)
             for e in elems]
    return torch.stack(elems, dim=-1).reshape(n, len(rows), -1)


def translate2d(tx, ty, like):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], like=like)


def scale2d(sx, sy, like):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], like=like)


def rotate2d(theta, like):
    return _matrix([torch.cos(theta), -torch.sin(theta), 0], [torch.sin(theta), torch.cos(theta), 0],
                   [0, 0, 1], like=like)


class AugmentPipe:
    """pipe(images [N, C, H, W], generator) -> (augmented images [N, C, H, W], labels [N, label_dim]).

    p is A_prob of Table 6 (EDM used 0.12 or 0.15). The other arguments multiply p per
    augmentation (0 turns one off), with NVlabs/edm's defaults for its training runs: xflip=1e8
    (every image draws a flip, so half are flipped whenever p > 0), translate_int=0 (off). All
    random draws come from `generator` (a CPU torch.Generator, or None for the global RNG) in a
    fixed order, so a generator state reproduces the batch.
    """

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1,
                 translate_int: float = 0, translate_int_max: float = 0.125, scale: float = 1,
                 rotate_frac: float = 1, aniso: float = 1, translate_frac: float = 1,
                 scale_std: float = 0.2, rotate_frac_max: float = 1, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability must lie in [0, 1], got {p}")
        self.p = float(p)
        self.xflip, self.yflip, self.translate_int = float(xflip), float(yflip), float(translate_int)
        self.scale, self.rotate_frac, self.aniso = float(scale), float(rotate_frac), float(aniso)
        self.translate_frac = float(translate_frac)
        self.translate_int_max, self.scale_std = translate_int_max, scale_std
        self.rotate_frac_max, self.aniso_std = rotate_frac_max, aniso_std
        self.aniso_rotate_prob, self.translate_frac_std = aniso_rotate_prob, translate_frac_std

    @property
    def label_dim(self) -> int:
        on = lambda m: m > 0
        return (on(self.xflip) + on(self.yflip) + 2 * on(self.translate_int) + on(self.scale)
                + 2 * on(self.rotate_frac) + 2 * on(self.aniso) + 2 * on(self.translate_frac))

    def __call__(self, images: torch.Tensor, generator=None):
        N, C, H, W = images.shape
        dev = images.device

        def rand(*shape):
            return torch.rand(shape, generator=generator, dtype=torch.float64).to(dev)

        def randn(*shape):
            return torch.randn(shape, generator=generator, dtype=torch.float64).to(dev)

        def gate(w, mult):   # keep w with probability mult·p, else 0
            return torch.where(rand(*w.shape[-1:]) < mult * self.p, w, torch.zeros_like(w))

        labels = []
        # pixel blitting: exact
        if self.xflip > 0:
            w = gate(torch.randint(2, (N,), generator=generator).to(dev, torch.float64), self.xflip)
            images = torch.where(w[:, None, None, None] == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = gate(torch.randint(2, (N,), generator=generator).to(dev, torch.float64), self.yflip)
            images = torch.where(w[:, None, None, None] == 1, images.flip(2), images)
            labels.append(w)
        if self.translate_int > 0:
            w = gate(rand(2, N) * 2 - 1, self.translate_int)
            tx = (w[0] * W * self.translate_int_max).round().long()
            ty = (w[1] * H * self.translate_int_max).round().long()
            x = torch.arange(W, device=dev)[None] - tx[:, None]          # [N, W]
            y = torch.arange(H, device=dev)[None] + ty[:, None]          # [N, H]
            x = W - 1 - (W - 1 - x % (2 * W - 2)).abs()                  # reflect at the edges
            y = H - 1 - (H - 1 - y % (2 * H - 2)).abs()
            images = images.gather(3, x[:, None, None, :].expand(N, C, H, W))
            images = images.gather(2, y[:, None, :, None].expand(N, C, H, W))
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # general geometric transforms, composed as one inverse matrix G_inv (output -> input)
        like = torch.empty((), dtype=torch.float64, device=dev)
        G_inv = torch.eye(3, dtype=torch.float64, device=dev).expand(N, 3, 3)
        moved = torch.zeros(N, dtype=torch.bool, device=dev)
        if self.scale > 0:
            w = gate(randn(N), self.scale)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ scale2d(1 / s, 1 / s, like)
            labels.append(w)
            moved |= w != 0
        if self.rotate_frac > 0:
            w = gate((rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac)
            G_inv = G_inv @ rotate2d(w, like)    # = Rotate2D(−w)⁻¹
            labels += [torch.cos(w) - 1, torch.sin(w)]
            moved |= w != 0
        if self.aniso > 0:
            w = randn(N)
            r = (rand(N) * 2 - 1) * math.pi
            w = gate(w, self.aniso)
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ rotate2d(-r, like) @ scale2d(1 / s, s, like) @ rotate2d(r, like)
            labels += [w * torch.cos(r), w * torch.sin(r)]
            moved |= w != 0
        if self.translate_frac > 0:
            w = gate(randn(2, N), self.translate_frac)
            G_inv = G_inv @ translate2d(-w[0] * W * self.translate_frac_std,
                                        -w[1] * H * self.translate_frac_std, like)
            labels += [w[0], w[1]]
            moved |= (w != 0).any(0)
        if moved.any():
            out = _transform(images, G_inv)
            images = torch.where(moved[:, None, None, None], out, images)
        if labels:
            labels = torch.stack([x.to(torch.float64) for x in labels], dim=1)
        else:
            labels = torch.zeros(N, 0, dtype=torch.float64, device=dev)
        return images, labels.to(images.dtype if images.is_floating_point() else torch.float32)


def _transform(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample images [N, C, H, W] through G_inv [N, 3, 3] (pixel units, origin at the image
    centre, mapping output to input positions): reflect-pad, upsample 2x with sym6, bilinear
    grid_sample, downsample 2x with sym6 and crop (StyleGAN2-ADA / NVlabs/edm)."""
    N, C, H, W = images.shape
    dev, dt = images.device, images.dtype
    like = torch.empty((), dtype=torch.float64, device=dev)
    Hz = np.asarray(SYM6)
    Hz_pad = len(Hz) // 4

    # padding: enough to cover where the transformed corners land, plus the filter's reach
    cx, cy = (W - 1) / 2, (H - 1) / 2
    cp = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]],
                      dtype=torch.float64, device=dev)
    cp = G_inv @ cp.t()                                                  # [N, xyz, corner]
    margin = cp[:, :2, :].permute(1, 0, 2).flatten(1)                    # [xy, N * corner]
    margin = torch.cat([-margin, margin]).max(dim=1).values              # [x0, y0, x1, y1]
    margin = margin + torch.tensor([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, dtype=torch.float64, device=dev)
    margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, dtype=torch.float64, device=dev))
    mx0, my0, mx1, my1 = (int(m) for m in margin.ceil())
    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, like) @ G_inv

    # upsample 2x: zero insertion, then the (flipped) sym6 filter along each axis
    weight = torch.tensor(Hz[::-1].copy(), dtype=dt, device=dev)[None, None].repeat(C, 1, 1)
    pad = (len(Hz) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = F.conv2d(images, weight.unsqueeze(2), groups=C, padding=[0, pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    images = F.conv2d(images, weight.unsqueeze(3), groups=C, padding=[pad, 0])
    G_inv = scale2d(2, 2, like) @ G_inv @ scale2d(0.5, 0.5, like)
    G_inv = translate2d(-0.5, -0.5, like) @ G_inv @ translate2d(0.5, 0.5, like)

    # resample in normalised coordinates (align_corners=False)
    shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
    G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], like) @ G_inv
             @ scale2d(shape[3] / 2, shape[2] / 2, like))
    grid = F.affine_grid(G_inv[:, :2, :].to(dt), shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # downsample 2x with sym6 and crop to H x W
    weight = torch.tensor(Hz, dtype=dt, device=dev)[None, None].repeat(C, 1, 1)
    pad = (len(Hz) - 1) // 2
    images = F.conv2d(images, weight.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
    images = F.conv2d(images, weight.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
    return images

"""The UNet of ADM / Improved DDPM (openai/guided-diffusion's `UNetModel`).

Module names and parameter shapes follow guided-diffusion (input_blocks, middle_block,
output_blocks, time_embed, label_emb, out), so its checkpoints map onto this model one to one.
The timestep embedding enters each residual block either by addition (DDPM) or as AdaGN,
GroupNorm(h)·(1 + w) + b (ADM, `use_scale_shift_norm`). Attention is multi-head
self-attention through `scaled_dot_product_attention`, with guided-diffusion's ("legacy")
head layout of the qkv projection.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError


@dataclass
class UNetConfig:
    """Everything needed to rebuild the network (stored in a model directory's config.json)."""
    image_size: int = 28
    in_channels: int = 1
    model_channels: int = 32
    out_channels: int = 1
    num_res_blocks: int = 1
    attention_resolutions: Tuple[int, ...] = (14,)   # in pixels, e.g. (16, 8)
    channel_mult: Tuple[float, ...] = (1, 2, 2)   # integers, but ADM's 512x512 model starts at 0.5
    dropout: float = 0.0
    num_classes: Optional[int] = None
    num_heads: int = 1
    num_head_channels: int = -1   # if > 0, heads = channels // num_head_channels
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    conv_resample: bool = True
    norm_groups: int = 32
    augment_dim: int = 0   # length of EDM's augmentation label (9), 0: no augment conditioning
    null_class: bool = False   # one more label row, index num_classes: "no label" (label dropout)
    # the network embeds timestep_scale * t: 1000 / T for checkpoints trained with improved-
    # diffusion's rescale_timesteps (gaussdiff.interop.openai); gaussdiff's own models use 1
    timestep_scale: float = 1.0

    def __post_init__(self):
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.channel_mult = tuple(int(m) if float(m).is_integer() else float(m)
                                  for m in self.channel_mult)
        for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_heads",
                     "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"model option {name} must be positive, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise UsageError(f"num_classes must be positive or null, got {self.num_classes}")
        if self.num_heads_upsample != -1 and self.num_heads_upsample < 1:
            raise UsageError(f"num_heads_upsample must be -1 (= num_heads) or positive, "
                             f"got {self.num_heads_upsample}")
        if self.augment_dim < 0 or any(r < 0 for r in self.attention_resolutions):
            raise UsageError("augment_dim and attention_resolutions must be >= 0")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise UsageError(f"num_head_channels must be -1 (use num_heads) or positive, "
                             f"got {self.num_head_channels}")
        if not self.channel_mult or any(not 0 < m <= 1024 or int(m * self.model_channels)
                                        != m * self.model_channels for m in self.channel_mult):
            raise UsageError(f"channel_mult must be a non-empty list of positive multipliers "
                             f"giving whole channel counts, got {list(self.channel_mult)}")
        levels = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % levels:
            raise UsageError(f"image_size {self.image_size} is not divisible by {levels}, the "
                             f"downsampling factor of {len(self.channel_mult)} channel_mult levels")
        if not (math.isfinite(self.timestep_scale) and self.timestep_scale > 0):
            raise UsageError(f"timestep_scale must be positive, got {self.timestep_scale}")
        if self.num_res_blocks < 1:
            raise UsageError(f"num_res_blocks must be at least 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.null_class and self.num_classes is None:
            raise UsageError("null_class (label dropout) needs a class-conditional model (num_classes)")
        for level, mult in enumerate(self.channel_mult):
            ch = int(self.model_channels * mult)
            if ch % self.norm_groups:
                raise UsageError(f"channels {ch} (model_channels x channel_mult) must be a multiple "
                                 f"of norm_groups={self.norm_groups}")
            # heads of num_head_channels each, where there is attention (the middle block has it)
            attends = (self.image_size // 2 ** level in self.attention_resolutions
                       or level == len(self.channel_mult) - 1)
            if self.num_head_channels > 0 and attends and ch % self.num_head_channels:
                raise UsageError(f"channels {ch} must be a multiple of num_head_channels="
                                 f"{self.num_head_channels}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """The config of a config.json "model" section; unknown keys, values of the wrong
        JSON type and values out of range raise a one-line UsageError naming the key."""
        if not isinstance(d, dict):
            raise UsageError(f"the model config must be an object, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise UsageError(f"unknown model config keys: {', '.join(unknown)}")
        for key, value in d.items():
            _check_json_type(key, value, str(known[key].type))
        return cls(**d)


def _check_json_type(key: str, value, annotation: str):
    """Raise a UsageError unless `value` (from JSON) fits the field annotation."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)
    if annotation.startswith("Optional["):
        if value is None:
            return
        annotation = annotation[len("Optional["):-1]
    ok = {"int": is_int, "float": is_num, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str),
          "Tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(map(is_int, v)),
          "Tuple[float, ...]": lambda v: isinstance(v, (list, tuple)) and all(map(is_num, v)),
          }.get(annotation, lambda v: True)(value)
    if not ok:
        want = {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string", "Tuple[int, ...]": "a list of integers",
                "Tuple[float, ...]": "a list of numbers"}.get(annotation, annotation)
        text = repr(value)
        raise UsageError(f"model config key {key} must be {want}, got "
                         f"{text if len(text) <= 40 else text[:37] + '...'}")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (ADM: float32 for fp16 inputs; float64 stays float64)."""

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        return F.group_norm(x.to(dt), self.num_groups, w, b, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B]: cos then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            if getattr(layer, "grad_checkpoint", False) and torch.is_grad_enabled():
                # keep only the block's input; recompute its activations in the backward pass
                x = checkpoint(layer, *((x, emb) if isinstance(layer, TimestepBlock) else (x,)),
                               use_reentrant=False)
            else:
                x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv twice, the timestep embedding added (or AdaGN) in between."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, up=False, down=False, norm_groups=32):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(norm_groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:   # BigGAN-style: resample inside the residual branch and on the skip path
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm
                                 else self.out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)   # AdaGN
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, residual, output zero-initialised."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, norm_groups=32):
        super().__init__()
        self.channels = channels
        self.num_heads = channels // num_head_channels if num_head_channels > 0 else num_heads
        if channels % self.num_heads:
            raise UsageError(f"attention channels {channels} not divisible by {self.num_heads} heads")
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        L, heads = H * W, self.num_heads
        qkv = self.qkv(self.norm(x).reshape(B, C, L))
        # legacy layout: [B, heads * 3 * d, L] -> per head (q, k, v) blocks of d channels
        q, k, v = qkv.reshape(B, heads, 3, C // heads, L).transpose(-1, -2).unbind(2)
        h = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        h = h.transpose(-1, -2).reshape(B, C, L)
        return x + self.proj_out(h).reshape(B, C, H, W)


class UNetModel(nn.Module):
    """model(x [B, C, H, W], timesteps [B] long or float, y [B] long = None,
    augment_labels [B, augment_dim] = None) -> [B, out, H, W].

    y may also be float weights [B, K] over the K rows of the label embedding (K = num_classes,
    + 1 with null_class): the label embedding is then y @ label_emb.weight, which interpolates
    labels (ADM section H). With null_class, label num_classes means "no label" (the model's
    unconditional half, for classifier-free guidance)."""

    def __init__(self, config: UNetConfig, extra_in_channels: int = 0):
        super().__init__()
        self.config = c = config
        ted = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes + int(c.null_class), ted)
        if c.augment_dim:   # EDM's map_augment: added to the noise-level embedding, no bias
            self.augment_emb = nn.Linear(c.augment_dim, c.model_channels, bias=False)
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        G = c.norm_groups

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, ted, c.dropout, out_channels=ch_out,
                            use_scale_shift_norm=c.use_scale_shift_norm, norm_groups=G, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, c.num_head_channels, norm_groups=G)

        ch = input_ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            nn.Conv2d(c.in_channels + extra_in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, int(mult * c.model_channels))]
                ch = int(mult * c.model_channels)
                if c.image_size // ds in c.attention_resolutions:
                    layers.append(attn(ch, c.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, c.num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                skip = chans.pop()
                layers = [res(ch + skip, int(c.model_channels * mult))]
                ch = int(c.model_channels * mult)
                if c.image_size // ds in c.attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown
                                  else Upsample(ch, c.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, c.out_channels, 3, padding=1)))

    def forward(self, x, timesteps, y=None, augment_labels=None, **extra):
        """augment_labels: [B, augment_dim] from `gaussdiff.data.augment.AugmentPipe` while training;
        None (the same as zeros: no augmentation) when sampling."""
        c = self.config
        if (y is None) != (c.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        if c.timestep_scale != 1:
            timesteps = timesteps * c.timestep_scale
        emb = timestep_embedding(timesteps, c.model_channels).to(x.dtype)
        if augment_labels is not None:
            if not c.augment_dim:
                raise ValueError("augment_labels given, but the model was built with augment_dim=0")
            emb = emb + self.augment_emb(augment_labels.to(emb.dtype))
        emb = self.time_embed(emb)
        if y is not None:
            emb = emb + (y.to(emb.dtype) @ self.label_emb.weight.to(emb.dtype)
                         if y.is_floating_point() else self.label_emb(y))
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def set_grad_checkpointing(self, enabled: bool = True):
        """Gradient checkpointing per ResBlock and AttentionBlock: their activations are
        recomputed in the backward pass instead of stored (less memory, ~1/3 more compute);
        the gradients are unchanged (dropout masks are replayed)."""
        for m in self.modules():
            if isinstance(m, (ResBlock, AttentionBlock)):
                m.grad_checkpoint = bool(enabled)
        return self


class SuperResModel(UNetModel):
    """p(x_high | x_low, y): the upsampling stage of a cascade (Improved DDPM section 3,
    guided-diffusion's SuperResModel). The low-resolution image, bilinearly upsampled to x's
    size, enters as config.in_channels extra input channels.

    model(x [B, C, H, W], timesteps [B], low_res [B, C, h, w] in [-1, 1], y=None) -> [B, out, H, W].
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config, extra_in_channels=config.in_channels)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("the upsampling model needs the low-resolution image: pass low_res")
        upsampled = F.interpolate(low_res.to(x.dtype), x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)

"""ADM's noisy classifier: the downsampling half of the UNet (openai/guided-diffusion's
`EncoderUNetModel`).

The timestep-conditioned input blocks and middle block of `UNetModel`, then a head that pools
the [B, C, h, w] features into class logits. Module names and parameter shapes follow
guided-diffusion (time_embed, input_blocks, middle_block, out; out.2 is `AttentionPool2d` with
positional_embedding, qkv_proj and c_proj), so its classifier checkpoints map onto this model
one to one. The classifier is trained on x_t = q_sample(x_0, t) and called as
classifier(x_t, t) with ORIGINAL timestep indices, like the diffusion model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from .unet import (AttentionBlock, Downsample, GroupNorm32, ResBlock, TimestepEmbedSequential,
                   UNetConfig, timestep_embedding, zero_module)

POOLS = ("attention", "adaptive")


@dataclass
class EncoderConfig(UNetConfig):
    """UNetConfig's fields (out_channels = number of classes; num_classes, augment_dim and
    num_heads_upsample are unused) plus the pooling head: "attention" (ADM Table 12, CLIP-style
    attention pooling) or "adaptive" (global average pooling and a 1x1 conv)."""
    pool: str = "attention"

    def __post_init__(self):
        super().__post_init__()
        if self.pool not in POOLS:
            raise UsageError(f"unknown classifier pool {self.pool!r}: choose one of {', '.join(POOLS)}")


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP, ADM): the mean of the spatial tokens queries all tokens (itself
    included), with learned positional embeddings; returns [B, output_dim].

    The qkv projection is laid out as guided-diffusion's QKVAttention ("new" order): q, k, v are
    the three thirds of the channels, each split into heads."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        if embed_dim % num_heads:
            raise UsageError(f"attention pooling: {embed_dim} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads

    def forward(self, x):
        B, C = x.shape[:2]
        x = x.reshape(B, C, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)            # [B, C, 1 + HW]
        x = x + self.positional_embedding[None].to(x.dtype)
        L, heads = x.shape[-1], self.num_heads
        q, k, v = (t.reshape(B, heads, C // heads, L).transpose(-1, -2)
                   for t in self.qkv_proj(x).chunk(3, dim=1))
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, L)
        return self.c_proj(h)[:, :, 0]


class EncoderUNetModel(nn.Module):
    """classifier(x [B, C, H, W], timesteps [B] long or float) -> logits [B, out_channels]."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        ted = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        G = c.norm_groups

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, ted, c.dropout, out_channels=ch_out,
                            use_scale_shift_norm=c.use_scale_shift_norm, norm_groups=G, **kw)

        def attn(ch):
            return AttentionBlock(ch, c.num_heads, c.num_head_channels, norm_groups=G)

        ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, int(mult * c.model_channels))]
                ch = int(mult * c.model_channels)
                if c.image_size // ds in c.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        if c.pool == "attention":
            heads = ch // c.num_head_channels if c.num_head_channels > 0 else c.num_heads
            head = AttentionPool2d(c.image_size // ds, ch, heads, c.out_channels)
            self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(), head)
        else:
            self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(nn.Conv2d(ch, c.out_channels, 1)), nn.Flatten())

    def forward(self, x, timesteps, **unused):
        """unused: the diffusion model's conditioning kwargs (y, low_res ...) are ignored."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))

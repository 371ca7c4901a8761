"""The ADM UNet written the plain way: the baseline that bench/throughput.py measures gaussdiff
against.

Same architecture, parameter names and shapes as gaussdiff.nn.unet.UNetModel (a state dict
loads into either), hence the same FLOPs and the same outputs up to rounding, but written as a
straightforward first implementation would be (and as openai/improved-diffusion is): NCHW
tensors, nn.GroupNorm followed by a separate nn.SiLU, and attention computed by hand as
softmax(QK^T / sqrt(d)) V with explicit matrix products, the full L x L weight matrix
materialised, its softmax in float32 (improved-diffusion's QKVAttentionLegacy). No fused
kernels, no memory-format tricks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gaussdiff.nn.unet import timestep_embedding   # [B, dim] sinusoids: not what is compared


class Block(nn.Sequential):
    """Runs its layers in order, giving the timestep embedding to those that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch, dropout, scale_shift, groups):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch, heads, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))              # [B, 3C, L]
        d = C // self.heads
        q, k, v = qkv.reshape(B * self.heads, 3 * d, H * W).split(d, dim=1)   # [BH, d, L] each
        scale = 1 / math.sqrt(math.sqrt(d))
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)    # [BH, L, L]
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.bmm(v, weight.transpose(1, 2))                       # [BH, d, L]
        return x + self.proj_out(h.reshape(B, C, H * W)).reshape(B, C, H, W)


class ReferenceUNet(nn.Module):
    """model(x [B, C, H, W], t [B]) for a gaussdiff UNetConfig without class or augmentation
    conditioning, resblock_updown=False, conv resampling."""

    def __init__(self, c):
        super().__init__()
        assert c.num_classes is None and not c.augment_dim and not c.resblock_updown and c.conv_resample
        self.model_channels = mc = c.model_channels
        ted, G = 4 * mc, c.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        def heads_of(ch, heads):
            return ch // c.num_head_channels if c.num_head_channels > 0 else heads

        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        ch = input_ch = c.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, c.dropout, c.use_scale_shift_norm, G)]
                ch = mult * mc
                if c.image_size // ds in c.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads_of(ch, c.num_heads), G))
                self.input_blocks.append(Block(*layers))
                chans.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = Block(ResBlock(ch, ted, ch, c.dropout, c.use_scale_shift_norm, G),
                                  AttentionBlock(ch, heads_of(ch, c.num_heads), G),
                                  ResBlock(ch, ted, ch, c.dropout, c.use_scale_shift_norm, G))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult, c.dropout, c.use_scale_shift_norm, G)]
                ch = mc * mult
                if c.image_size // ds in c.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads_of(ch, heads_up), G))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(nn.GroupNorm(G, ch), nn.SiLU(), nn.Conv2d(input_ch, c.out_channels, 3, padding=1))

    def forward(self, x, timesteps, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

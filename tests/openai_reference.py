"""An independent, functional re-implementation of the forward pass of openai/guided-diffusion's
`UNetModel`, `SuperResModel` and `EncoderUNetModel` (and improved-diffusion's `UNetModel`, the
same network without resblock_updown and with the legacy attention only), reading the original
state-dict keys directly.

The original code cannot be downloaded here, so test_convert.py checks `gaussdiff
convert-openai` against this file: random weights are laid out under the original names
(`param_shapes`), saved as a .pt state dict, converted, and the converted gaussdiff model must
reproduce `forward` below. Nothing here imports gaussdiff. The architecture is described in the
original constructors' own terms: `attention_ds` holds downsampling RATES (the scripts'
image_size // res), `channel_mult` the multipliers.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def arch(image_size, model_channels, num_res_blocks, attention_ds, channel_mult, *,
         in_channels=3, out_channels=3, num_classes=None, num_heads=1, num_head_channels=-1,
         num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
         new_attention_order=False, kind="unet", pool="attention"):
    """The constructor arguments of the original classes (kind: unet, superres, encoder).
    SuperResModel doubles in_channels itself, as the original does."""
    return dict(image_size=image_size, model_channels=model_channels, num_res_blocks=num_res_blocks,
                attention_ds=set(attention_ds), channel_mult=tuple(channel_mult),
                in_channels=in_channels * (2 if kind == "superres" else 1),
                out_channels=out_channels, num_classes=num_classes, num_heads=num_heads,
                num_head_channels=num_head_channels,
                num_heads_upsample=num_heads if num_heads_upsample == -1 else num_heads_upsample,
                use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                new_attention_order=new_attention_order, kind=kind, pool=pool)


def _heads(ch, a, upsample=False):
    if a["num_head_channels"] != -1:
        assert ch % a["num_head_channels"] == 0
        return ch // a["num_head_channels"]
    return a["num_heads_upsample"] if upsample else a["num_heads"]


def layout(a) -> Dict[str, list]:
    """Blocks as lists of layers: ("conv", cin, cout), ("res", cin, cout, updown),
    ("attn", ch, heads), ("down", ch), ("up", ch); plus "out" channels and the final ds."""
    mc = a["model_channels"]
    ch = input_ch = int(a["channel_mult"][0] * mc)
    inputs = [[("conv", a["in_channels"], ch)]]
    chans, ds = [ch], 1
    for level, mult in enumerate(a["channel_mult"]):
        for _ in range(a["num_res_blocks"]):
            layers = [("res", ch, int(mult * mc), None)]
            ch = int(mult * mc)
            if ds in a["attention_ds"]:
                layers.append(("attn", ch, _heads(ch, a)))
            inputs.append(layers)
            chans.append(ch)
        if level != len(a["channel_mult"]) - 1:
            inputs.append([("res", ch, ch, "down")] if a["resblock_updown"] else [("down", ch)])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, None), ("attn", ch, _heads(ch, a)), ("res", ch, ch, None)]
    outputs = []
    if a["kind"] != "encoder":
        for level, mult in list(enumerate(a["channel_mult"]))[::-1]:
            for i in range(a["num_res_blocks"] + 1):
                skip = chans.pop()
                layers = [("res", ch + skip, int(mc * mult), None)]
                ch = int(mc * mult)
                if ds in a["attention_ds"]:
                    layers.append(("attn", ch, _heads(ch, a, upsample=True)))
                if level and i == a["num_res_blocks"]:
                    layers.append(("res", ch, ch, "up") if a["resblock_updown"] else ("up", ch))
                    ds //= 2
                outputs.append(layers)
    return dict(input_blocks=inputs, middle_block=middle, output_blocks=outputs, ch=ch,
                input_ch=input_ch, ds=ds)


def param_shapes(a) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of the original network: name -> shape."""
    mc, ted = a["model_channels"], a["model_channels"] * 4
    P = {"time_embed.0.weight": (ted, mc), "time_embed.0.bias": (ted,),
         "time_embed.2.weight": (ted, ted), "time_embed.2.bias": (ted,)}
    if a["num_classes"] is not None and a["kind"] != "encoder":
        P["label_emb.weight"] = (a["num_classes"], ted)

    def layer(prefix, spec):
        kind = spec[0]
        if kind == "conv":
            P[f"{prefix}.weight"] = (spec[2], spec[1], 3, 3)
            P[f"{prefix}.bias"] = (spec[2],)
        elif kind == "res":
            cin, cout = spec[1], spec[2]
            P[f"{prefix}.in_layers.0.weight"] = P[f"{prefix}.in_layers.0.bias"] = (cin,)
            P[f"{prefix}.in_layers.2.weight"] = (cout, cin, 3, 3)
            P[f"{prefix}.in_layers.2.bias"] = (cout,)
            e = 2 * cout if a["use_scale_shift_norm"] else cout
            P[f"{prefix}.emb_layers.1.weight"] = (e, ted)
            P[f"{prefix}.emb_layers.1.bias"] = (e,)
            P[f"{prefix}.out_layers.0.weight"] = P[f"{prefix}.out_layers.0.bias"] = (cout,)
            P[f"{prefix}.out_layers.3.weight"] = (cout, cout, 3, 3)
            P[f"{prefix}.out_layers.3.bias"] = (cout,)
            if cin != cout:
                P[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
                P[f"{prefix}.skip_connection.bias"] = (cout,)
        elif kind == "attn":
            c = spec[1]
            P[f"{prefix}.norm.weight"] = P[f"{prefix}.norm.bias"] = (c,)
            P[f"{prefix}.qkv.weight"] = (3 * c, c, 1)
            P[f"{prefix}.qkv.bias"] = (3 * c,)
            P[f"{prefix}.proj_out.weight"] = (c, c, 1)
            P[f"{prefix}.proj_out.bias"] = (c,)
        elif kind == "down":
            P[f"{prefix}.op.weight"] = (spec[1], spec[1], 3, 3)
            P[f"{prefix}.op.bias"] = (spec[1],)
        elif kind == "up":
            P[f"{prefix}.conv.weight"] = (spec[1], spec[1], 3, 3)
            P[f"{prefix}.conv.bias"] = (spec[1],)

    L = layout(a)
    for name in ("input_blocks", "output_blocks"):
        for i, block in enumerate(L[name]):
            for j, spec in enumerate(block):
                layer(f"{name}.{i}.{j}", spec)
    for j, spec in enumerate(L["middle_block"]):
        layer(f"middle_block.{j}", spec)
    ch = L["ch"]
    P["out.0.weight"] = P["out.0.bias"] = (ch,)
    if a["kind"] != "encoder":
        P["out.2.weight"] = (a["out_channels"], L["input_ch"], 3, 3)
        P["out.2.bias"] = (a["out_channels"],)
    elif a["pool"] == "attention":
        side = a["image_size"] // L["ds"]
        P["out.2.positional_embedding"] = (ch, side * side + 1)
        P["out.2.qkv_proj.weight"] = (3 * ch, ch, 1)
        P["out.2.qkv_proj.bias"] = (3 * ch,)
        P["out.2.c_proj.weight"] = (a["out_channels"], ch, 1)
        P["out.2.c_proj.bias"] = (a["out_channels"],)
    else:   # adaptive
        P["out.3.weight"] = (a["out_channels"], ch, 1, 1)
        P["out.3.bias"] = (a["out_channels"],)
    return P


def random_state(a, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights for every parameter (none zero, unlike the originals' zero-initialised
    output convolutions), scaled so that activations stay of order one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in param_shapes(a).items():
        if name.endswith("positional_embedding"):
            t = torch.randn(shape, generator=g) / shape[0] ** 0.5
        elif len(shape) == 1 and name.endswith("weight"):   # GroupNorm scales
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.1 * torch.randn(shape, generator=g)
        elif name == "label_emb.weight":
            t = torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        out[name] = t
    return out


# ------------------------------------------------------------------------------ forward
def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _gn(x, S, p):
    return F.group_norm(x.float(), 32, S[f"{p}.weight"], S[f"{p}.bias"], 1e-5).type(x.dtype)


def _qkv_legacy(qkv, n_heads):
    """QKVAttentionLegacy (improved-diffusion's QKVAttention): per head [q k v] blocks."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


def _qkv_new(qkv, n_heads):
    """guided-diffusion's QKVAttention: [q | k | v], each split into heads."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", (q * scale).view(bs * n_heads, ch, length),
                     (k * scale).view(bs * n_heads, ch, length))
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    a = torch.einsum("bts,bcs->bct", w, v.reshape(bs * n_heads, ch, length))
    return a.reshape(bs, -1, length)


def _layer(x, emb, S, p, spec, a):
    kind = spec[0]
    if kind == "conv":
        return F.conv2d(x, S[f"{p}.weight"], S[f"{p}.bias"], padding=1)
    if kind == "down":
        return F.conv2d(x, S[f"{p}.op.weight"], S[f"{p}.op.bias"], stride=2, padding=1)
    if kind == "up":
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.conv2d(x, S[f"{p}.conv.weight"], S[f"{p}.conv.bias"], padding=1)
    if kind == "attn":
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = F.conv1d(_gn(flat, S, f"{p}.norm"), S[f"{p}.qkv.weight"], S[f"{p}.qkv.bias"])
        h = (_qkv_new if a["new_attention_order"] else _qkv_legacy)(qkv, spec[2])
        h = F.conv1d(h, S[f"{p}.proj_out.weight"], S[f"{p}.proj_out.bias"])
        return (flat + h).reshape(b, c, *spatial)
    # ResBlock
    updown = spec[3]
    h = F.silu(_gn(x, S, f"{p}.in_layers.0"))
    if updown == "up":
        h, x = (F.interpolate(v, scale_factor=2, mode="nearest") for v in (h, x))
    elif updown == "down":
        h, x = (F.avg_pool2d(v, 2, 2) for v in (h, x))
    h = F.conv2d(h, S[f"{p}.in_layers.2.weight"], S[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), S[f"{p}.emb_layers.1.weight"], S[f"{p}.emb_layers.1.bias"])
    e = e.type(h.dtype)[..., None, None]
    if a["use_scale_shift_norm"]:
        scale, shift = torch.chunk(e, 2, dim=1)
        h = _gn(h, S, f"{p}.out_layers.0") * (1 + scale) + shift
        h = F.silu(h)
    else:
        h = F.silu(_gn(h + e, S, f"{p}.out_layers.0"))
    h = F.conv2d(h, S[f"{p}.out_layers.3.weight"], S[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in S:
        x = F.conv2d(x, S[f"{p}.skip_connection.weight"], S[f"{p}.skip_connection.bias"])
    return x + h


def _block(x, emb, S, prefix, layers, a):
    for j, spec in enumerate(layers):
        x = _layer(x, emb, S, f"{prefix}.{j}", spec, a)
    return x


@torch.no_grad()
def forward(S, a, x, timesteps, y=None, low_res=None):
    """The original network's output for x [B, C, H, W] and the timesteps it is GIVEN (after
    the scripts' rescaling, if any); y: labels; low_res: the super-resolution condition."""
    if a["kind"] == "superres":
        up = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        x = torch.cat([x, up], dim=1)
    emb = timestep_embedding(timesteps, a["model_channels"])
    emb = F.linear(F.silu(F.linear(emb, S["time_embed.0.weight"], S["time_embed.0.bias"])),
                   S["time_embed.2.weight"], S["time_embed.2.bias"])
    if y is not None:
        emb = emb + S["label_emb.weight"][y]
    L = layout(a)
    hs, h = [], x
    for i, layers in enumerate(L["input_blocks"]):
        h = _block(h, emb, S, f"input_blocks.{i}", layers, a)
        hs.append(h)
    h = _block(h, emb, S, "middle_block", L["middle_block"], a)
    if a["kind"] == "encoder":
        h = F.silu(_gn(h, S, "out.0"))
        if a["pool"] == "adaptive":
            h = F.adaptive_avg_pool2d(h, 1)
            return F.conv2d(h, S["out.3.weight"], S["out.3.bias"]).flatten(1)
        b, c = h.shape[:2]
        h = h.reshape(b, c, -1)
        h = torch.cat([h.mean(dim=-1, keepdim=True), h], dim=-1)
        h = h + S["out.2.positional_embedding"][None].to(h.dtype)
        h = F.conv1d(h, S["out.2.qkv_proj.weight"], S["out.2.qkv_proj.bias"])
        h = _qkv_new(h, c // a["num_head_channels"])
        h = F.conv1d(h, S["out.2.c_proj.weight"], S["out.2.c_proj.bias"])
        return h[:, :, 0]
    for i, layers in enumerate(L["output_blocks"]):
        h = torch.cat([h, hs.pop()], dim=1)
        h = _block(h, emb, S, f"output_blocks.{i}", layers, a)
    h = F.silu(_gn(h, S, "out.0"))
    return F.conv2d(h, S["out.2.weight"], S["out.2.bias"], padding=1)

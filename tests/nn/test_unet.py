"""The ADM UNet (guided-diffusion's UNetModel) and per-seed sampling through a Pipeline."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from gaussdiff import make_diffusion
from gaussdiff.modeldir import Pipeline
from gaussdiff.nn.unet import AttentionBlock, ResBlock, UNetConfig, UNetModel, timestep_embedding

F64 = torch.float64


def tiny_config(**kw):
    base = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                attention_resolutions=(4,), channel_mult=(1, 2), num_heads=1)
    base.update(kw)
    return UNetConfig(**base)


def randomize(model: nn.Module, seed=0):
    """Give every weight a non-zero random value (the zero-initialised layers too), so that every
    path of the network affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)):
                fan_in = m.weight[0].numel() if not isinstance(m, nn.Embedding) else 1
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def test_output_shape_and_zero_init():
    """Output is [B, out_channels, H, W] (C, or 2C for a learned variance) and, with the final
    convolution zero-initialised (ADM), exactly zero at initialisation."""
    torch.manual_seed(0)
    for out_ch in (3, 6):
        model = UNetModel(tiny_config(out_channels=out_ch))
        x = torch.randn(2, 3, 8, 8)
        y = model(x, torch.tensor([0, 999]))
        assert y.shape == (2, out_ch, 8, 8)
        assert torch.all(y == 0)


def test_state_dict_layout_follows_guided_diffusion():
    """Parameter names and shapes are guided-diffusion's for the same configuration (worked out
    by hand from its UNetModel), so its checkpoints load one to one."""
    model = UNetModel(tiny_config(out_channels=6, num_classes=3))
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "time_embed.0.weight": (128, 32), "time_embed.2.weight": (128, 128),
        "label_emb.weight": (3, 128),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (32,), "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),          # AdaGN: scale and shift
        "input_blocks.1.0.out_layers.0.weight": (32,), "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),                # strided-conv Downsample
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.norm.weight": (64,), "input_blocks.3.1.qkv.weight": (192, 64, 1),
        "input_blocks.3.1.proj_out.weight": (64, 64, 1),
        "middle_block.0.in_layers.2.weight": (64, 64, 3, 3), "middle_block.1.qkv.weight": (192, 64, 1),
        "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        "output_blocks.0.0.in_layers.0.weight": (128,), "output_blocks.0.0.skip_connection.weight": (64, 128, 1, 1),
        "output_blocks.0.1.qkv.weight": (192, 64, 1),
        "output_blocks.1.0.in_layers.2.weight": (64, 96, 3, 3), "output_blocks.1.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.2.0.skip_connection.weight": (32, 96, 1, 1),
        "output_blocks.3.0.skip_connection.weight": (32, 64, 1, 1),
        "out.0.weight": (32,), "out.2.weight": (6, 32, 3, 3),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, k
    assert len(model.input_blocks) == 4 and len(model.output_blocks) == 4
    assert not any(k.startswith("output_blocks.4") or k.startswith("input_blocks.4") for k in sd)


def test_timestep_embedding_formula():
    """timestep_embedding = [cos(t·f_i), sin(t·f_i)], f_i = 10000^(-i/half) (guided-diffusion)."""
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    emb = timestep_embedding(t, 8)
    f = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    ref = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)


def reference_legacy_attention(block: AttentionBlock, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """guided-diffusion's AttentionBlock with QKVAttentionLegacy, written out with einsum:
    qkv [B, 3C, L] -> [B·heads, 3·ch, L] split into q, k, v of ch channels each."""
    b, c, h, w = x.shape
    xf = x.reshape(b, c, h * w)
    qkv = block.qkv(block.norm(xf))
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    return (xf + block.proj_out(a)).reshape(b, c, h, w)


@pytest.mark.parametrize("heads_kw, n_heads", [(dict(num_heads=1), 1), (dict(num_heads=4), 4),
                                               (dict(num_head_channels=16), 4),
                                               (dict(num_head_channels=32), 2)])
def test_attention_block_equals_legacy_qkv_attention(heads_kw, n_heads):
    """AttentionBlock(x) equals guided-diffusion's QKVAttentionLegacy (einsum reference) in float64,
    for heads given as num_heads or as num_head_channels (heads = C / num_head_channels)."""
    torch.manual_seed(1)
    block = AttentionBlock(64, **heads_kw).double()
    assert block.num_heads == n_heads
    randomize(block, seed=2)
    x = torch.randn(2, 64, 3, 5, dtype=F64)
    torch.testing.assert_close(block(x), reference_legacy_attention(block, x, n_heads), rtol=1e-10, atol=1e-10)


def test_attention_head_layouts_in_unet():
    """num_heads gives that many heads everywhere (num_heads_upsample in the decoder);
    num_head_channels > 0 gives channels / num_head_channels heads per block."""
    def heads(model, prefix):
        return [m.num_heads for name, m in model.named_modules()
                if isinstance(m, AttentionBlock) and name.startswith(prefix)]
    m = UNetModel(tiny_config(num_heads=4, num_heads_upsample=2))
    assert heads(m, "input_blocks") == [4] and heads(m, "middle_block") == [4]
    assert heads(m, "output_blocks") == [2, 2]
    m = UNetModel(tiny_config(attention_resolutions=(8, 4), num_head_channels=16))
    assert heads(m, "input_blocks") == [2, 4] and heads(m, "middle_block") == [4]
    assert heads(m, "output_blocks") == [4, 4, 2, 2]


def test_class_conditional_path():
    """The label enters as emb = time_embed(t) + label_emb(y): with label_emb[k] = 0, the conditional
    model at y = k equals the unconditional model with the same other weights; labels change the
    output; y is required exactly when the model is class-conditional."""
    torch.manual_seed(3)
    cond = randomize(UNetModel(tiny_config(num_classes=3)), seed=4)
    uncond = UNetModel(tiny_config())
    uncond.load_state_dict({k: v for k, v in cond.state_dict().items() if k != "label_emb.weight"})
    with torch.no_grad():
        cond.label_emb.weight[1] = 0
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t, y=torch.tensor([1, 1])), uncond(x, t), rtol=1e-5, atol=1e-5)
        a, b = cond(x, t, y=torch.tensor([0, 2])), cond(x, t, y=torch.tensor([2, 0]))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError):
        cond(x, t)
    with pytest.raises(ValueError):
        uncond(x, t, y=torch.tensor([0, 1]))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_timestep_conditioning(scale_shift):
    """ResBlock(x, emb) = skip(x) + conv(dropout(SiLU(n(h)))), h = conv(SiLU(GN(x))), with
    n(h) = GN(h)·(1 + w) + b, [w, b] = Linear(SiLU(emb)) (AdaGN, Improved DDPM / ADM) or
    n(h) = GN(h + Linear(SiLU(emb))) (DDPM), written out with torch.nn.functional."""
    import torch.nn.functional as F
    torch.manual_seed(8)
    block = randomize(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=scale_shift).double(), seed=9)
    x, emb = torch.randn(2, 32, 4, 4, dtype=F64), torch.randn(2, 16, dtype=F64)
    gn1, conv1 = block.in_layers[0], block.in_layers[2]
    gn2, conv2 = block.out_layers[0], block.out_layers[3]
    lin = block.emb_layers[1]
    h = F.conv2d(F.silu(F.group_norm(x, 32, gn1.weight, gn1.bias, 1e-5)), conv1.weight, conv1.bias, padding=1)
    e = F.linear(F.silu(emb), lin.weight, lin.bias)[:, :, None, None]
    if scale_shift:
        w, b = e[:, :64], e[:, 64:]
        h = F.group_norm(h, 32, gn2.weight, gn2.bias, 1e-5) * (1 + w) + b
    else:
        h = F.group_norm(h + e, 32, gn2.weight, gn2.bias, 1e-5)
    h = F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1)
    skip = F.conv2d(x, block.skip_connection.weight, block.skip_connection.bias)
    torch.testing.assert_close(block(x, emb), skip + h, rtol=1e-10, atol=1e-10)


def test_resblock_updown():
    """resblock_updown (BigGAN-style): a down ResBlock halves H and W and, with its residual branch
    zero-initialised, equals 2x2 average pooling; an up ResBlock equals nearest upsampling. The
    UNet built with them keeps the [B, C, H, W] shape."""
    torch.manual_seed(5)
    x, emb = torch.randn(2, 32, 8, 8, dtype=F64), torch.randn(2, 128, dtype=F64)
    down = ResBlock(32, 128, 0.0, down=True, use_scale_shift_norm=True).double()
    up = ResBlock(32, 128, 0.0, up=True, use_scale_shift_norm=True).double()
    torch.testing.assert_close(down(x, emb), nn.functional.avg_pool2d(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(up(x, emb), nn.functional.interpolate(x, scale_factor=2), rtol=0, atol=0)
    randomize(down)
    assert down(x, emb).shape == (2, 32, 4, 4)
    m = UNetModel(tiny_config(resblock_updown=True, out_channels=6))
    assert isinstance(m.input_blocks[2][0], ResBlock) and m.input_blocks[2][0].updown
    assert isinstance(m.output_blocks[1][-1], ResBlock) and m.output_blocks[1][-1].updown
    randomize(m)
    with torch.no_grad():
        assert m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 6, 8, 8)


def test_unet_runs_in_float64_and_depends_on_timestep():
    """A randomised UNet is a function of (x, t): different t give different outputs, and it runs
    in float64 (as the float64 samplers need)."""
    m = randomize(UNetModel(tiny_config(use_scale_shift_norm=False))).double()
    x = torch.randn(1, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        a, b = m(x, torch.tensor([3])), m(x, torch.tensor([600]))
    assert a.dtype == F64 and (a - b).abs().max() > 1e-3


# --------------------------------------------------------------------------------- Pipeline
def tiny_pipeline(num_classes=None):
    torch.manual_seed(6)
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=32, out_channels=2, channel_mult=(1,),
                     attention_resolutions=(), num_classes=num_classes)
    model = randomize(UNetModel(cfg), seed=7)
    with torch.no_grad():
        model.out[2].weight.mul_(0.1)
    diffusion = dict(schedule="linear", steps=100, mean_type="eps", var_type="learned_range",
                     loss_type="hybrid", hybrid_lambda=0.001, vb_stop_grad=True)
    config = {"model": cfg.to_dict(), "diffusion": diffusion, "data": {"channels": 1, "image_size": 8}}
    return Pipeline(model, make_diffusion(**diffusion), config)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_pipeline_per_seed_reproducibility(sampler, eta):
    """Image i depends only on (seed, i) (NVlabs/edm): the same images for batch sizes 1, 2 and 4,
    and image i of a run equals image 0 of a run started at index i; another seed differs."""
    pipe = tiny_pipeline(num_classes=3)
    kw = dict(sampler=sampler, steps=4, eta=eta, seed=11, progress=False)
    ref, ref_y = pipe.sample(4, batch_size=4, **kw)
    assert ref.dtype == np.uint8 and ref.shape == (4, 8, 8, 1) and ref_y.shape == (4,)
    for bs in (1, 3):
        imgs, ys = pipe.sample(4, batch_size=bs, **kw)
        np.testing.assert_array_equal(imgs, ref)
        np.testing.assert_array_equal(ys, ref_y)
    imgs, ys = pipe.sample(1, batch_size=1, start_index=2, **kw)
    np.testing.assert_array_equal(imgs[0], ref[2])
    assert ys[0] == ref_y[2]
    other, _ = pipe.sample(4, batch_size=4, **dict(kw, seed=12))
    assert np.any(other != ref)
    assert len({im.tobytes() for im in ref}) == 4      # images in a batch differ from each other

"""Named training presets: the papers' settings and small CPU settings. Any flag overrides them.

Keys are `gaussdiff train` option names (dest form). The papers' values:
- ddpm-cifar10: DDPM App. B (35.7M params, linear T=1000, ε, fixed_large, L_simple, lr 2e-4,
  batch 128, dropout 0.1, attention at 16, EMA 0.9999, flips).
- iddpm-cifar10-hybrid: Improved DDPM (cosine T=4000, learned_range, L_hybrid, 3 blocks,
  attention at 16 and 8 with 4 heads, dropout 0.3, lr 1e-4, batch 128).
- adm-imagenet64: ADM Table 11-12 (192 ch, mult 1,2,3,4, 3 blocks, attention at 32,16,8 with 64
  channels per head, BigGAN up/down, AdaGN, cosine T=1000, learned_range, L_hybrid, dropout 0.1,
  lr 1e-4, batch 2048, class-conditional).
- fashion-small: the bundled Fashion-MNIST model, sized for a 2-core CPU: Improved DDPM's recipe
  (cosine T=1000, learned_range, L_hybrid) with v-prediction and an EMA warm-up (the ε-model's
  probability-flow ODE saturated at this budget: README, "The bundled model").
"""
from ..errors import UsageError

PRESETS = {
    "fashion-small": dict(
        data="fashion-mnist", image_size=28, channels=1, model_channels=32, channel_mult="1,2,2",
        num_res_blocks=1, attention_resolutions="14", num_heads=1, num_head_channels=-1, dropout=0.0,
        use_scale_shift_norm=True, resblock_updown=False, schedule="cosine", diffusion_steps=1000,
        mean_type="v", var_type="learned_range", loss="hybrid", batch_size=64, lr=5e-4,
        warmup=200, ema="0.999,0.9999", ema_warmup=True, flip=False),
    "ddpm-cifar10": dict(
        image_size=32, channels=3, model_channels=128, channel_mult="1,2,2,2", num_res_blocks=2,
        attention_resolutions="16", num_heads=1, num_head_channels=-1, dropout=0.1,
        use_scale_shift_norm=False, resblock_updown=False, schedule="linear", diffusion_steps=1000,
        mean_type="eps", var_type="fixed_large", loss="mse", batch_size=128, lr=2e-4, warmup=5000,
        ema="0.9999", flip=True),
    "iddpm-cifar10-hybrid": dict(
        image_size=32, channels=3, model_channels=128, channel_mult="1,2,2,2", num_res_blocks=3,
        attention_resolutions="16,8", num_heads=4, num_head_channels=-1, dropout=0.3,
        use_scale_shift_norm=True, resblock_updown=False, schedule="cosine", diffusion_steps=4000,
        mean_type="eps", var_type="learned_range", loss="hybrid", batch_size=128, lr=1e-4, warmup=0,
        ema="0.9999", flip=True),
    "adm-imagenet64": dict(
        image_size=64, channels=3, model_channels=192, channel_mult="1,2,3,4", num_res_blocks=3,
        attention_resolutions="32,16,8", num_heads=4, num_head_channels=64, dropout=0.1,
        use_scale_shift_norm=True, resblock_updown=True, schedule="cosine", diffusion_steps=1000,
        mean_type="eps", var_type="learned_range", loss="hybrid", batch_size=2048, lr=1e-4, warmup=0,
        ema="0.9999", flip=True, class_cond=True),
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])

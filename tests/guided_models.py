"""Tiny randomised model and classifier directories for test_guidance.py and test_tools.py
(no training: random weights, so that every output depends on its inputs)."""
import torch

from gaussdiff.modeldir import CONFIG_NAME, WEIGHTS_NAME, atomic_write_json, make_config, save_tensors
from gaussdiff.nn.encoder import EncoderConfig, EncoderUNetModel
from gaussdiff.nn.unet import SuperResModel, UNetConfig, UNetModel

T = 100
NUM_CLASSES = 3


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_model_dir(path, image_size=8, num_classes=NUM_CLASSES, null_class=False,
                   var_type="learned_range", low_res=None, seed=0):
    """A UNet model directory (ε, linear T = 100); low_res: an upsampler from that size."""
    cfg = UNetConfig(image_size=image_size, in_channels=1, model_channels=16,
                     out_channels=2 if var_type.startswith("learned") else 1, channel_mult=(1,),
                     attention_resolutions=(), norm_groups=8, num_classes=num_classes,
                     null_class=null_class)
    model = _randomise((SuperResModel if low_res else UNetModel)(cfg), seed)
    diffusion = dict(schedule="linear", steps=T, mean_type="eps", var_type=var_type,
                     loss_type="mse", hybrid_lambda=0.001, vb_stop_grad=True)
    config = make_config(cfg, diffusion, {"channels": 1, "image_size": image_size})
    if low_res:
        config["task"] = {"type": "upsample", "low_res": low_res}
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(str(path / WEIGHTS_NAME), model.state_dict())
    atomic_write_json(str(path / CONFIG_NAME), config)
    return str(path)


def make_classifier_dir(path, image_size=8, num_classes=NUM_CLASSES, seed=1):
    """A noisy-classifier directory (attention pooling) on the same linear T = 100 schedule."""
    cfg = EncoderConfig(image_size=image_size, in_channels=1, model_channels=16,
                        out_channels=num_classes, channel_mult=(1, 1), attention_resolutions=(4,),
                        num_head_channels=8, norm_groups=8, resblock_updown=True)
    model = _randomise(EncoderUNetModel(cfg), seed)
    diffusion = dict(schedule="linear", steps=T, mean_type="eps", var_type="fixed_small",
                     loss_type="mse", hybrid_lambda=0.001, vb_stop_grad=True)
    config = make_config(cfg, diffusion, {"channels": 1, "image_size": image_size})
    config["kind"] = "classifier"
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(str(path / WEIGHTS_NAME), model.state_dict())
    atomic_write_json(str(path / CONFIG_NAME), config)
    return str(path)

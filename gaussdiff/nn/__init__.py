from .unet import UNetModel, UNetConfig  # noqa: F401

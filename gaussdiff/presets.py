"""Moved to gaussdiff.training.presets; this alias keeps old imports working."""
import sys

from .training import presets as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.training.checkpoint; this alias keeps old imports working."""
import sys

from .training import checkpoint as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.training.batch_size; this alias keeps old imports working."""
import sys

from .training import batch_size as _m

sys.modules[__name__] = _m

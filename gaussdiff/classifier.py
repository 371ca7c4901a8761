"""Moved to gaussdiff.training.classifier; this alias keeps old imports working."""
import sys

from .training import classifier as _m

sys.modules[__name__] = _m

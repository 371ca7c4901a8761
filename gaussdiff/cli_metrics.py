"""Moved to gaussdiff.cli.metrics; this alias keeps old imports working."""
import sys

from .cli import metrics as _m

sys.modules[__name__] = _m

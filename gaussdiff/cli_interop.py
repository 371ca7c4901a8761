"""Moved to gaussdiff.cli.interop; this alias keeps old imports working."""
import sys

from .cli import interop as _m

sys.modules[__name__] = _m

"""Moved to gaussdiff.cli.common; this alias keeps old imports working."""
import sys

from .cli import common as _m

sys.modules[__name__] = _m

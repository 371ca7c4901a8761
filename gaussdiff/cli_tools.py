"""Moved to gaussdiff.cli.tools; this alias keeps old imports working."""
import sys

from .cli import tools as _m

sys.modules[__name__] = _m

"""The package version (a leaf module: config files and --version read it)."""
__version__ = "0.1.0"

"""The one exception type that reaches the user as a one-line message and exit status 2."""


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a value). The CLI prints it on one line."""

"""Errors that end a command with a one-line message instead of a traceback."""


class ReflectEvoError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero."""


class ModelLoadError(ReflectEvoError, ValueError):
    """A model directory, file or config that cannot be loaded (the message names the path)."""

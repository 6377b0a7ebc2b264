"""The one base class of every error boxprobe raises for bad input or state."""


class BoxprobeError(Exception):
    """Every error the library raises for bad input or state; the CLI prints its message as one line."""

"""The error a bad weights file or folder raises (here, not in weights.py, so modules without torch can raise it)."""


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded; the message names the file and what is wrong."""

"""The one user-error type. Raise it with "what, where: how to fix"; `cli.py` prints it and exits 1."""


class ProdescError(Exception):
    """A mistake the user can fix (bad input, bad config, missing file). Bugs are never wrapped in it."""

"""Errors the user can act on; the CLI prints their message without a stack trace."""


class InputError(Exception):
    """Bad or missing input: a path, a file, a parameter or a dataset that cannot be used."""

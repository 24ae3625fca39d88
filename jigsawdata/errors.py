"""Errors the user can act on; the CLI prints their message without a stack trace."""


class InputError(Exception):
    """Bad or missing input: a path, a file, a parameter or a dataset that cannot be used."""


def first_line(exc: BaseException, default: str = "") -> str:
    """The gist of an exception for a one-line message: its first line (libraries' own text
    goes on with advice of their own, e.g. torch's ``weights_only=False``, which would run
    whatever code a file holds)."""
    return (str(exc).strip().splitlines() or [default])[0]


class FetchError(InputError):
    """A shard set could not be read or downloaded from where it was published, or a file
    did not match its manifest."""

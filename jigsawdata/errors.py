"""Errors the user can act on; the CLI prints their message without a stack trace."""


class InputError(Exception):
    """Bad or missing input: a path, a file, a parameter or a dataset that cannot be used."""


def message(exc: BaseException) -> str:
    """An exception's own message. One raised in a DataLoader worker reaches the main process
    re-raised with the worker's whole traceback as its message; the original message is
    its last line, after the exception's name."""
    text = str(exc).strip()
    if "\nOriginal Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and name.rsplit(".", 1)[-1] == type(exc).__name__ else last


def first_line(exc: BaseException, default: str = "") -> str:
    """The gist of an exception for a one-line message: its first line (libraries' own text
    goes on with advice of their own, e.g. torch's ``weights_only=False``, which would run
    whatever code a file holds)."""
    return (message(exc).splitlines() or [default])[0]


class FetchError(InputError):
    """A shard set could not be read or downloaded from where it was published, or a file
    did not match its manifest."""


class TrainingError(InputError):
    """A run cannot go on as set up (its loss diverged): the user acts on the settings."""


class Stopped(Exception):
    """A run stopped on request (SIGTERM: a scheduler's preemption) after saving its state;
    the CLI prints the message and exits with ``exit_code`` (128 + the signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

"""The user-error type: one line on stderr and exit code 2 from the CLI."""

from __future__ import annotations


class TinylmError(Exception):
    """An error the user caused (a path, a config, data, a shape, a vocabulary, a model).

    The message is one line; the CLI prints it without a traceback and exits with code 2.
    """

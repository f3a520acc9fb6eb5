"""The user-error type: one line on stderr and exit code 2 from the CLI."""

from __future__ import annotations

import importlib
from typing import Any


class TinylmError(Exception):
    """An error the user caused (a path, a config, data, a shape, a vocabulary, a model).

    The message is one line; the CLI prints it without a traceback and exits with code 2.
    """


def optional_import(module: str, extra: str, needed_for: str) -> Any:
    """Import an optional dependency; a missing one is a user error naming the extra (STYLE rule 15).

    Args:
        module: the dotted module to import, e.g. "pyarrow.parquet".
        extra: the tinylm extra that installs it, e.g. "data".
        needed_for: what needs it, the message's start ("a.parquet: reading it", "--json-schema").
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TinylmError(f"{needed_for} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install 'tinylm[{extra}]'") from None


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (the CLI installs the handler): it unwinds like Ctrl-C, so
    every `except BaseException` / `finally` that removes a temporary runs, and the CLI exits 143."""

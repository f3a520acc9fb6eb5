"""Output paths: atomic directory writes and the --overwrite check."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from tinylm.core.errors import TinylmError

# ----- atomic writes (shared by every module that writes output) ---------------------------------

@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling dir; on success it replaces `out_dir`, on failure it is removed.

    Args:
        out_dir: the final directory.
        overwrite: allow replacing an existing `out_dir`; otherwise it is a TinylmError.
    """
    out = Path(out_dir)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)  # the atomic step: readers see the old dir or the complete new one
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to start when `out` exists and may not be replaced: every stage calls this before any work
    is done (the one place this message is written).

    Args:
        out: the file or directory a stage will write.
        overwrite: the stage's --overwrite.
    """
    if Path(out).exists() and not overwrite:
        raise TinylmError(f"{out} already exists (pass --overwrite to replace it)")


def disk_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

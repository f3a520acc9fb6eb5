"""Output paths: the --overwrite and path checks, and atomic directory and file writes.

A write goes to a temporary sibling (`.NAME.tmp-PID`) that is renamed to NAME at the end, so NAME holds
the old output or the complete new one, never part of one, whenever the process dies. A directory being
replaced is first moved aside (`.NAME.old-PID`). The temporaries of a process that died (kill -9, a power
cut) are removed by the next command that writes to NAME; those of a live process are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tinylm.core.errors import TinylmError

KINDS = ("dir", "file")

# ----- atomic writes (shared by every module that writes output) ---------------------------------

@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling dir; on success it replaces `out_dir`, on failure it is removed.

    Args:
        out_dir: the final directory.
        overwrite: allow replacing an existing `out_dir`; otherwise it is a TinylmError. A file is never
            replaced by a directory.
    """
    out = Path(out_dir)
    check_out(out, overwrite, kind="dir")
    made = _make_parents(out)
    tmp = _sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, moving an existing `out` aside first (the old copy is removed
    after). Another process may write `out` at the same time: the last rename wins, whole."""
    old = _sibling(out, "old")
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):  # another writer moved it aside first
            if out.exists() or out.is_symlink():  # a link to a dir is replaced by the new dir
                _remove(old)
                out.rename(old)
        try:
            tmp.rename(out)  # the atomic step: readers see the old dir or the complete new one
            break
        except OSError as e:  # another writer renamed its dir in between: move that one aside too
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    else:
        raise TinylmError(f"{out} kept being replaced by another process; nothing was written")
    _remove(old)


def _remove(path: Path) -> None:
    """Remove a file, a link or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(out_file: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `out_file`, on failure it is removed.

    Args:
        out_file: the final file.
        overwrite: allow replacing an existing `out_file`; otherwise it is a TinylmError. A directory is
            never replaced by a file.
    """
    out = Path(out_file)
    check_out(out, overwrite, kind="file")
    made = _make_parents(out)
    tmp = _sibling(out, "tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, out)  # atomic: readers see the old file or the complete new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of `out`; returns them, deepest first, for _remove_empty on failure."""
    made = []
    parent = out.absolute().parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the dirs a failed write created (deepest first), unless something else wrote into them."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


def _sibling(out: Path, what: str) -> Path:
    return out.parent / f".{out.name}.{what}-{os.getpid()}"


# ----- checks before any work ----------------------------------------------------------------------

def check_out(out: str | os.PathLike, overwrite: bool, kind: str = "dir") -> None:
    """Refuse to start when `out` may not be written: every stage calls this before any work is done
    (the one place these messages are written). Also removes the temporaries that dead processes left
    beside `out`.

    Args:
        out: the file or directory a stage will write.
        overwrite: the stage's --overwrite (a run dir that is resumed passes True).
        kind: "dir" or "file", what the stage writes at `out`; the other kind is never replaced.
    """
    path = Path(out)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    remove_stale(path)
    if path.exists():
        if path.is_dir() != (kind == "dir"):
            what = "a directory" if path.is_dir() else "a file"
            raise TinylmError(f"{out} is {what}, and a {'directory' if kind == 'dir' else 'file'} is written "
                              f"there (--overwrite never replaces one kind with the other)")
        if not overwrite:
            raise TinylmError(f"{out} already exists (pass --overwrite to replace it)")
    check_parent(path)


def check_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` is a directory this process can create entries in (probed
    with a temporary file: permission bits do not tell for root or a read-only mount)."""
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise TinylmError(f"cannot write {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise TinylmError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tinylm-probe-", dir=parent)
    except OSError as e:
        raise TinylmError(f"cannot write {path}: {parent} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-PID` and `.NAME.old-PID` beside `out` whose process is gone; returns them.

    A stale `.old` dir with no `out` is a replaced output whose successor was never renamed in (the
    process died between the two renames): it is put back instead.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    removed = []
    for entry in sorted(out.parent.iterdir(), key=lambda p: p.name):
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m[2])):
            continue
        if m[1] == "old" and entry.is_dir() and not out.exists():
            with contextlib.suppress(OSError):
                entry.rename(out)
                continue
        _remove(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (a reused id counts as alive: its temporaries stay)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def disk_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

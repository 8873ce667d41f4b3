"""Output files of the front ends: checked writable before any work starts, written atomically.

A run that would end by failing to write its result (a parent that is a file, a read-only file system,
no permission) is refused before anything loads; a result is written to a temporary file beside its
destination and renamed over it, so an interrupted write never leaves a truncated file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: what a plain open() would give a new file


def check_writable(path, what: str = "output", suffixes: tuple[str, ...] | None = None) -> Path:
    """``path`` as a ``Path`` once it is known that a file can be written there (its parent folders are
    created). ``ValueError`` naming ``what`` and the reason otherwise."""
    path = Path(path).expanduser()
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {str(path)!r} needs one of the extensions {', '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{what} {str(path)!r} cannot be written: {reason} ({exc.filename or parent})") from exc
    return path


@contextlib.contextmanager
def atomic_path(path: Path):
    """``with atomic_path(p) as tmp: write(tmp)``: ``tmp`` (same folder and extension) replaces ``p``
    only when the block succeeds; on failure it is removed and ``p`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a plain new file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

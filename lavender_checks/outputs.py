"""Files a command writes at its end (``score --samples``, ``run --write-reference``).

``check_output_file`` runs before any work, so that a path that cannot take the file (a
folder, a path under a regular file, a read-only or full filesystem, a folder without write
permission) stops the command with one line instead of a traceback once the work is done.
``write_file`` writes the file whole: into a hidden temporary file beside it, renamed over
the target at the end, the temporary file removed if anything fails; a failure is an
``OutputFileError`` that names the option and the path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


class OutputFileError(ValueError):
    """A file a command was told to write cannot be written there; the message says why."""


def check_output_file(flag: str, path: str | Path) -> None:
    """``path`` can take a file: not a folder, under a folder (made if need be) that this
    process can write a file into. Raises ``OutputFileError`` naming ``flag`` and ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputFileError(f"{flag} {path}: is a folder; give the path of a file")
    for folder in path.parents:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise OutputFileError(f"{flag} {path}: {folder} is a file, not a folder")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A probe file, not os.access: that says yes to root on a read-only filesystem.
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise OutputFileError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def write_file(flag: str, path: str | Path, write: Callable[[TextIO], None]) -> Path:
    """``write(fh)`` into a temporary file beside ``path``, then renamed to ``path``; nothing
    is left behind when it fails. An ``OSError`` becomes an ``OutputFileError``."""
    path = Path(path)
    check_output_file(flag, path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with temporary.open("w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputFileError(f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass  # not there to remove (the filesystem refused to make it)
    return path

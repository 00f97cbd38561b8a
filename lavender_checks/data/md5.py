"""The md5 of a file (what VLMEvalKit compares with ``DATASET_MD5``), kept in a cache for large
files so that a benchmark TSV is hashed once per (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_ENV = "LAVENDER_CHECKS_CACHE"  # a folder; md5.json lives in it
DEFAULT_CACHE_DIR = Path("~/.cache/lavender-checks")
MD5_CACHE_MIN_BYTES = 16 * 2**20  # smaller files hash in milliseconds: not worth a cache entry


def md5_cache_path() -> Path:
    """``$LAVENDER_CHECKS_CACHE/md5.json``, else ``~/.cache/lavender-checks/md5.json``."""
    folder = os.environ.get(CACHE_ENV)
    return (Path(folder) if folder else DEFAULT_CACHE_DIR).expanduser() / "md5.json"


def _read_md5_cache(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}  # absent or damaged: the md5 is computed again
    return entries if isinstance(entries, dict) else {}


def _write_md5_cache(path: Path, entries: dict[str, dict]) -> None:
    # Entries of files that are gone are dropped; the write is atomic, so concurrent runs
    # can at worst lose each other's entries, never leave a broken file.
    entries = {k: v for k, v in entries.items() if os.path.exists(k)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".md5-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": 1, "files": entries}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file (what VLMEvalKit compares with DATASET_MD5).

    Large files are hashed once per (path, size, mtime): the result is kept in
    ``md5_cache_path()``.
    """
    path = Path(path).resolve()
    stat = path.stat()
    use_cache = stat.st_size >= MD5_CACHE_MIN_BYTES
    key = str(path)
    if use_cache:
        cache_file = md5_cache_path()
        entry = _read_md5_cache(cache_file).get(key)
        if (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns
                and isinstance(entry.get("md5"), str)):
            return entry["md5"]
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "md5").hexdigest()
    if use_cache:
        entries = _read_md5_cache(cache_file)  # read again: another run may have added entries
        entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": digest}
        _write_md5_cache(cache_file, entries)
    return digest

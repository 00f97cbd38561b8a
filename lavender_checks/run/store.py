"""The resumable prediction store: append-only JSON-lines logs, one folder per store key.

Layout under the root (default ``reports/store/``)::

    <benchmark>-<tsv md5[:8]>/<base fp[:12]>[+<adapter fp[:12]>]/<profile>-<profile fp[:12]>/
        key.json          the full StoreKey (guards against a clash of the shortened names)
        <writer>.jsonl    one line per prediction: index, prediction, prompt_sha, time_ns

Each process writes only its own ``<writer>.jsonl`` (pytest-xdist workers use their worker
id), so no two processes append to one file; readers take the union of every writer's file.
Every batch is written with one ``write`` and then fsync'ed, so what was appended survives a
kill; a line torn by a kill mid-write is ignored on read and cut off before the next append.

A run takes a lock on every key it opens (``.lock`` in the key's folder, naming the run, its
process and command), released when the run is done: a second run on the same store and key
is refused with that name instead of generating every row a second time. The processes of one
sharded run share their locks; a lock whose process is gone is taken over. Judging a lock,
taking it over and releasing it happen under an flock of the folder's ``.lock.guard``, so two
processes of one host that find the same stale lock cannot both take it (the second one finds
the first one's lock); a lock file appears whole (linked from a written temporary file).

Base predictions are keyed without the adapter, so gating a new adapter reuses them. Every
line carries the hash of the exact chat text and max_new_tokens it was generated from
(``request_sha``); a prediction whose hash differs from the current request is not reused.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS

try:  # POSIX: lock a writer's file while appending (two processes given one writer name)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

DEFAULT_ROOT = REPORTS / "store"
KEY_FILE = "key.json"
LOCK_FILE = ".lock"
GUARD_FILE = ".lock.guard"  # flocked while a lock is judged, taken over or released; never removed
LOG_SUFFIX = ".jsonl"
_WRITER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class PredictionStoreError(RuntimeError):
    """A store file that cannot be read as written; the message names the file and line."""


class StoreLockedError(RuntimeError):
    """Another run, still alive, holds the lock of a store key."""


class IgnoredPredictionsWarning(UserWarning):
    """Predictions exist for the same model and benchmark under another version of the profile."""


Index = int | str


def request_sha(chat_text: str, max_new_tokens: int) -> str:
    """The hash a stored prediction carries: the exact processor text and the token budget."""
    payload = json.dumps({"text": chat_text, "max_new_tokens": int(max_new_tokens)},
                         ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoreKey:
    base_fingerprint: str
    adapter_fingerprint: str | None  # None for the base variant
    benchmark: str
    tsv_md5: str
    profile_name: str
    profile_fingerprint: str
    # Where the numbers were computed, e.g. "cuda-bfloat16": greedy tokens depend on the
    # hardware and dtype, so predictions made on one are never reused for another.
    compute: str = ""

    def relative_dir(self) -> Path:
        model = _short(self.base_fingerprint)
        if self.adapter_fingerprint is not None:
            model += "+" + _short(self.adapter_fingerprint)
        directory = (Path(f"{_safe(self.benchmark)}-{_short(self.tsv_md5, 8)}") / model
                     / f"{_safe(self.profile_name)}-{_short(self.profile_fingerprint)}")
        return directory / _safe(self.compute) if self.compute else directory

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    index: Index
    prediction: str
    prompt_sha: str
    time_ns: int
    writer: str
    line: int = 0  # 1-based line in the writer's file


def default_run_id() -> str:
    """The processes of one pytest session (pytest-xdist's test-run id, which its workers and
    their children inherit) are one run; otherwise each process is a run of its own."""
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    return f"pytest:{session}" if session else f"{socket.gethostname()}:{os.getpid()}"


class PredictionStore:
    """The store under ``root``. ``run_id`` names the run whose processes share its key locks
    (default: this process). Use it as a context manager to release the locks at the end; they
    are released at exit otherwise."""

    def __init__(self, root: str | Path | None = None, *, run_id: str | None = None):
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        self.run_id = run_id or default_run_id()
        self._locks: list[Path] = []
        atexit.register(self.release)

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Give back the locks this process wrote."""
        while self._locks:
            path = self._locks.pop()
            try:
                with _guard(path.parent):
                    holder = _read_lock(path)
                    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                        path.unlink()
            except OSError:  # the folder was removed meanwhile
                pass

    def lock(self, key: StoreKey) -> None:
        """Take the lock of ``key`` for this run now (``log`` takes it too), or raise
        ``StoreLockedError`` naming the run that holds it."""
        self._lock(self.root / key.relative_dir())

    def _lock(self, directory: Path) -> None:
        """Take the lock of one key's folder for this run, or say which run holds it."""
        path = directory / LOCK_FILE
        if path in self._locks:
            return
        directory.mkdir(parents=True, exist_ok=True)
        mine = {"run": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        with _guard(directory):
            for _ in range(3):
                if _create_lock(path, mine):
                    self._locks.append(path)
                    return
                holder = _read_lock(path)
                if holder is None:  # torn by a kill, or removed meanwhile by its run
                    time.sleep(0.05)
                    holder = _read_lock(path)
                if holder is not None and holder.get("run") == self.run_id:
                    return  # another process of this run holds it
                if holder is not None and _alive(holder):
                    raise StoreLockedError(
                        f"{directory}: another run is using these predictions: pid {holder.get('pid')} "
                        f"on {holder.get('host')}, started {holder.get('started')}, command "
                        f"{holder.get('command')!r}. Wait for it to finish (a rerun then reuses what "
                        f"it stored), stop it, or use another --store; {path} is its lock") from None
                # Its process is gone (or the file is unreadable): take it over. Under the guard
                # no other process of this host judges it meanwhile, so what is removed is the
                # lock judged stale, never one another process has just taken.
                _remove(path)
        raise StoreLockedError(f"{path}: could not take this lock (other processes keep changing it)")

    def clear_stale_lock(self, key: StoreKey) -> bool:
        """Remove the lock of ``key`` when another run's process on this host wrote it and is
        gone (a process on another host is only judged there). True when one was removed."""
        directory = self.root / key.relative_dir()
        path = directory / LOCK_FILE
        if not path.exists():
            return False
        with _guard(directory):
            holder = _read_lock(path)
            if (holder is None or holder.get("run") == self.run_id
                    or holder.get("host") != socket.gethostname() or _alive(holder)):
                return False
            return _remove(path)

    def log(self, key: StoreKey, writer: str = "main", *, lock: bool = True) -> PredictionLog:
        """The log of ``key``; ``writer`` names the file this process appends to. ``lock``:
        take the key's lock for this run (``lock=False`` only to inspect a store).

        Predictions stored for the same model, benchmark and profile name under another
        profile fingerprint (an older version of the profile) are ignored, with a warning.
        """
        if not _WRITER_NAME.match(writer):
            raise ValueError(f"writer name {writer!r} must match {_WRITER_NAME.pattern}")
        directory = self.root / key.relative_dir()
        log = PredictionLog(directory, key, writer)
        if lock:
            self._lock(directory)
        log.ignored = self._other_profile_versions(key, directory)
        if log.ignored:
            warnings.warn(
                f"predictions for {key.benchmark} made under another version of profile "
                f"{key.profile_name!r} are ignored (the profile's prompts or decoding changed): "
                + ", ".join(str(p) for p in log.ignored),
                IgnoredPredictionsWarning,
                stacklevel=2,
            )
        return log

    open = log  # the name docs/architecture.md uses

    def _other_profile_versions(self, key: StoreKey, directory: Path) -> list[Path]:
        found = []
        for sibling in sorted(directory.parent.glob(f"{_safe(key.profile_name)}-*")):
            if sibling == directory or not sibling.is_dir():
                continue
            other = _read_key(sibling / KEY_FILE)
            if other is None or not any(sibling.glob("*" + LOG_SUFFIX)):
                continue
            same_run = (other.base_fingerprint, other.adapter_fingerprint, other.benchmark,
                        other.tsv_md5, other.profile_name)
            if same_run == (key.base_fingerprint, key.adapter_fingerprint, key.benchmark,
                            key.tsv_md5, key.profile_name):
                found.append(sibling)
        return found


class PredictionLog:
    """The predictions of one store key: read from every writer, appended by one."""

    def __init__(self, directory: Path, key: StoreKey, writer: str):
        self.directory = directory
        self.key = key
        self.writer = writer
        self.path = directory / f"{writer}{LOG_SUFFIX}"
        self.ignored: list[Path] = []  # folders of other profile versions, not reused
        self._tail_checked = False
        stored = _read_key(directory / KEY_FILE)
        if stored is not None and stored != key:
            raise PredictionStoreError(
                f"{directory / KEY_FILE}: holds {stored}, not {key} (shortened folder names clash); "
                "move that folder away"
            )

    def writer_files(self) -> list[Path]:
        return sorted(self.directory.glob("*" + LOG_SUFFIX))

    def records(self) -> list[Record]:
        """Every stored line of every writer, oldest first.

        A row stored twice from the same request must hold the same prediction (greedy
        decoding of one request, or a copy of it): two different ones mean the store mixes
        runs that are not one run, and picking either would be silent, so it is refused."""
        records = []
        for path in self.writer_files():
            records.extend(_read_log(path))
        records.sort(key=lambda r: (r.time_ns, r.writer))
        first: dict[tuple[Index, str], Record] = {}
        for record in records:
            earlier = first.setdefault((record.index, record.prompt_sha), record)
            if earlier.prediction != record.prediction:
                raise PredictionStoreError(
                    f"{self.directory / (record.writer + LOG_SUFFIX)}, line {record.line}: row "
                    f"{record.index!r} holds {record.prediction[:40]!r}, but "
                    f"{self.directory / (earlier.writer + LOG_SUFFIX)}, line {earlier.line} holds "
                    f"{earlier.prediction[:40]!r} for the same request: the store mixes runs that "
                    "do not agree; remove one of the lines (or the key's folder) and rerun")
        return records

    def existing(self) -> dict[Index, Record]:
        """One record per index over all writers: the newest one."""
        return {r.index: r for r in self.records()}

    def matching(self, wanted: Mapping[Index, str]) -> dict[Index, Record]:
        """For each wanted index, the newest record made from the wanted prompt hash."""
        found: dict[Index, Record] = {}
        for record in self.records():
            if wanted.get(record.index) == record.prompt_sha:
                found[record.index] = record
        return found

    def append(self, items: Iterable[tuple[Index, str, str]]) -> int:
        """Append ``(index, prediction, prompt_sha)`` items durably (one write, then fsync)."""
        now = time.time_ns()
        lines = []
        for index, prediction, prompt_sha in items:
            if not isinstance(prediction, str):
                raise TypeError(f"prediction for index {index!r} is {type(prediction).__name__}, not str")
            lines.append(json.dumps({"index": _plain_index(index), "prediction": prediction,
                                     "prompt_sha": prompt_sha, "time_ns": now},
                                    ensure_ascii=False) + "\n")
        if not lines:
            return 0
        self._ensure_directory()
        data = "".join(lines).encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            _cut_torn_tail(fd, thorough=not self._tail_checked)
            self._tail_checked = True
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        return len(lines)

    def _ensure_directory(self) -> None:
        if (self.directory / KEY_FILE).is_file():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # process and thread in the name: two writers starting the same folder never share it
        tmp = self.directory / f".{KEY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(self.key.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.directory / KEY_FILE)
        _fsync_dir(self.directory)


def export_vlmeval(meta: Any, predictions: Mapping[Index, str], work_dir: str | Path,
                   model_name: str, dataset: str, suffix: str = "xlsx") -> Path:
    """Write predictions as VLMEvalKit's ``<work_dir>/<model>_<dataset>.<suffix>``.

    ``meta`` is the benchmark frame (TSV rows, or the subset that was run); every one of its
    rows needs a prediction, as VLMEvalKit asserts. ``suffix`` picks the file type
    (VLMEvalKit's ``PRED_FORMAT``: xlsx, tsv, json).
    """
    from lavender_checks.vlmeval_io import prediction_frame, write_prediction_file

    path = Path(work_dir) / f"{model_name}_{dataset}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_prediction_file(prediction_frame(meta, predictions), path)
    return path


# -- file helpers ---------------------------------------------------------------------------

def _read_log(path: Path) -> list[Record]:
    writer = path.name[: -len(LOG_SUFFIX)]
    data = path.read_bytes()
    lines = data.split(b"\n")
    # The piece after the last newline is a line torn by a kill mid-write (or empty): ignored.
    complete = lines[:-1]
    records = []
    for number, raw in enumerate(complete, start=1):
        try:
            obj = json.loads(raw)
            record = Record(index=obj["index"], prediction=obj["prediction"],
                            prompt_sha=obj["prompt_sha"], time_ns=int(obj["time_ns"]),
                            writer=writer, line=number)
            if not isinstance(record.prediction, str) or not isinstance(record.index, (int, str)):
                raise TypeError("index must be int or str and prediction str")
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(complete):
                continue  # a damaged last line: the write that made it did not finish
            raise PredictionStoreError(
                f"{path}, line {number}: not a prediction record ({exc}); the lines after it are "
                "intact, so repair or remove this line by hand"
            ) from None
        records.append(record)
    return records


def _cut_torn_tail(fd: int, thorough: bool) -> None:
    """Before appending, drop a torn last line so the new lines start on a line of their own.

    ``thorough`` also drops a damaged newline-terminated last line; it is needed once per
    process, as later tails were written whole by this process or a peer under the lock.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return
    if not thorough and os.pread(fd, 1, size - 1) == b"\n":
        return
    data = os.pread(fd, size, 0)
    keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else size
    if keep == size:
        # Complete, but a damaged last line (e.g. zeros after a crash) would hide new lines.
        last_start = data.rfind(b"\n", 0, size - 1) + 1
        if _is_record(data[last_start:size - 1]):
            return
        keep = last_start
    os.ftruncate(fd, keep)


def _is_record(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and {"index", "prediction", "prompt_sha", "time_ns"} <= obj.keys()


def _read_key(path: Path) -> StoreKey | None:
    if not path.is_file():
        return None
    try:
        return StoreKey(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise PredictionStoreError(f"{path}: not a store key ({exc})") from None


@contextlib.contextmanager
def _guard(directory: Path) -> Iterator[None]:
    """Hold the flock of a key folder's guard file (one process of this host at a time)."""
    fd = os.open(directory / GUARD_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _create_lock(path: Path, holder: Mapping[str, Any]) -> bool:
    """Create ``path`` holding ``holder``, whole, unless it exists (then False)."""
    tmp = path.with_name(f"{LOCK_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(holder) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # atomic, and fails where the lock exists (also over NFS)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: create it exclusively, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(holder) + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a lock still runs (one on another host is assumed to)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    # Makes a newly created file's directory entry durable too.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_index(index: Any) -> Index:
    # numpy integers from a DataFrame index are not JSON-serialisable.
    if isinstance(index, str):
        return index
    if hasattr(index, "__index__"):
        return int(index)
    raise TypeError(f"index {index!r} must be an int or a str")


def _short(value: str, length: int = 12) -> str:
    return _safe(value)[:length]


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))

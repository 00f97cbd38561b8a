"""Sharing one run's generation among processes: which process generates which shard, and
the barrier they meet at before every one of them scores the union.

Several processes (pytest-xdist workers, one GPU each) share a run: process i generates
shard i of n of every benchmark into the shared prediction store, also generates any shard no
process has claimed, waits at the barrier until every shard is stored, then scores the union,
so all of them hold the same results.

The barrier is an interface (``Barrier``) so that another transport can sit next to the
file one (``ShardBarrier``, a folder shared by the processes), e.g. torch.distributed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ContextManager, Protocol

# A barrier folder untouched for this long belongs to a run that ended without cleaning up.
STALE_BARRIER_SECONDS = 3600.0


class Barrier(Protocol):
    """What ``generate_shards`` and the pytest plugin need from a barrier."""

    count: int  # how many shards (= processes) share the run
    owner: str  # this process's name, e.g. the xdist worker id

    @property
    def run_id(self) -> str:
        """The same string in every process of the run (the prediction store's lock owner)."""

    def claim(self, name: str | int) -> bool:
        """True for exactly one caller per name, across the processes."""

    def working(self, shard: int) -> ContextManager[None]:
        """Generate ``shard`` inside this block; the others learn whether it succeeded."""

    def wait(self) -> None:
        """Return once every shard is done; raise when one failed or went silent."""


class ShardTimeout(RuntimeError):
    """A shard that another process claimed shows no sign of life."""


class ShardFailed(RuntimeError):
    """Another process failed while generating a shard."""


class ShardBarrier:
    """Shares the generation of ``count`` shards among processes through files in one folder.

    ``<shard>.claim`` is created exclusively by the process that generates the shard (so no
    shard is generated twice) and touched every few seconds while it works; ``<shard>.done``
    or ``<shard>.failed`` (with the error) is written when it ends. ``wait`` returns once
    every shard is done; it raises when a shard failed, or when a claimed shard shows no sign
    of life for ``stall_timeout`` seconds (its process died: the predictions it stored are
    kept, and a rerun resumes from them).
    """

    def __init__(self, directory: str | Path, count: int, owner: str, *,
                 stall_timeout: float = 600.0, poll: float = 0.5, heartbeat: float = 5.0):
        if count < 1:
            raise ValueError(f"a barrier needs at least one shard, got {count}")
        self.directory = Path(directory)
        self.count = count
        self.owner = owner
        self.stall_timeout = stall_timeout
        self.poll = poll
        self.heartbeat = heartbeat
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def run_id(self) -> str:
        return f"barrier:{self.directory.resolve()}"

    def round(self, number: int) -> ShardBarrier:
        """The barrier of one round of ``--stop-early`` (run/rounds.py): the same processes
        meet there after each generated their share of that round."""
        return ShardBarrier(self.directory / f"round-{number}", self.count, self.owner,
                            stall_timeout=self.stall_timeout, poll=self.poll, heartbeat=self.heartbeat)

    def remove(self) -> None:
        """Delete the barrier folder (once every process of the run is done with it)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _path(self, name: str | int, suffix: str) -> Path:
        return self.directory / f"{name}.{suffix}"

    def claim(self, name: str | int) -> bool:
        """True for exactly one caller per name, across processes."""
        try:
            fd = os.open(self._path(name, "claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"owner": self.owner, "pid": os.getpid()}) + "\n")
        return True

    def owner_of(self, name: str | int) -> str:
        try:
            return json.loads(self._path(name, "claim").read_text())["owner"]
        except (OSError, ValueError, KeyError):
            return "an unknown process"

    @contextlib.contextmanager
    def working(self, shard: int) -> Iterator[None]:
        """Generate ``shard`` inside this block: a heartbeat runs, and the outcome is recorded."""
        claim = self._path(shard, "claim")
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                with contextlib.suppress(OSError):
                    os.utime(claim)

        thread = threading.Thread(target=beat, name=f"shard-{shard}-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        except BaseException as exc:
            self._write(self._path(shard, "failed"), f"{type(exc).__name__}: {exc}")
            raise
        else:
            self._write(self._path(shard, "done"), self.owner)
        finally:
            stop.set()
            thread.join()

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def wait(self) -> None:
        """Return once every shard is done."""
        waiting_since = time.time()
        while True:
            pending = []
            for shard in range(self.count):
                if self._path(shard, "done").is_file():
                    continue
                failed = self._path(shard, "failed")
                if failed.is_file():
                    raise ShardFailed(
                        f"shard {shard} of {self.count} failed in {self.owner_of(shard)}: "
                        f"{failed.read_text(encoding='utf-8').strip()} (see that process's output; "
                        f"barrier folder {self.directory})"
                    )
                claim = self._path(shard, "claim")
                try:
                    silent = time.time() - claim.stat().st_mtime
                    who = f"claimed by {self.owner_of(shard)}"
                except FileNotFoundError:
                    silent = time.time() - waiting_since
                    who = "claimed by no process"
                if silent > self.stall_timeout:
                    raise ShardTimeout(
                        f"shard {shard} of {self.count}, {who}, has shown no sign of life for "
                        f"{silent:.0f} s (limit {self.stall_timeout:g} s; barrier folder "
                        f"{self.directory}); its process probably died: see its output. The "
                        "predictions it stored are kept, and a rerun resumes from them."
                    )
                pending.append(shard)
            if not pending:
                return
            time.sleep(self.poll)


def remove_stale_barriers(parent: Path, keep: Path | None = None,
                          older_than: float = STALE_BARRIER_SECONDS) -> list[Path]:
    """Delete barrier folders under ``parent`` (``store/.shards``) that nothing has touched for
    ``older_than`` seconds: runs killed before they could clean up. Returns what went."""
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for folder in parent.iterdir():
        if not folder.is_dir() or (keep is not None and folder == keep):
            continue
        try:
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
        except OSError:
            continue
        if now - newest > older_than:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def generate_shards(shard: tuple[int, int], barrier: Barrier,
                    generate: Callable[[int, int], None]) -> None:
    """Generate ``shard`` (i, n), then any shard no process has claimed (its process runs other
    tests, or never started), then wait until every shard is stored."""
    own, count = shard
    if barrier.count != count:
        raise ValueError(f"the barrier waits for {barrier.count} shards, not {count}")
    # Claimed before any model loads (the load happens inside `generate`, on first use), so a
    # faster process does not take it meanwhile; `working`'s heartbeat covers a slow load and
    # its failure record stops the other processes at once.
    if barrier.claim(own):
        with barrier.working(own):
            generate(own, count)
    for other in range(count):
        if other != own and barrier.claim(other):
            with barrier.working(other):
                generate(other, count)
    barrier.wait()

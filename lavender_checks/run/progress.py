"""Progress of a run's generation, one bar (or line) per benchmark and variant, wherever the
run shows it: ``lavender-checks run`` on a terminal (a tqdm bar), in a CI log (no TTY, or
``CI`` set: one line when the benchmark and variant is done, no redraws), and under pytest
(the plugin hands ``predict_run`` a ``Bars`` that writes around pytest's capture).

A ``progress`` argument of ``predict_run`` / ``collect_results`` is True (this module's
choice for the process's stderr), False (nothing), or a ``Bars``: ``bars(label, to_generate,
rows)`` returns an object with ``update(n)`` and ``close()``, or None.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int) -> Any: ...

    def close(self) -> Any: ...


Bars = Callable[[str, int, int], "Bar | None"]


def in_ci(stream: Any) -> bool:
    """A log, not a terminal: ``CI`` set (every CI service sets it) or no TTY."""
    isatty = getattr(stream, "isatty", None)
    return bool(os.environ.get("CI")) or not (isatty is not None and isatty())


class LineBar:
    """One line when the benchmark and variant is done (or interrupted): what a CI log shows."""

    def __init__(self, label: str, total: int, rows: int, write: Callable[[str], Any]):
        self.label, self.total, self.rows, self.write = label, total, rows, write
        self.done = 0
        self.started = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        stored = self.rows - self.total
        self.write(f"{self.label}: generated {self.done} of {self.total} rows in "
                   f"{time.monotonic() - self.started:.1f} s ({stored} of {self.rows} were stored)")


def line_bars(write: Callable[[str], Any]) -> Bars:
    """A ``LineBar`` for every benchmark and variant with rows to generate."""
    return lambda label, total, rows: LineBar(label, total, rows, write) if total else None


def tqdm_bars(stream: Any = None) -> Bars:
    """A tqdm bar on ``stream`` (default stderr) for every benchmark and variant with rows to generate."""

    def make(label: str, total: int, rows: int):
        if not total:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=label, unit="row", file=stream or sys.stderr)

    return make


def stderr_bars() -> Bars:
    """``lavender-checks run``'s choice: a bar on a terminal, lines in a CI log."""
    if in_ci(sys.stderr):
        return line_bars(lambda text: print(text, file=sys.stderr, flush=True))
    return tqdm_bars()


def resolve(progress: bool | Bars) -> Bars | None:
    """The ``Bars`` a ``progress`` argument stands for (None: no progress)."""
    if progress is True:
        return stderr_bars()
    return progress or None

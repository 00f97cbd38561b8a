"""How warnings reach the user of a command: each as one line, ``lavender-checks <command>:
warning: <message>``, never Python's ``file:line: Category: message`` with the source line
under it; those of the libraries known to be harmless (``known_warnings.toml``, one data list)
not at all. ``--quiet`` also silences the libraries' logged warnings (transformers' logger).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import re
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KNOWN_WARNINGS = Path(__file__).with_name("known_warnings.toml")


@dataclass(frozen=True)
class KnownWarning:
    source: str  # "python", or the logger name of a library
    message: str  # regular expression searched in the message
    category: str = "Warning"  # for source "python": the builtin warning class
    why: str = ""


def known_warnings(path: Path = KNOWN_WARNINGS) -> list[KnownWarning]:
    with path.open("rb") as fh:
        entries = tomllib.load(fh).get("warning", [])
    return [KnownWarning(**entry) for entry in entries]


def notice_line(command: str, message: object) -> str:
    return f"lavender-checks {command}: warning: {' '.join(str(message).split())}"


def python_filters(known: list[KnownWarning] | None = None) -> list[tuple[str, str]]:
    """(message regex, category name) of each known Python warning: what ``warnings.filterwarnings``
    and pytest's ``filterwarnings`` take (both match the message from its start)."""
    return [(f".*{entry.message}", entry.category)
            for entry in (known if known is not None else known_warnings()) if entry.source == "python"]


class _DropKnown(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.search(text) for p in self.patterns)


def _library_handlers(name: str) -> list[logging.Handler]:
    """The handlers a library's records reach: transformers keeps its own on its root logger."""
    if name == "transformers":
        from transformers.utils import logging as transformers_logging

        root = transformers_logging._get_library_root_logger()
    else:
        root = logging.getLogger(name)
    return list(root.handlers) or list(logging.getLogger().handlers)


@contextlib.contextmanager
def one_line_notices(command: str, *, quiet: bool = False, libraries: bool = True) -> Iterator[None]:
    """Inside the block: Python warnings printed as one line each, the known harmless ones
    dropped; with ``libraries``, the known harmless logged warnings of the libraries dropped
    too (importing transformers' logging), and under ``quiet`` all their logged warnings."""
    known = known_warnings()

    def one_line(message, category, filename, lineno, line=None):
        return notice_line(command, message) + "\n"

    attached: list[tuple[logging.Handler, logging.Filter]] = []
    levels: list[tuple[logging.Logger, int]] = []
    formatwarning = warnings.formatwarning
    # The format, not the display: whoever records warnings (pytest, catch_warnings) still does.
    warnings.formatwarning = one_line
    with warnings.catch_warnings():
        for message, category in python_filters(known):
            warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category, Warning))
        if libraries:
            by_library: dict[str, list[re.Pattern]] = {}
            for entry in known:
                if entry.source != "python":
                    by_library.setdefault(entry.source, []).append(re.compile(entry.message))
            for library, patterns in by_library.items():
                try:
                    handlers = _library_handlers(library)
                except ImportError:
                    continue
                drop = _DropKnown(patterns)
                for handler in handlers:
                    handler.addFilter(drop)
                    attached.append((handler, drop))
                if quiet:
                    logger = logging.getLogger(library)
                    levels.append((logger, logger.level))
                    logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            warnings.formatwarning = formatwarning
            for handler, drop in attached:
                handler.removeFilter(drop)
            for logger, level in levels:
                logger.setLevel(level)

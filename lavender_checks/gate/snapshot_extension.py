"""The benchmark snapshots through syrupy: the file format and the review of one case.

``BenchmarkSnapshotExtension`` is syrupy's JSON extension with ``snapshots.dumps`` as its
serializer (fixed key order, one row per line; still a ``.json`` file where syrupy puts one).
``review`` compares through syrupy itself, so ``--snapshot-update``, the ``snapshot report
summary`` and unused-snapshot detection behave as for any syrupy snapshot, and returns the
account of what changed instead of syrupy's text diff. Uses only what syrupy has had since
4.x: ``SnapshotAssertion.__eq__``, ``.executions`` (``AssertionResult.recalled_data``,
``.created``, ``.updated``, ``.exception``), ``.update_snapshots``, ``.test_location``,
``.index`` and the extension's ``get_location``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from lavender_checks.gate import snapshots
from lavender_checks.gate.snapshots import Current

__all__ = ["BenchmarkSnapshotExtension", "Review", "review"]


class BenchmarkSnapshotExtension(JSONSnapshotExtension):
    """JSON written by ``snapshots.dumps``; syrupy's include/exclude/matcher do not apply."""

    def serialize(self, data: Any, **_options: Any) -> str:
        return snapshots.dumps(data)


@dataclass
class Review:
    account: dict[str, Any] | None  # None: nothing to account for (no snapshot, no result)
    outcome: str  # "pass", "fail" or "skip"
    message: str = ""

    def settle(self) -> None:
        """Pass, or end the test: a failure prints the account, nothing else."""
        if self.outcome == "fail":
            pytest.fail(self.message, pytrace=False)
        if self.outcome == "skip":
            pytest.skip(self.message)


def review(assertion: Any, current: Current | None, *, verdicts: list[dict[str, Any]] = (),
           case: str = "", missing_reason: str = "", report: Path | None = None,
           benchmark: str = "") -> Review:
    """Match ``current`` (this run's snapshot of one benchmark; None when the run has no result
    for it) against the accepted file through ``assertion`` (syrupy's ``snapshot`` fixture with
    ``BenchmarkSnapshotExtension``), and account for any difference.

    report: the run's report folder, named in a failure message (None: not known here).
    benchmark: the benchmark's name, for the account of an accepted file that cannot be read.
    Such a file (empty, cut short, another shape) fails the case with that account, which
    names the file and ``--snapshot-update``; under ``--snapshot-update`` it is rewritten."""
    settings = snapshots.SETTINGS
    location = str(assertion.extension.get_location(test_location=assertion.test_location,
                                                    index=assertion.index))
    shown = Path(location).relative_to(Path.cwd()) if Path(location).is_relative_to(Path.cwd()) else location
    where = f"{report}/snapshot-diff.md" if report is not None else "snapshot-diff.md in the run's report folder"
    path = Path(location)
    if current is None:
        # Nothing to assert: a skipped case keeps its file (syrupy does not call it unused).
        if not path.is_file():
            return Review(None, "skip", f"no result and no accepted snapshot: {missing_reason}")
        try:
            accepted = snapshots.parse(path.read_text(encoding="utf-8", errors="replace"), str(shown))
        except snapshots.SnapshotFormatError as exc:
            account = snapshots.unreadable(str(exc), benchmark=benchmark or case, case=case, location=str(shown))
            account["notes"].insert(1, f"this run has no result for it either: {missing_reason}")
            return Review(account, "fail", snapshots.markdown([account]) + f"\nfull account: {where}")
        account = snapshots.compare(accepted, None, case=case, location=str(shown), missing_reason=missing_reason)
        if assertion.update_snapshots:
            return Review(account, "skip", f"{missing_reason}; its accepted snapshot {shown} is kept "
                                           "(delete it by hand if the benchmark is gone for good)")
        return Review(account, "fail", snapshots.markdown([account], rows_per_group=settings.message_rows)
                      + f"\nfull account: {where}")

    run_versions = current.snapshot.get("versions")
    if path.is_file():
        # The versions a file records are those it was recorded with: a run on other versions
        # whose results are the same matches it and leaves it as it is (compare() says so).
        try:
            on_file = snapshots.parse(path.read_text(encoding="utf-8", errors="replace"), location)
        except snapshots.SnapshotFormatError:
            on_file = None  # unreadable: the assertion below says so, naming the file
        if on_file is not None and snapshots.same_content(on_file, current.snapshot):
            current.snapshot.pop("versions", None)
            if "versions" in on_file:
                current.snapshot["versions"] = on_file["versions"]
    matched = assertion == current.snapshot
    result = assertion.executions[max(assertion.executions)]
    if result.exception is not None:
        raise result.exception
    recalled = result.recalled_data
    try:
        accepted = snapshots.parse(recalled, str(shown)) if recalled is not None else None
    except snapshots.SnapshotFormatError as exc:
        # A file cut short, emptied or edited into another shape: say which and how to rewrite
        # it, instead of a traceback through the session's fixtures.
        if not result.updated:
            account = snapshots.unreadable(str(exc), benchmark=current.snapshot["benchmark"], case=case,
                                           location=str(shown))
            return Review(account, "fail", snapshots.markdown([account]) + f"\nfull account: {where}")
        account = snapshots.compare(None, current, verdicts=verdicts, case=case, location=str(shown))
        account["status"] = "updated"
        account["notes"] = [f"{exc}; rewritten from this run with --snapshot-update"]
        return Review(account, "pass")
    account = snapshots.compare(accepted, current, verdicts=verdicts, case=case, location=str(shown))
    # Results that match on other versions: nothing to review, but the session says so.
    account["versions_changed"] = snapshots.version_change(accepted, {"versions": run_versions})
    if result.created:
        account["status"] = "created"
    elif result.updated and account["status"] == "unchanged":
        # The same content in another layout (e.g. an older format): rewritten, nothing to review.
        account["notes"].append("rewritten in the current format; no content changed")
    elif result.updated:
        account["status"] = "updated"
    if matched:
        return Review(account, "pass")
    return Review(account, "fail", snapshots.markdown([account], rows_per_group=settings.message_rows)
                  + f"\nfull account: {where}; accept with --snapshot-update after review")

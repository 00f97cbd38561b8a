"""A run's verdicts as Markdown for a CI job's summary page.

GitHub Actions renders the Markdown a step appends to the file ``$GITHUB_STEP_SUMMARY`` names
on the run's page. ``lavender-checks run`` and the pytest gate append theirs when that variable
is set: a title with the outcome, the notices that say what the verdicts do not test (data
not comparable, snapshots recorded with other versions), the messages of the verdicts that
did not pass, one table row per verdict (measured, reported, band, n, status), the benchmarks not measured and why, the report
folder, then the snapshot diff (``snapshot-diff.md``) when the session wrote one. Elsewhere
(``GITHUB_STEP_SUMMARY`` unset or empty) nothing is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from lavender_checks.gate.verdicts import STATUSES, Verdict

__all__ = ["ENV", "MAX_DIFF_CHARS", "append", "page", "verdict_table"]

ENV = "GITHUB_STEP_SUMMARY"
# GitHub shows at most 1 MiB of a step's summary; a longer diff is cut, the artifact has it all.
MAX_DIFF_CHARS = 400_000


def _num(value: float | None, signed: bool) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict_table(verdicts: Iterable[Verdict]) -> str:
    """The messages of the verdicts that did not pass, one Markdown table row per verdict,
    then the counts."""
    verdicts = list(verdicts)
    problems = [v.message() for v in verdicts if v.status != "pass"]
    lines = ["Did not pass:", "", "```text", *problems, "```", ""] if problems else []
    lines += ["| case | measured | reported | band | n | status |", "| --- | ---: | ---: | --- | ---: | --- |"]
    for v in verdicts:
        signed = v.quantity == "gain"
        band = v.band_text(_num, at_least="≥", none="–")
        n = "–" if v.n is None else f"{v.n} of {v.population_n}" if v.subset else str(v.n)
        status = {"pass": "pass", "fail": "**FAIL**"}.get(v.status, f"**MISSING**: {v.reason}")
        lines.append(f"| {_cell(f'{v.row_id} {v.quantity}')} | {_num(v.measured, signed)} | "
                     f"{_num(v.reported, signed)} | {band} | {n} {v.unit_kind.replace('_', ' ')}s | {_cell(status)} |")
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    modes = ", ".join(sorted({v.mode for v in verdicts})) or "no verdicts"
    lines += ["", f"{counts['pass']} pass, {counts['fail']} fail, {counts['missing']} missing ({modes})"]
    return "\n".join(lines)


def page(title: str, passed: bool, table: str, *, notices: Iterable[str] = (),
         missing: Mapping[str, str] | None = None, report: str | Path | None = None,
         snapshot_diff: str | Path | None = None) -> str:
    """The Markdown a run appends, headed ``## <title> passed`` or ``FAILED``; ``table`` is
    ``verdict_table``'s; each notice is shown, quoted, before it (its first line in bold)."""
    out = [f"## {title} {'passed' if passed else 'FAILED'}", ""]
    for notice in notices:
        if notice:
            head, *rest = notice.splitlines()
            out += [f"> **{head}**"] + [f"> - {line.strip()}" for line in rest] + [""]
    out += [table, ""]
    out += [f"- missing {benchmark}: {reason}" for benchmark, reason in (missing or {}).items()]
    if report:
        out.append(f"- report: `{report}`")
    out.append("")
    if snapshot_diff:
        text = Path(snapshot_diff).read_text(encoding="utf-8")
        if len(text) > MAX_DIFF_CHARS:
            text = text[:MAX_DIFF_CHARS] + f"\n\n… cut here; the whole diff is `{snapshot_diff}`\n"
        out += [text.rstrip(), ""]
    return "\n".join(out)


def append(text: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Append ``text`` to the file ``$GITHUB_STEP_SUMMARY`` names; None when it is not set."""
    target = (os.environ if environ is None else environ).get(ENV)
    if not target:
        return None
    path = Path(target)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    except OSError as exc:  # the verdicts stand: the page just lacks its summary
        print(f"lavender-checks: cannot append to ${ENV} ({path}): {exc.strerror or exc}", file=sys.stderr)
        return None
    return path

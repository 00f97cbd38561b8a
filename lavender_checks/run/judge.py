"""From a run's results to verdicts and a report: the run stage's use of ``gate/``.

A run limited to some benchmarks (``--benchmark MME``) is judged on the reference rows of
those benchmarks only; the rows of the others are not part of it (the pytest gate makes no
case of them either), so they are not "missing".
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS
from lavender_checks.run.collect import RunResults
from lavender_checks.run.config import RunConfig

# Where a system has no flock locks (gate.report.PARTIAL_LOCKS), a hidden ".<run id>.partial"
# report folder older than this was left by a killed run (a report is written in seconds).
STALE_PARTIAL_SECONDS = 600.0


@dataclasses.dataclass
class GateOutcome:
    reference: Any  # gate.Reference, restricted to the run's benchmarks
    verdicts: list  # gate.Verdict, in the reference's order
    report: Path | None = None
    noncomparable: dict = dataclasses.field(default_factory=dict)  # benchmark -> why its data is not the reference's
    early_stop: Any = None  # run.rounds.RoundsRecord of a --stop-early run

    @property
    def stopped_early(self) -> bool:
        return self.early_stop is not None and self.early_stop.stopped

    @property
    def passed(self) -> bool:
        # No verdict at all tested nothing: never a pass.
        return bool(self.verdicts) and all(v.status == "pass" for v in self.verdicts)

    def verdict(self, row_id: str, quantity: str):
        """The verdict of one reference row's quantity ("base", "lavender" or "gain")."""
        for verdict in self.verdicts:
            if verdict.row_id == row_id and verdict.quantity == quantity:
                return verdict
        raise KeyError(f"no verdict for {row_id} {quantity} (reference {self.reference.path})")

    def table(self, only_problems: bool = False) -> str:
        from lavender_checks.gate.verdicts import summary_table

        return summary_table(self.verdicts, only_problems=only_problems)


def run_reference(config: RunConfig, reference: Any = None):
    """The reference of ``config`` (or ``reference``), with only the rows of its benchmarks."""
    from lavender_checks.gate.verdicts import load_reference

    reference = reference if reference is not None else load_reference(config.reference_path())
    rows = tuple(row for row in reference.rows if row.benchmark in config.benchmarks)
    return dataclasses.replace(reference, rows=rows)


def judge_run(run: RunResults, reference: Any = None) -> GateOutcome:
    """Verdicts of the reference rows of the run's benchmarks (``reference``: a loaded
    gate.Reference, else the run's reference file)."""
    from lavender_checks.gate.verdicts import judge, noncomparable, stopped_verdicts

    reference = run_reference(run.config, reference)
    early = run.early_stop
    if early is not None and not early.complete:
        if early.stopped:
            reason = (f"the run stopped early after {early.rows_used} of {early.rows_total} rows, when "
                      f"{early.deciding.row_id} {early.deciding.quantity} was certain to fail")
        else:  # a series' checkpoint whose rounds ended with those of the checkpoints that count
            reason = (f"the rounds ended after {early.rows_used} of {early.rows_total} rows, when "
                      f"{early.ended_by}, which the exit status counts, had stopped early")
        verdicts = stopped_verdicts(reference, early.failures, reason, run.config.gate_mode)
    else:
        verdicts = judge(reference, run.results, mode=run.config.gate_mode, missing_reasons=run.missing)
    return GateOutcome(reference, verdicts, noncomparable=noncomparable(reference, run.metadata),
                       early_stop=run.early_stop)


def write_run_report(run: RunResults, outcome: GateOutcome, *, reports_root: Path = REPORTS,
                     keep: int | None = None) -> Path:
    """``reports_root/<new run id>/`` (report.md, report.json, gains.png, flips.jsonl); then
    the leftovers of killed runs go and, with ``keep``, all but the ``keep`` newest runs."""
    from lavender_checks.gate.report import write_report

    outcome.report = Path(write_report(reports_root, None, outcome.reference, outcome.verdicts,
                                       run.results, run.metadata))
    prune_reports(reports_root, keep=keep)
    return outcome.report


def prune_reports(reports_root: Path, *, keep: int | None = None,
                  partial_age: float = STALE_PARTIAL_SECONDS) -> list[Path]:
    """Delete ``.<run id>.partial`` folders of killed runs (those no process is writing:
    ``gate.report.partial_left_by_a_killed_run``; by ``partial_age`` where there are no locks)
    and, with ``keep``, every run folder but the ``keep`` newest (run ids sort by time).
    Nothing else under ``reports_root`` (the store, bench results, ``latest``) is touched.
    Returns what went."""
    from lavender_checks.gate.report import RUN_ID_PATTERN, partial_left_by_a_killed_run

    root = Path(reports_root)
    if not root.is_dir():
        return []
    removed = []
    now = time.time()
    for path in root.iterdir():
        name = path.name
        if (name.startswith(".") and name.endswith(".partial") and path.is_dir()
                and RUN_ID_PATTERN.match(name[1:-len(".partial")])):
            abandoned = partial_left_by_a_killed_run(path)
            if abandoned is None:
                try:
                    abandoned = now - path.stat().st_mtime > partial_age
                except OSError:
                    continue
            if abandoned:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        elif (name.startswith(".") and name.endswith(".partial.lock")
                and RUN_ID_PATTERN.match(name[1:-len(".partial.lock")])
                and path.exists()  # not gone with its folder a moment ago
                and not path.with_name(name.removesuffix(".lock")).exists()):
            # A run killed between taking its lock and making its folder: the lock file goes
            # (by partial_left_by_a_killed_run) once no process holds it.
            if partial_left_by_a_killed_run(path.with_name(name.removesuffix(".lock"))):
                removed.append(path)
    if keep is not None:
        runs = sorted((p for p in root.iterdir()
                       if RUN_ID_PATTERN.match(p.name) and p.is_dir() and not p.is_symlink()),
                      key=lambda p: p.name)
        for path in runs[:max(0, len(runs) - keep)]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

"""A checkpoint series in the report (run/series.py): the trend table, a plot per benchmark,
each checkpoint's entry of report.json, and the first checkpoint from which every verdict
passes.

``series`` is plain data: ``{"gate_series", "candidate", "passed", "first_passing",
"checkpoints": [{"name", "path", "step", "gated", "refused", "adapter_fingerprint",
"verdicts": [gate.verdicts.Verdict]}]}`` in series order. Each checkpoint was judged on its
own (its own bootstrap bands); the table shows the candidate's band beside the reported value,
report.json every checkpoint's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lavender_checks.gate.sequential import stop_headline
from lavender_checks.gate.verdicts import STATUSES, Reference, Verdict

_COLOURS = {"pass": "tab:green", "fail": "tab:red", "missing": "tab:gray"}


def first_passing(named_verdicts: Sequence[tuple[str, Sequence[Verdict]]]) -> str | None:
    """The first checkpoint from which on every checkpoint's verdicts all pass (None if the
    last one has a verdict that does not)."""
    first = None
    for name, verdicts in named_verdicts:
        if verdicts and all(v.status == "pass" for v in verdicts):
            first = first or name
        else:
            first = None
    return first


def summary(verdicts: Sequence[Verdict]) -> dict[str, int]:
    return {s: sum(v.status == s for v in verdicts) for s in STATUSES}


def entries(series: Mapping[str, Any]) -> list[dict[str, Any]]:
    """report.json's ``checkpoints``."""
    return [{"name": c["name"], "path": c["path"], "step": c["step"],
             "adapter_fingerprint": c["adapter_fingerprint"], "gated": c["gated"], "refused": c["refused"],
             "early_stop": c.get("early_stop"),
             "summary": summary(c["verdicts"]), "verdicts": [v.to_dict() for v in c["verdicts"]]}
            for c in series["checkpoints"]]


def stops(series: Mapping[str, Any]) -> dict[str, Any]:
    """report.json's ``series.early_stop``: which checkpoints --stop-early stopped, which it cut
    short, and whether a stop fails the run (a checkpoint the exit status counts stopped)."""
    entries = [c for c in series["checkpoints"] if c.get("early_stop")]
    return {"stopped": [c["name"] for c in entries if c["early_stop"]["stopped"]],
            "cut_short": [c["name"] for c in entries if c["early_stop"].get("ended_by")],
            "fails_the_run": any(c["gated"] and c["early_stop"]["stopped"] for c in entries)}


def stop_notice(series: Mapping[str, Any]) -> str | None:
    """The line report.md leads with when --stop-early ran a series (None without it)."""
    if not any(c.get("early_stop") for c in series["checkpoints"]):
        return None
    said = stops(series)
    counted = {c["name"] for c in series["checkpoints"] if c["gated"]}
    if not said["stopped"]:
        return ("--stop-early: no checkpoint's failure was certain before the end: every row was used; "
                "the verdicts are the complete run's.")
    names = ", ".join(f"{name} ({'counted: the run fails' if name in counted else 'not counted'})"
                      for name in said["stopped"])
    cut = (f"; cut short, not judged: {', '.join(said['cut_short'])}" if said["cut_short"] else "")
    return f"--stop-early: STOPPED EARLY: {names}{cut}. Each checkpoint's line is in the series section."


def passed(series: Mapping[str, Any]) -> bool:
    """Every verdict of every checkpoint the exit status counts passes."""
    return all(v.status == "pass" for c in series["checkpoints"] if c["gated"] for v in c["verdicts"])


def _fmt(value: float | None, signed: bool) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _band(verdict: Verdict | None) -> str:
    if verdict is None or verdict.band is None:
        return "-"
    signed = verdict.quantity == "gain"
    lo, hi = verdict.band
    return f"≥ {_fmt(lo, signed)}" if math.isinf(hi) else f"[{_fmt(lo, signed)}, {_fmt(hi, signed)}]"


def _cell(verdict: Verdict | None) -> str:
    stopped = verdict is not None and verdict.early is not None
    if stopped and not verdict.early.get("judged"):
        return "not judged"  # its checkpoint stopped early on another case
    if verdict is None or verdict.status == "missing":
        return "missing"
    if stopped and verdict.measured is None:
        return "**FAIL** (certain, stopped early)"
    mark = "pass" if verdict.status == "pass" else "**FAIL**"
    return f"{_fmt(verdict.measured, verdict.quantity == 'gain')} {mark}"


def markdown(series: Mapping[str, Any]) -> list[str]:
    """The report's series section: which checkpoints, what the exit status judges, the first
    checkpoint from which every verdict passes, refusals, and the trend table."""
    checkpoints = series["checkpoints"]
    candidate = series["candidate"]
    judged = (f"the last checkpoint, **{candidate}**" if series["gate_series"] == "last"
              else "**every checkpoint**")
    first = series["first_passing"]
    out = ["## Checkpoint series", "",
           f"{len(checkpoints)} checkpoints, in order: {', '.join(c['name'] for c in checkpoints)}. "
           f"The exit status judges {judged} (`--gate-series {series['gate_series']}`): "
           f"**{'pass' if series['passed'] else 'FAIL'}**. First checkpoint from which every verdict "
           f"passes: **{first or 'none'}**.", ""]
    for c in checkpoints:
        if c["refused"]:
            out += [f"- **{c['name']}: adapter refused**, every verdict missing: {c['refused']}"]
        elif c.get("early_stop"):  # --stop-early: each checkpoint stops on its own
            out += [f"- **{c['name']}**: {stop_headline(c['early_stop'])}"]
    if any(c["refused"] or c.get("early_stop") for c in checkpoints):
        out.append("")
    counts = ", ".join(f"{c['name']} {summary(c['verdicts'])['pass']}/{len(c['verdicts'])}"
                       for c in checkpoints)
    out += [f"Verdicts passed per checkpoint: {counts}. The sections below this one are "
            f"{candidate}'s; each checkpoint was judged on its own bands (report.json "
            "`checkpoints`), the band shown here is the last checkpoint's.", ""]
    names = [c["name"] for c in checkpoints]
    by_checkpoint = [{(v.row_id, v.quantity): v for v in c["verdicts"]} for c in checkpoints]
    out += ["| row | quantity | reported | band | " + " | ".join(names) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for verdict in checkpoints[-1]["verdicts"]:
        key = (verdict.row_id, verdict.quantity)
        cells = [_cell(per.get(key)) for per in by_checkpoint]
        out.append(f"| {verdict.row_id} | {verdict.quantity} | "
                   f"{_fmt(verdict.reported, verdict.quantity == 'gain')} | {_band(verdict)} | "
                   + " | ".join(cells) + " |")
    out += ["", "Trend plots: " + ", ".join(f"`{name}`" for name in plot_names(checkpoints[-1]["verdicts"]))
            + " (each metric's Lavender value against the checkpoint, with the reported value "
            "and each checkpoint's band).", ""]
    return out


def plot_names(verdicts: Sequence[Verdict]) -> list[str]:
    return [f"trend-{_safe(b)}.png" for b in dict.fromkeys(v.benchmark for v in verdicts)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plot(folder: Path, reference: Reference, series: Mapping[str, Any]) -> list[Path]:
    """``trend-<benchmark>.png``: per reference row of the benchmark, the Lavender value of each
    checkpoint (coloured by its verdict; a grey x where it is missing) against the step (or the
    position when a name has no step), the reported value and each checkpoint's band (a bar:
    each was judged on its own), and the base for scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    checkpoints = series["checkpoints"]
    steps = [c["step"] for c in checkpoints]
    by_step = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    xs = steps if by_step else list(range(len(checkpoints)))
    per = [{(v.row_id, v.quantity): v for v in c["verdicts"]} for c in checkpoints]
    written = []
    rows_by_benchmark: dict[str, list] = {}
    for row in reference.rows:
        if any((row.id, "lavender") in p for p in per):
            rows_by_benchmark.setdefault(row.benchmark, []).append(row)
    for benchmark, rows in rows_by_benchmark.items():
        cols = min(3, len(rows))
        nrows = math.ceil(len(rows) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(max(4.2 * cols, 7.0), 2.8 * nrows + 0.9), squeeze=False)
        for ax, row in zip(axes.flat, rows):
            lavender = [p.get((row.id, "lavender")) for p in per]
            base = [p.get((row.id, "base")) for p in per]
            ax.axhline(row.lavender, color="black", lw=1, ls="--", label="reported")
            ax.plot([], [], color="tab:blue", lw=7, alpha=0.25, label="band")
            for x, v in zip(xs, lavender):  # each checkpoint's own band
                if v is not None and v.band is not None:
                    lo, hi = v.band
                    top = hi if math.isfinite(hi) else row.lavender + (row.lavender - lo)
                    ax.vlines(x, lo, top, color="tab:blue", lw=7, alpha=0.25)
                elif v is None or v.measured is None:  # missing: refused, or not computed
                    ax.plot(x, row.lavender, "x", color=_COLOURS["missing"], ms=7)
            measured = [v.measured if v is not None and v.measured is not None else math.nan for v in lavender]
            ax.plot(xs, measured, color="0.4", lw=1)
            for x, v in zip(xs, lavender):
                if v is not None and v.measured is not None:
                    ax.plot(x, v.measured, "o", color=_COLOURS[v.status], ms=6)
            base_values = [v.measured if v is not None and v.measured is not None else math.nan for v in base]
            ax.plot(xs, base_values, color="tab:purple", lw=1, ls=":", label="base")
            ax.set_title(row.id, fontsize=8)
            ax.tick_params(labelsize=7)
            if not by_step:
                ax.set_xticks(xs)
                ax.set_xticklabels([c["name"] for c in checkpoints], rotation=30, fontsize=6)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(rows):]:
            ax.axis("off")
        axes[0, 0].legend(fontsize=6, loc="best")
        fig.suptitle(f"{benchmark}: Lavender value per {'step' if by_step else 'checkpoint'}\n"
                     "green pass, red fail, grey x missing; bars: each checkpoint's band", fontsize=9)
        fig.tight_layout()
        path = Path(folder) / f"trend-{_safe(benchmark)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

"""Where a `lavender-checks bench` report's projected gate goes, phase by phase, next to each
phase's floor on the card that ran it; for reports written before `figures.breakdown` existed.

    python scripts/bench_breakdown.py REPORT.json [--json OUT.json]

Reads only the report (nothing is measured); OUT.json records which report it came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lavender_checks.speed.project import time_breakdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_breakdown")
    parser.add_argument("report", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the breakdown here")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        fast = report["fast"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"bench_breakdown: {args.report}: not a bench report with a fast-path section ({exc})", file=sys.stderr)
        return 2
    breakdown = time_breakdown(fast, (report.get("figures") or {}).get("card_limit"))
    total = fast["projection"]["seconds"]
    print(f"{args.report} ({report.get('device')}, scale {report.get('scale')}): full gate {total / 60:.1f} min projected")
    for phase, part in breakdown.items():
        floor = f"{part['floor_seconds']:8.0f} s  {part['over_floor']:4.1f}x" if part["floor_seconds"] else ""
        print(f"  {phase:9s} {part['seconds']:8.0f} s  {part['share']:4.0%}  {floor}")
    if args.json:
        args.json.write_text(json.dumps({"derived_from": str(args.report), "device": report.get("device"),
                                         "projected_seconds": total, "breakdown": breakdown}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

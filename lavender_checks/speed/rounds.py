"""``bench --paths fast,rounds``: what ``--stop-early``'s rounds cost a run that goes to the end.

A ``--stop-early`` run hands the engine one call per round and variant, across the
benchmarks (``run.rounds``: draw units of every benchmark in a seeded order (here a workload
row's unit is its image), rounds at the
shares of ``gate/stop_early.toml``, the benchmarks with the longest answers first), where a
run without it makes one call per benchmark and variant. Each call ends with a drain (the
last rows decode alone), so the rounds add drains; vision and prefill work is the same
(draw units keep an image's rows together). This path runs the ``fast`` path's scaled rows
again, in rounds, in the same warm process, and reports both times. The drains do not grow
with the scale (a round of any size ends with one), so the difference is what the rounds
cost a full gate as well: ``extra_seconds`` over the fast path's projected full gate is the
overhead's share. What a run does between rounds on the CPU (scoring what it has, deciding)
is not here: it is timed by the run itself (``report.json`` ``early_stop.looks``).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["measure_rounds"]


def measure_rounds(engine: Any, workload: Any, scaled: dict, maker: Any, cap: int | None, chunk_rows: int,
                   fast_section: dict, seed: int = 0) -> dict:
    """The scaled rows in ``--stop-early``'s rounds; times against the fast path's."""
    from lavender_checks.gate.sequential import load_settings
    from lavender_checks.run.rounds import LONGEST_ANSWERS_FIRST, draw_rank, units_through
    from lavender_checks.speed.measure import run_fast

    settings = load_settings()
    requests = {r.key: r for rows in scaled.values() for r in maker.requests(rows, cap=cap)[0]}
    first = {name: i for i, name in enumerate(LONGEST_ANSWERS_FIRST)}
    names = sorted((name for name, rows in scaled.items() if rows), key=lambda n: first.get(n, len(first)))
    groups: dict[str, dict[Any, list[str]]] = {name: {} for name in names}
    for name in names:
        for row in scaled[name]:
            groups[name].setdefault(row.image_id, []).append(row.key)
    order = {name: sorted(groups[name], key=lambda image, name=name: draw_rank(seed, name, image)) for name in names}
    done = dict.fromkeys(names, 0)
    section: dict[str, Any] = {"rounds": list(settings.rounds), "per_round": [], "seconds": 0.0, "calls": 0,
                               "drain_seconds": 0.0}
    for number, fraction in enumerate(settings.rounds, start=1):
        batch = []
        for name in names:
            stop = units_through(fraction, len(order[name]))
            batch += [requests[key] for image in order[name][done[name]:stop] for key in groups[name][image]]
            done[name] = stop
        for variant in workload.variants:
            if not batch:
                continue
            result = run_fast(engine, batch, variant, chunk_rows)
            stats = result["stats"]
            section["seconds"] += result["seconds"]
            section["calls"] += 1
            section["drain_seconds"] += stats.seconds.get("drain", 0.0)
            section["per_round"].append({"round": number, "variant": variant, "rows": len(batch),
                                         "seconds": result["seconds"], "drain_seconds": stats.seconds.get("drain", 0.0),
                                         "drain_steps": stats.drain_steps})
            print(f"rounds {number} {variant}: {len(batch)} rows in {result['seconds']:.1f} s", file=sys.stderr)
    fast_seconds = sum(run["seconds"] for run in fast_section["per_run"].values())
    projected = fast_section["projection"]["seconds"]
    section["fast_seconds"] = fast_seconds
    section["fast_drain_seconds"] = sum(run["drain_seconds"] for run in fast_section["per_run"].values())
    section["fast_calls"] = len(fast_section["per_run"])
    section["extra_seconds"] = section["seconds"] - fast_seconds
    section["projected_full_gate_seconds"] = projected
    section["overhead_share"] = section["extra_seconds"] / projected if projected else None
    section["method"] = ("the fast path's scaled rows again, in --stop-early's rounds (one call per round and "
                         "variant across the benchmarks); extra_seconds = rounds - fast, both measured in this "
                         "process; overhead_share = extra_seconds / the fast path's projected full gate")
    return section

"""Snapshots of what a run computes: one JSON file per benchmark, profile and run.

Each holds the full score table (every metric key: base, Lavender, Δ and n, the resampling
units behind the metric) rounded to 2 decimals so float noise never shows, and a canary set:
the first rows' raw predictions of both variants. Any change to prompts, generation or
scoring shows up here as a reviewable diff; ``--snapshot-update`` records a new state.

The case id names the profile and the run (``RunConfig.label()``: ``tiny-mini`` for the
built-in default, ``<base>+<lora>-lmudata`` for real weights, plus any subset, and the device
kind when it is not the model's default, e.g. ``tiny-mini-cuda``), so every setting that
changes the greedy tokens keeps its own snapshots. Runs from ``--from-vlmeval`` are not
snapshotted (their folder is not part of the repository).

pytest-xdist: the default ``--dist load`` is the mode to use. Every worker scores the union of
all shards (conftest.py), so how the cases are spread does not matter, and ``--dist
loadgroup`` brings nothing. It does work, checked with syrupy 7.0.2 and pytest-xdist 3.8.0:
loadgroup rewrites node ids on the workers to ``test_x[id]@group``, so syrupy's
``PyTestLocation.is_item_parametrized`` (``nodeid.endswith("]")``) is False there, but the
JSON file names come from ``item.name`` (unchanged): snapshots were written, compared (a
changed value failed) and a stale file was reported unused exactly as without xdist.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from lavender_checks.run import pipeline
from lavender_checks.profiles import load_profile

CANARY_ROWS = 3  # first rows per benchmark whose predictions are kept verbatim
DECIMALS = 2


def pytest_generate_tests(metafunc):
    if "snapshot_benchmark" not in metafunc.fixturenames:
        return
    config = pipeline.config_from_options(metafunc.config.getoption)
    profile = load_profile(config.profile).name
    metafunc.parametrize("snapshot_benchmark", config.benchmarks,
                         ids=[f"{profile}-{config.label()}-{b}" for b in config.benchmarks])


@pytest.fixture
def json_snapshot(snapshot):
    return snapshot.with_defaults(extension_class=JSONSnapshotExtension)


def _rounded(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, DECIMALS) + 0.0  # + 0.0: no "-0.0" in the file


def _units_behind(result, key: str) -> int | None:
    """Resampling units with a non-zero denominator in any term of the metric."""
    terms = result.forms.get(key)
    if not terms:
        return None
    counted = np.zeros(len(result.units), dtype=bool)
    for term in terms:
        counted |= np.asarray(term.denominator) != 0
    return int(counted.sum())


def score_table(base, lavender) -> dict:
    """Every metric key of the benchmark: base, Lavender, Δ (Lavender − base) and n."""
    table = {}
    for key in base.metrics:
        b, l = float(base.metrics[key]), float(lavender.metrics.get(key, math.nan))
        table[key] = {"base": _rounded(b), "lavender": _rounded(l), "delta": _rounded(l - b),
                      "n": _units_behind(base, key)}
    return table


def canaries(predictions: dict) -> list[dict]:
    indices = list(predictions["base"])[:CANARY_ROWS]
    return [{"index": index, "base": predictions["base"][index],
             "lavender": predictions["lavender"][index]} for index in indices]


def test_scores(run_results, snapshot_benchmark, json_snapshot):
    config = run_results.config
    if config.from_vlmeval is not None:
        pytest.skip("runs from --from-vlmeval are not snapshotted")
    if config.limit is not None or config.fraction is not None:
        # A subset's numbers are a sample's: its bands (test_gate) judge it, against the
        # whole benchmark's reference; a snapshot per subset would be one more file to review.
        pytest.skip("subsets (--limit/--fraction) are not snapshotted; the gate's bands judge them")
    if snapshot_benchmark in run_results.missing:
        pytest.skip(f"{snapshot_benchmark} missing: {run_results.missing[snapshot_benchmark]}")
    result = run_results.results[snapshot_benchmark]
    base, lavender = result["base"], result["lavender"]
    snapshot = {
        "benchmark": snapshot_benchmark,
        "profile": run_results.metadata["profile"]["name"],
        "run": config.label(),
        "rows": len(base.samples),
        "units": len(base.units),
        "metrics": score_table(base, lavender),
        "canaries": canaries(run_results.predictions[snapshot_benchmark]),
    }
    assert snapshot == json_snapshot

"""Snapshots of what a run computes: one JSON file per benchmark, profile and run.

Each holds the score table (every metric key: base, Lavender, Δ and n) rounded as the report
prints it, a canary set of rows kept verbatim (rows where the variants differ, and rows of
every split/category), and every row's scores and prediction digests, one row per line
(``lavender_checks/gate/snapshots.py``; sizes and choices in docs/snapshots.md). Any change to
prompts, generation or scoring fails here with an account of what changed: the metrics with
the gate's band, the rows that flipped, and first, when the accepted file was recorded with
other torch, transformers or peft versions than the run's, a note saying so (greedy tokens can
differ between versions); the same account goes to
``reports/<run-id>/snapshot-diff.md`` and ``.json``. ``--snapshot-update`` records a new state.

The case id names the profile and the run (``RunConfig.label()``: ``tiny-mini`` for the
built-in default, ``<base>+<lora>-lmudata`` for real weights, plus any subset, and the device
kind when it is not the model's default, e.g. ``tiny-mini-cuda``), so every setting that
changes the greedy tokens keeps its own snapshots. Runs from ``--from-vlmeval`` are not
snapshotted (their folder is not part of the repository).

pytest-xdist: the default ``--dist load`` is the mode to use. Every worker scores the union of
all shards (the plugin), so how the cases are spread does not matter, and ``--dist
loadgroup`` brings nothing. It does work, checked with syrupy 7.0.2 and pytest-xdist 3.8.0:
loadgroup rewrites node ids on the workers to ``test_x[id]@group``, so syrupy's
``PyTestLocation.is_item_parametrized`` (``nodeid.endswith("]")``) is False there, but the
JSON file names come from ``item.name`` (unchanged): snapshots were written, compared (a
changed value failed) and a stale file was reported unused exactly as without xdist.
"""

from __future__ import annotations

import pytest

from lavender_checks.gate import snapshots
from lavender_checks.gate.snapshot_extension import BenchmarkSnapshotExtension, review
from lavender_checks.profiles import load_profile
from lavender_checks.run.checkpoints import SeriesInputError
from lavender_checks.run.config import config_from_options
from lavender_checks.run.series import SeriesResults, candidate_config


def pytest_generate_tests(metafunc):
    if "snapshot_benchmark" not in metafunc.fixturenames:
        return
    # A checkpoint series is snapshotted at its last checkpoint, whose name the id carries.
    config = config_from_options(metafunc.config.getoption)
    try:
        config = candidate_config(config)
    except SeriesInputError:  # under torchrun the gate's first fixture stops the session with it
        pass
    profile = load_profile(config.profile).name
    metafunc.parametrize("snapshot_benchmark", config.benchmarks,
                         ids=[f"{profile}-{config.label()}-{b}" for b in config.benchmarks])


@pytest.fixture
def benchmark_snapshot(snapshot):
    return snapshot.with_defaults(extension_class=BenchmarkSnapshotExtension)


def test_scores(run_results, gate_outcome, snapshot_benchmark, benchmark_snapshot, snapshot_accounts, request):
    if isinstance(run_results, SeriesResults):  # the last checkpoint's results and verdicts
        run_results, gate_outcome = run_results.candidate, gate_outcome.candidate.outcome
    config = run_results.config
    if config.from_vlmeval is not None:
        pytest.skip("runs from --from-vlmeval are not snapshotted")
    if config.limit is not None or config.fraction is not None:
        # A subset's numbers are a sample's: its bands (test_gate) judge it, against the
        # whole benchmark's reference; a snapshot per subset would be one more file to review.
        pytest.skip("subsets (--limit/--fraction) are not snapshotted; the gate's bands judge them")
    if run_results.stopped_early:
        pytest.skip(f"no snapshot of a run that --stop-early stopped: {run_results.early_stop.headline()}")
    current = None
    if snapshot_benchmark not in run_results.missing:
        result = run_results.results[snapshot_benchmark]
        current = snapshots.current_snapshot(
            snapshot_benchmark, result["base"], result["lavender"], run_results.predictions[snapshot_benchmark],
            profile=run_results.metadata["profile"]["name"], run=config.label(),
            versions=run_results.metadata.get("versions"))
    outcome = review(benchmark_snapshot, current, case=request.node.name, report=gate_outcome.report,
                     verdicts=[v.to_dict() for v in gate_outcome.verdicts if v.benchmark == snapshot_benchmark],
                     missing_reason=run_results.missing.get(snapshot_benchmark, ""), benchmark=snapshot_benchmark)
    if outcome.account is not None:
        snapshot_accounts.append(outcome.account)
    outcome.settle()

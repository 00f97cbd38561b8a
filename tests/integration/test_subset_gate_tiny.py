"""The built-in default gated on subsets (issue 12, item 1): the tiny pair reproduces its own
reference (fixtures/reported/tiny-mini.toml) on the mini benchmarks, so it must pass at any
``--limit`` / ``--fraction``. Before bands accounted for the rows not run, ``--limit 1`` gave
26 failures of 81."""

import warnings

import pytest

from lavender_checks.run.collect import collect_results
from lavender_checks.run.config import RunConfig
from lavender_checks.run.judge import judge_run


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_pair):
    """Every mini benchmark generated once; the subsets below only read the store."""
    store = tmp_path_factory.mktemp("subset-store")
    run = collect_results(RunConfig(store=store), pair=tiny_pair, progress=False)
    assert judge_run(run).passed
    return store


def _gate(store, tiny_pair, **pick):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "limit raised to one unit per stratum"
        run = collect_results(RunConfig(store=store, **pick), pair=tiny_pair,
                                       progress=False)
    return run, judge_run(run)


@pytest.mark.parametrize("pick", [dict(limit=n) for n in (1, 2, 3, 5, 8, 13, 20)]
                         + [dict(fraction=f) for f in (0.1, 0.25, 0.5, 0.75)], ids=str)
def test_the_tiny_pair_passes_its_reference_on_any_subset(store, tiny_pair, pick):
    _, outcome = _gate(store, tiny_pair, **pick)
    failing = [v.message() for v in outcome.verdicts if v.status != "pass"]
    assert failing == []
    assert any(v.subset for v in outcome.verdicts)


def test_without_the_rows_not_run_a_subset_fails(store, tiny_pair):
    """The old bands (the subset's own bootstrap, collapsed to the floor on one unit)."""
    run, _ = _gate(store, tiny_pair, limit=1)
    for entry in run.results.values():
        for result in entry.values():
            result.population = None
    outcome = judge_run(run)
    assert sum(v.status == "fail" for v in outcome.verdicts) > 10

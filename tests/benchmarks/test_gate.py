"""The gate: one case per reference row and quantity, e.g. ``test_gain[ChartQA_TEST-test_human]``.

The cases come from the reference file the run uses (``--reference``; by default
fixtures/reported/tiny-mini.toml for the built-in tiny pair, seed-report.toml for real
weights), restricted to the benchmarks of the run (``--benchmark``).

A verdict without a measured number ("missing") skips its case, with the reason, when this
suite generated the predictions: the run could not compute it here (a TSV absent from
LMUData, a subset without that category), which says nothing about the model. With
``--from-vlmeval`` it fails instead: the folder was named as the evidence of a VLMEvalKit run,
and a gate over it must not turn green on files that are not there.

With ``--stop-early``, a run that stopped fails the cases whose failure was certain and skips
every other one with the reason: only a complete run judges them (and takes snapshots).

A benchmark whose numbers cannot test the reference's (its TSV is not the data they came
from, another profile, MMBench without its circular copies...; see
``gate.verdicts.noncomparable``) fails each of its cases with the reason, unless
``--allow-noncomparable`` is given.

A failing case's message is ``Verdict.message()``: measured, reported, band, n and how the
band was made; the plugin makes it the JUnit XML's ``<failure message=...>`` as it is.
"""

from __future__ import annotations

import pytest

from lavender_checks.gate.verdicts import load_reference
from lavender_checks.run.config import RunConfig, config_from_options
from lavender_checks.run.judge import GateOutcome

QUANTITY_OF_TEST = {"test_base": "base", "test_lavender": "lavender", "test_gain": "gain"}


def pytest_generate_tests(metafunc):
    quantity = QUANTITY_OF_TEST.get(metafunc.function.__name__)
    if quantity is None:
        return
    config = config_from_options(metafunc.config.getoption)
    reference = load_reference(config.reference_path())
    rows = [row for row in reference.rows if row.benchmark in config.benchmarks]
    metafunc.parametrize("row_id", [row.id for row in rows], ids=[row.id for row in rows])


def _judge(outcome: GateOutcome, config: RunConfig, row_id: str, quantity: str):
    verdict = outcome.verdict(row_id, quantity)
    why = outcome.noncomparable.get(verdict.benchmark)
    if why and not config.allow_noncomparable:
        # A verdict on other data says nothing about the report: no silent pass.
        pytest.fail(f"NOT COMPARABLE with the reference: {why} (--allow-noncomparable gates it "
                    f"anyway)\n    on that data: {verdict.message()}", pytrace=False)
    if verdict.status == "missing":
        if config.from_vlmeval is not None and not outcome.stopped_early:
            pytest.fail(verdict.message(), pytrace=False)
        pytest.skip(verdict.message())
    if verdict.status != "pass":
        # The verdict's message alone (no traceback, no assert rewrite): it is what the
        # terminal, the JUnit XML's <failure message=...> and a CI page show.
        pytest.fail(verdict.message(), pytrace=False)


def test_base(gate_outcome, gate_config, row_id):
    _judge(gate_outcome, gate_config, row_id, "base")


def test_lavender(gate_outcome, gate_config, row_id):
    _judge(gate_outcome, gate_config, row_id, "lavender")


def test_gain(gate_outcome, gate_config, row_id):
    _judge(gate_outcome, gate_config, row_id, "gain")

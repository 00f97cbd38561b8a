"""The gate: one case per reference row and quantity, e.g. ``test_gain[ChartQA_TEST-test_human]``;
for a series of checkpoints (``--lora`` repeated, or a folder of ``checkpoint-N/``), one per
checkpoint too: ``test_gain[checkpoint-500-ChartQA_TEST-test_human]`` (``-k checkpoint-500``).

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
In a series the exit status judges the last checkpoint (``--gate-series last``, the default):
the cases of the others report their verdicts but a failing one is an xfail, saying so;
``--gate-series all`` makes each of them count. A checkpoint whose adapter was refused (it
changes nothing) fails its counted Lavender and gain cases, naming the reason.
"""

from __future__ import annotations

import pytest

from lavender_checks.gate.verdicts import load_reference
from lavender_checks.run.checkpoints import SeriesInputError
from lavender_checks.run.config import RunConfig, config_from_options
from lavender_checks.run.judge import GateOutcome
from lavender_checks.run.series import series_of

QUANTITY_OF_TEST = {"test_base": "base", "test_lavender": "lavender", "test_gain": "gain"}


def pytest_generate_tests(metafunc):
    quantity = QUANTITY_OF_TEST.get(metafunc.function.__name__)
    if quantity is None:
        return
    config = config_from_options(metafunc.config.getoption)
    reference = load_reference(config.reference_path())
    rows = [row for row in reference.rows if row.benchmark in config.benchmarks]
    try:
        checkpoints = series_of(config)
    except SeriesInputError:  # under torchrun the gate's first fixture stops the session with it
        checkpoints = None
    if not checkpoints:
        metafunc.parametrize("row_id", [row.id for row in rows], ids=[row.id for row in rows])
        return
    cases = [(c.name, row.id) for c in checkpoints for row in rows]
    metafunc.parametrize(("checkpoint", "row_id"), cases, ids=[f"{c}-{r}" for c, r in cases])


def _judge(outcome, config: RunConfig, row_id: str, quantity: str, checkpoint: str | None = None):
    if checkpoint is None:
        return _judge_verdict(outcome, config, row_id, quantity)
    judged = outcome.for_checkpoint(checkpoint)
    try:
        if judged.refused and quantity != "base":  # the base was computed; the checkpoint not
            pytest.fail(f"{checkpoint}: adapter refused, no predictions: {judged.refused}", pytrace=False)
        _judge_verdict(judged.outcome, config, row_id, quantity)
    except (pytest.fail.Exception, AssertionError) as exc:
        if judged.gated:
            raise
        why = str(exc).split("\nassert ")[0]  # the verdict's message, not the comparison
        pytest.xfail(f"{checkpoint} is not gated (--gate-series last gates the last checkpoint; "
                     f"--gate-series all gates it): {why}")


def _judge_verdict(outcome: GateOutcome, config: RunConfig, row_id: str, quantity: str):
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


def test_base(gate_outcome, gate_config, row_id, checkpoint):
    _judge(gate_outcome, gate_config, row_id, "base", checkpoint)


def test_lavender(gate_outcome, gate_config, row_id, checkpoint):
    _judge(gate_outcome, gate_config, row_id, "lavender", checkpoint)


def test_gain(gate_outcome, gate_config, row_id, checkpoint):
    _judge(gate_outcome, gate_config, row_id, "gain", checkpoint)

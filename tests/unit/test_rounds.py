"""The rounds of --stop-early (run/rounds.py): draw units, their order, the rounds' rows, and
scoring as the rows arrive, exactly as the complete run scores them."""

import itertools

import numpy as np
import pytest

from lavender_checks.benchmarks import benchmark_names, get_benchmark
from lavender_checks.data import image_key, load_benchmark, resampling_units
from lavender_checks.gate.bootstrap import metric_forms
from lavender_checks.gate.sequential import Decision, EarlyFailure, load_settings
from lavender_checks.gate.verdicts import load_reference
from lavender_checks.model import VARIANTS
from lavender_checks.run.config import MINI_LMUDATA, TINY_REFERENCE
from lavender_checks.run.rounds import BenchmarkRounds, Looker, draw_labels, gate_cases, run_rounds, run_rounds_each
from lavender_checks.vlmeval_io import prediction_frame, roundtrip

SETTINGS = load_settings()


@pytest.fixture(scope="module")
def mini():
    return {name: (get_benchmark(name), load_benchmark(get_benchmark(name), MINI_LMUDATA))
            for name in benchmark_names()}


# A gain certain to fail, as a Looker reports it.
FAILURE = EarlyFailure("ChartQA_TEST-Overall", "gain", 4.17, (-1.0, 0.5), 2.0, "below", 0.001, 3, 24)


def _plans(mini) -> list[BenchmarkRounds]:
    return [BenchmarkRounds.of(bench, data, 7) for bench, data in mini.values()]


@pytest.mark.parametrize("name", benchmark_names())
def test_rows_that_share_an_image_or_a_scoring_unit_are_drawn_together(mini, name):
    bench, data = mini[name]
    labels = draw_labels(data, bench)
    frame = data.frame
    units = resampling_units(data, bench.spec).astype(str).to_numpy()
    images = [image_key(data, i) for i in frame["index"]]
    for a, b in itertools.combinations(range(len(frame)), 2):
        if units[a] == units[b] or images[a] == images[b]:
            assert labels[a] == labels[b], (frame["index"][a], frame["index"][b])
    if name == "MMBench_DEV_EN":  # circular copies share their group's draw unit
        assert len(set(labels)) < len(frame)


def test_the_order_is_seeded_and_every_row_comes_once(mini):
    bench, data = mini["MMBench_DEV_EN"]
    one, again, other = (BenchmarkRounds.of(bench, data, seed) for seed in (1, 1, 2))
    assert one.order == again.order and one.order != other.order
    taken, done = [], 0
    for fraction in SETTINGS.rounds:
        stop = one.units_through(fraction)
        assert stop <= max(1, int(fraction * len(one.order) + 1e-9))
        taken += one.indices(done, stop)
        done = stop
    assert sorted(taken) == sorted(data.frame["index"].tolist())


def _tricky(indices, variant):
    """Predictions VLMEvalKit's xlsx round trip changes: NA tokens, numbers, formulas, blanks."""
    pool = ["A", "B) the cat", "Yes", "No", "42", "3.50", "NA", "", "nan", "=1+1", "None", "  spaced  ",
            "The answer is (C).", "N/A", "0", "#N/A", "1e3"]
    shift = 0 if variant == "base" else 5
    return {index: pool[(k + shift) % len(pool)] for k, index in enumerate(indices)}


def test_scores_seen_during_the_rounds_are_the_complete_runs(mini):
    """Each unit's value from the rows arriving round by round equals its value in the complete
    run's scoring (one xlsx round trip of the whole file)."""
    reference = load_reference(TINY_REFERENCE)
    plans = _plans(mini)
    looker = Looker(plans, reference, gate_cases(reference, [p.name for p in plans], "reproduce"), 0.01,
                    SETTINGS)
    predictions = {p.name: {v: _tricky(p.data_frame["index"].tolist(), v) for v in VARIANTS} for p in plans}
    done = {p.name: 0 for p in plans}
    for fraction in SETTINGS.rounds:  # in rounds, as a run hands them over
        for plan in plans:
            stop = plan.units_through(fraction)
            rows = plan.indices(done[plan.name], stop)
            for variant in VARIANTS:
                looker.add(plan.name, variant, {i: predictions[plan.name][variant][i] for i in rows})
            done[plan.name] = stop
    for plan in plans:
        meta = plan.data_frame
        for variant in VARIANTS:
            complete = plan.bench.score(roundtrip(prediction_frame(meta, predictions[plan.name][variant])), meta=meta)
            seen = looker.score(plan.name, variant)
            assert seen.metrics == complete.metrics
            for row in (r for r in reference.rows if r.benchmark == plan.name):
                for a, b in zip(metric_forms(seen, row.parts), metric_forms(complete, row.parts)):
                    np.testing.assert_array_equal(a.numerator, b.numerator)
                    np.testing.assert_array_equal(a.denominator, b.denominator)


def test_a_benchmark_is_not_decided_before_a_prediction_that_is_no_number(mini):
    """A column of numbers and blanks alone comes back as floats ("12" -> 12.0, which ANLS does
    not match with "12"); the complete file has text elsewhere, so until text has come in
    both variants the benchmark's cases are not judged, and then every cell is the file's."""
    reference = load_reference(TINY_REFERENCE)
    bench, data = mini["DocVQA_VAL"]
    plan = BenchmarkRounds.of(bench, data, 7)
    looker = Looker([plan], reference, gate_cases(reference, [plan.name], "reproduce"), 0.01, SETTINGS)
    indices = plan.data_frame["index"].tolist()
    numbers = {i: ("12" if k % 2 else "NA") for k, i in enumerate(indices)}
    predictions = {**numbers, indices[-1]: "twelve"}
    first = [i for i in indices if i != indices[-1]]
    for variant in VARIANTS:
        looker.add(plan.name, variant, {i: predictions[i] for i in first})
    assert looker.text_seen[plan.name] == {"base": False, "lavender": False}
    assert looker.decision({plan.name: len(plan.order)}).failures == []  # nothing judged yet
    for variant in VARIANTS:
        looker.add(plan.name, variant, {indices[-1]: predictions[indices[-1]]})
    assert all(looker.text_seen[plan.name].values())
    complete = bench.score(roundtrip(prediction_frame(plan.data_frame, predictions)), meta=plan.data_frame)
    assert looker.score(plan.name, "base").metrics == complete.metrics


def test_the_rounds_stop_after_the_look_that_finds_a_failure(mini):
    reference = load_reference(TINY_REFERENCE)
    plans = _plans(mini)
    produced = []
    looks = iter([False, False, True])


    record = run_rounds(plans, SETTINGS, 0.01, lambda n, rows: produced.append(n),
                        lambda rows, done: Decision([FAILURE]) if next(looks) else Decision())
    assert produced == [1, 2, 3] and record.stopped and record.rounds_done == 3
    assert 0 < record.rows_used < record.rows_total == sum(p.rows for p in plans)
    described = record.describe()
    assert described["rows_total"] == record.rows_total and described["decided_by"]["row"] == "ChartQA_TEST-Overall"
    assert record.headline().startswith("STOPPED EARLY after round 3")
    assert reference.gate.stop_early_alpha == 0.01


def test_each_adapter_of_a_series_stops_on_its_own(mini):
    """checkpoint-a is certain to fail after round 2 and is generated no more; checkpoint-b is
    refused in round 1 (no decision) and dropped; checkpoint-c goes on to the last round."""
    plans = _plans(mini)
    generated = []

    def look(rows, done, judged):
        decisions = {name: Decision([FAILURE]) if name == "a" and len(generated) == 2 else Decision()
                     for name in judged if name != "b"}
        return decisions

    records = run_rounds_each(plans, SETTINGS, {"a": 0.005, "b": 0.005, "c": 0.005},
                              lambda number, rows, judged: generated.append(judged), look)
    assert generated[:3] == [("a", "b", "c"), ("a", "c"), ("c",)]
    assert len(generated) == len(SETTINGS.rounds)
    assert set(records) == {"a", "c"}  # b's rounds say nothing of it
    a, c = records["a"], records["c"]
    assert a.stopped and a.rounds_done == 2 and 0 < a.rows_used < a.rows_total and a.alpha == 0.005
    assert a.deciding is FAILURE and a.headline().startswith("STOPPED EARLY after round 2")
    assert not c.stopped and c.rounds_done == len(SETTINGS.rounds) and c.rows_used == c.rows_total
    # the one-adapter form is the same rounds for the variant "lavender"
    one = run_rounds(plans, SETTINGS, 0.01, lambda number, rows: None, lambda rows, done: Decision())
    assert one.rows_used == one.rows_total and one.rounds_done == len(SETTINGS.rounds)


def test_the_rounds_end_once_every_adapter_stopped(mini):
    plans = _plans(mini)
    generated = []
    records = run_rounds_each(plans, SETTINGS, {"a": 0.01, "b": 0.01},
                              lambda number, rows, judged: generated.append(judged),
                              lambda rows, done, judged: {name: Decision([FAILURE]) for name in judged})
    assert generated == [("a", "b")] and all(r.stopped and r.rounds_done == 1 for r in records.values())


def test_the_rounds_end_once_every_counted_adapter_stopped_cutting_the_others_short(mini):
    plans = _plans(mini)
    generated = []
    records = run_rounds_each(plans, SETTINGS, {"a": 0.01, "last": 0.01},
                              lambda number, rows, judged: generated.append(judged),
                              lambda rows, done, judged: {name: Decision([FAILURE]) if name == "last" and
                                                          len(generated) == 3 else Decision() for name in judged},
                              gated=("last",))
    assert generated == [("a", "last")] * 3
    assert records["last"].stopped and not records["last"].complete
    cut = records["a"]
    assert not cut.stopped and cut.ended_by == "last" and not cut.complete and cut.rounds_done == 3
    assert cut.describe()["ended_by"] == "last" and cut.headline().startswith("not judged: the rounds ended after round 3")


def test_with_every_adapter_refused_the_rounds_go_on_for_the_base(mini):
    plans = _plans(mini)
    generated, looked = [], []
    records = run_rounds_each(plans, SETTINGS, {"a": 0.01},
                              lambda number, rows, judged: generated.append((judged, sum(map(len, rows.values())))),
                              lambda rows, done, judged: looked.append(judged) or {})
    assert records == {} and looked == [("a",)]
    assert [judged for judged, _ in generated] == [("a",)] + [()] * (len(SETTINGS.rounds) - 1)
    assert sum(rows for _, rows in generated) == sum(p.rows for p in plans)  # every base row, in the rounds

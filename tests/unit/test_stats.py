"""The paired bootstrap: weights, metric forms, pairing."""

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks.base import Ratio, ScoreResult
from lavender_checks.gate.bootstrap import (
    PairingError,
    bootstrap_interval,
    bootstrap_weights,
    metric_from_forms,
    paired_bootstrap,
    paired_bootstrap_many,
    subset_sampling,
)


def question_result(correct, strata=None, ids=None, benchmark="ChartQA_TEST") -> ScoreResult:
    """A question-level result: one unit per question, a metric per stratum plus Overall."""
    correct = np.asarray(correct, dtype=float)
    n = len(correct)
    strata = np.asarray(strata if strata is not None else ["all"] * n, dtype=object)
    ids = list(ids) if ids is not None else list(range(n))
    units = pd.DataFrame({"unit": ids, "stratum": strata, "correct": correct})
    forms = {"Overall": [Ratio(correct, np.ones(n))]}
    for s in dict.fromkeys(strata):
        inside = (strata == s).astype(float)
        forms[s] = [Ratio(correct * inside, inside)]
    metrics = {key: float(metric_from_forms(terms, np.ones(n))[0]) for key, terms in forms.items()}
    samples = pd.DataFrame({"index": ids, "unit": ids, "score": correct})
    return ScoreResult(benchmark, metrics, samples, units, forms)


def test_weights_keep_every_stratum_size():
    # Interleaved strata of very different sizes, including a missing stratum value.
    strata = np.array(["a", "b", None, "b", "c", "a", "b", None, "b", "b", "a", "b"], dtype=object)
    units = pd.DataFrame({"unit": range(len(strata)), "stratum": strata})
    w = bootstrap_weights(units, 500, seed=3)
    assert w.shape == (500, len(strata))
    assert np.all(w >= 0) and np.all(w == np.round(w))
    for value in ("a", "b", "c"):
        inside = strata == value
        assert np.all(w[:, inside].sum(axis=1) == inside.sum()), value
    none = np.array([s is None for s in strata])
    assert np.all(w[:, none].sum(axis=1) == 2)
    # The single-unit stratum is always drawn exactly once; the others really resample.
    assert np.all(w[:, 4] == 1)
    assert w[:, strata == "b"].std() > 0.5


def test_weights_are_uniform_and_deterministic():
    units = pd.DataFrame({"unit": range(300), "stratum": np.repeat(["x", "y", "z"], 100)})
    w = bootstrap_weights(units, 2000, seed=11)
    # Each unit is drawn once per resample on average (multinomial with equal probabilities).
    assert np.allclose(w.mean(axis=0), 1.0, atol=0.12)
    assert np.array_equal(w, bootstrap_weights(units, 2000, seed=11))
    assert not np.array_equal(w, bootstrap_weights(units, 2000, seed=12))


def test_forms_at_weight_one_are_the_point_values():
    rng = np.random.default_rng(0)
    correct = (rng.random(250) < 0.37).astype(float)
    strata = np.where(np.arange(250) < 100, "test_human", "test_augmented")
    r = question_result(correct, strata)
    assert metric_from_forms(r.forms["Overall"], np.ones(250))[0] == pytest.approx(np.mean(correct) * 100, abs=1e-9)
    assert metric_from_forms(r.forms["test_human"], np.ones((1, 250)))[0] == pytest.approx(
        np.mean(correct[:100]) * 100, abs=1e-9)

    # MME-style: acc + acc+ per category, two terms over image-pair units.
    scores = (rng.random((40, 2)) < 0.7).astype(float)  # 40 images, two questions each
    terms = [Ratio(scores.sum(axis=1), np.full(40, 2.0)), Ratio(scores[:, 0] * scores[:, 1], np.ones(40))]
    expected = np.mean(scores.ravel()) * 100 + np.mean(scores[:, 0] * scores[:, 1]) * 100
    assert metric_from_forms(terms, np.ones(40))[0] == pytest.approx(expected, abs=1e-9)


def test_paired_interval_contains_the_point_and_gain_is_lavender_minus_base():
    rng = np.random.default_rng(1)
    base = (rng.random(1000) < 0.3).astype(float)
    lav = np.where(rng.random(1000) < 0.2, 1.0, base)
    r = paired_bootstrap(question_result(base), question_result(lav), "Overall",
                         n_resamples=1000, confidence=0.95, seed=0)
    assert r.base_lo <= base.mean() * 100 <= r.base_hi
    assert r.lav_lo <= lav.mean() * 100 <= r.lav_hi
    assert r.gain_lo <= (lav.mean() - base.mean()) * 100 <= r.gain_hi
    assert r.n_units == 1000 and r.n_resamples == 1000 and r.confidence == 0.95
    assert r.gain_lo > 0  # every change is a gain here


def test_paired_gain_interval_is_narrower_than_unpaired_when_correlated():
    rng = np.random.default_rng(2)
    base = (rng.random(2000) < 0.5).astype(float)
    lav = np.where(rng.random(2000) < 0.05, 1.0 - base, base)  # 95 % of answers unchanged
    b, l = question_result(base), question_result(lav)
    paired = paired_bootstrap(b, l, "Overall", n_resamples=1000, confidence=0.95, seed=5)
    # Unpaired: the two models resampled independently.
    wb = bootstrap_weights(b.units, 1000, seed=6)
    wl = bootstrap_weights(l.units, 1000, seed=7)
    gain = metric_from_forms(l.forms["Overall"], wl) - metric_from_forms(b.forms["Overall"], wb)
    unpaired_lo, unpaired_hi = np.quantile(gain, [0.025, 0.975])
    assert (paired.gain_hi - paired.gain_lo) < 0.5 * (unpaired_hi - unpaired_lo)


def test_units_are_matched_by_id_not_by_position():
    rng = np.random.default_rng(3)
    base = (rng.random(400) < 0.4).astype(float)
    lav = np.where(rng.random(400) < 0.3, 1.0, base)
    strata = np.where(np.arange(400) % 3 == 0, "s1", "s2")
    b = question_result(base, strata, ids=[f"u{i}" for i in range(400)])
    in_order = question_result(lav, strata, ids=[f"u{i}" for i in range(400)])
    perm = rng.permutation(400)
    shuffled = question_result(lav[perm], strata[perm], ids=[f"u{i}" for i in perm])
    kwargs = dict(n_resamples=300, confidence=0.9, seed=4)
    assert paired_bootstrap(b, in_order, "s1", **kwargs) == paired_bootstrap(b, shuffled, "s1", **kwargs)


def test_mixed_subsets_are_refused():
    base = question_result(np.ones(10), ids=range(10))
    fewer = question_result(np.ones(9), ids=range(9))
    other = question_result(np.ones(10), ids=range(1, 11))
    with pytest.raises(PairingError, match="different units.*must be paired"):
        paired_bootstrap(base, fewer, "Overall", n_resamples=10, seed=0)
    with pytest.raises(PairingError, match=r"1 only in base, e\.g\. \[0\].*1 only in Lavender, e\.g\. \[10\]"):
        paired_bootstrap(base, other, "Overall", n_resamples=10, seed=0)


def test_same_units_in_different_strata_are_refused():
    base = question_result(np.ones(4), strata=["a", "a", "b", "b"])
    lav = question_result(np.ones(4), strata=["a", "b", "a", "b"])
    with pytest.raises(PairingError, match="different strata"):
        paired_bootstrap(base, lav, "Overall", n_resamples=10, seed=0)


def test_summed_metrics_and_missing_forms():
    r = question_result([1, 0, 1, 1], strata=["a", "a", "b", "b"])
    both = paired_bootstrap_many(r, r, {"sum": ("a", "b"), "a": "a"}, n_resamples=50, seed=0)
    # a = mean of (1, 0) resampled: 0, 50 or 100; b = mean of (1, 1) = 100 always.
    assert 100 <= both["sum"].base_lo < both["sum"].base_hi <= 200
    assert both["sum"].gain_lo == both["sum"].gain_hi == 0.0  # same result on both sides
    with pytest.raises(KeyError, match="no bootstrap form for metric 'nope'"):
        paired_bootstrap(r, r, "nope", n_resamples=10, seed=0)


def test_zero_denominators_drop_resamples_only_off_strata():
    # A metric over units {0, 1} that cross the strata: some resamples draw neither.
    r = question_result([1, 0, 1, 0, 1, 0], strata=["a"] * 6)
    inside = np.array([1, 1, 0, 0, 0, 0], dtype=float)
    r.forms["pair"] = [Ratio(r.units["correct"].to_numpy() * inside, inside)]
    interval = bootstrap_interval(r, "pair", n_resamples=2000, confidence=0.95, seed=1)
    assert 0 < interval.n_resamples < 2000
    assert interval.n_units == 2
    # A metric over a whole stratum never loses a resample.
    assert bootstrap_interval(r, "a", n_resamples=2000, seed=1).n_resamples == 2000


def test_bad_inputs_are_explained():
    r = question_result([1, 0, 1])
    with pytest.raises(ValueError, match="weights cover 4 units"):
        metric_from_forms(r.forms["Overall"], np.ones((2, 4)))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(r, r, "Overall", n_resamples=10, confidence=95, seed=0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_weights(r.units, 0, seed=0)
    dup = question_result([1, 0], ids=["x", "x"])
    with pytest.raises(ValueError, match="duplicate unit ids"):
        paired_bootstrap(dup, dup, "Overall", n_resamples=10, seed=0)


# ------------------------------------------------------------------ subsets of a benchmark



def _mean_form(values):
    values = np.asarray(values, dtype=float)
    return [Ratio(values, np.ones_like(values), 100.0)]


def test_the_whole_benchmark_has_no_sampling_error():
    values = np.array([1, 0, 1, 1, 0, 1.0])
    s = subset_sampling([(_mean_form(values), 1.0)], np.array(["a"] * 3 + ["b"] * 3), {"a": 3, "b": 3})
    assert (s.sd, s.bias, s.n_units, s.n_population, s.bounded_strata) == (0.0, 0.0, 6, 6, ())


def test_the_sd_is_that_of_sampling_without_replacement():
    """Monte Carlo: the sd of a random half's mean around the full mean."""
    rng = np.random.default_rng(1)
    population = (rng.random(400) < 0.7).astype(float)
    full = population.mean() * 100
    means, sds = [], []
    for _ in range(2000):
        pick = rng.choice(400, size=100, replace=False)
        sample = population[pick]
        means.append(sample.mean() * 100 - full)
        sds.append(subset_sampling([(_mean_form(sample), 1.0)], np.array(["all"] * 100), {"all": 400}).sd)
    assert np.mean(sds) == pytest.approx(np.std(means), rel=0.1)
    # Closed form: 100 * sqrt((1 - n/N) s^2 / n).
    assert sds[0] > 0


def _least(n, span=1.0, z=1.959963984540054):
    rare = (z * z / 2) / (n + z * z)
    return span * span * rare * (1 - rare)


def test_one_unit_or_no_spread_gets_close_to_the_worst_case_variance():
    # One unit of a stratum of 10: N^2 (1 - 1/N) / 1 * (scale / N)^2 * p(1 - p), p = 0.4.
    one = subset_sampling([(_mean_form([1.0]), 1.0)], np.array(["a"]), {"a": 10})
    assert one.sd == pytest.approx(100 * np.sqrt(0.9 * _least(1)))
    assert 0.23 < _least(1) <= 0.25 and one.bounded_strata == ("a",)
    # Five units all right: no spread, the least variance again; a gain spans twice the range.
    alike = subset_sampling([(_mean_form([1.0] * 5), 1.0)], np.array(["a"] * 5), {"a": 10})
    assert alike.sd == pytest.approx(100 * np.sqrt(0.5 / 5 * _least(5)))
    gain = subset_sampling([(_mean_form([1.0] * 5), 1.0), (_mean_form([1.0] * 5), -1.0)],
                           np.array(["a"] * 5), {"a": 10})
    assert gain.sd == pytest.approx(2 * alike.sd)


def test_a_rare_unit_seen_once_does_not_shrink_the_band_to_nothing():
    # 1 wrong of 100 in the sample: the sample variance 0.0099 is below the least variance.
    values = np.ones(100)
    values[0] = 0.0
    s = subset_sampling([(_mean_form(values), 1.0)], np.array(["a"] * 100), {"a": 200})
    assert s.bounded_strata == ("a",)
    assert s.sd == pytest.approx(100 * np.sqrt(0.5 / 100 * _least(100)))
    spread = (np.arange(100) % 2).astype(float)  # half right: the sample's own variance
    t = subset_sampling([(_mean_form(spread), 1.0)], np.array(["a"] * 100), {"a": 200})
    assert t.bounded_strata == () and t.sd == pytest.approx(100 * np.sqrt(0.5 / 100 * spread.var(ddof=1)))


def test_strata_sampled_at_different_rates_give_a_bias():
    # Two strata of 100 units each, all right in "a", all wrong in "b"; the subset takes
    # 1 of "a" and 3 of "b": its mean is 25 %, the stratified estimate 50 %.
    values = np.array([1.0, 0.0, 0.0, 0.0])
    s = subset_sampling([(_mean_form(values), 1.0)], np.array(["a", "b", "b", "b"]), {"a": 100, "b": 100})
    assert s.bias == pytest.approx(25.0 - 50.0)
    assert (s.n_units, s.n_population) == (4, 200)


def test_a_numerator_beyond_its_denominator_is_refused():
    with pytest.raises(ValueError, match="outside"):
        subset_sampling([([Ratio(np.array([2.0]), np.array([1.0]))], 1.0)], np.array(["a"]), {"a": 2})


def test_the_variance_is_taken_at_the_reported_value():
    # 1 right of 24 drawn from a stratum of 96 whose whole has 20 % right: the sample's own
    # variance (4 %) would give a band too narrow to reach 20 %; at the reported 20 % it is
    # the variance a 0/1 score has there.
    values = np.zeros(24)
    values[0] = 1.0
    strata, population = np.array(["a"] * 24), {"a": 96}
    own = subset_sampling([(_mean_form(values), 1.0)], strata, population)
    tested = subset_sampling([(_mean_form(values), 1.0, 20.0)], strata, population)
    assert tested.sd == pytest.approx(100 * np.sqrt(0.75 / 24 * (values.var(ddof=1) + 0.2 * 0.8 - (1 / 24) * (23 / 24))))
    assert tested.sd > 1.5 * own.sd  # 7.1 against 4.5 (already raised to the least variance)
    # A gain adds each model's change, the pair's covariance kept.
    lav = values.copy()
    lav[1] = 1.0
    gain = subset_sampling([(_mean_form(lav), 1.0, 25.0), (_mean_form(values), -1.0, 20.0)], strata, population)
    moves = (0.25 * 0.75 - (2 / 24) * (22 / 24)) + (0.2 * 0.8 - (1 / 24) * (23 / 24))
    assert gain.bounded_strata == ()
    assert gain.sd == pytest.approx(100 * np.sqrt(0.75 / 24 * ((lav - values).var(ddof=1) + moves)))

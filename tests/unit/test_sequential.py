"""The confidence sequences and the early-FAIL decision of --stop-early (gate/sequential.py)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks.base import Ratio, ScoreResult
from lavender_checks.gate.bootstrap import paired_bootstrap_many
from lavender_checks.gate.sequential import (
    CaseSample,
    GateCase,
    band_bound,
    case_alphas,
    decide,
    load_settings,
    mean_bounds,
    total_bounds,
    wor_confidence_sequence,
)

REFERENCE_VALUES = Path(__file__).parent / "data" / "confseq_predmix_eb_wor.json"
SETTINGS = load_settings()


@pytest.mark.parametrize("case", json.loads(REFERENCE_VALUES.read_text())["cases"], ids=lambda c: c["name"])
def test_the_sequence_is_the_authors_own(case):
    """Against confseq 0.0.11's predmix_empbern_twosided_cs (scripts/confseq_reference_values.py)."""
    lo, hi = wor_confidence_sequence(np.array(case["x"]), case["N"], case["alpha"], cap=case["truncation"],
                                     horizon=case["fixed_n"])
    np.testing.assert_allclose(np.maximum(lo, 0), case["lower"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.minimum(hi, 1), case["upper"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["rare", "uniform", "three values", "constant"])
def test_the_bounds_hold_at_every_draw_at_least_as_often_as_promised(kind):
    rng = np.random.default_rng(7)
    n, runs, alpha = 300, 2000, 0.1
    population = {"rare": (rng.random(n) < 0.05).astype(float), "uniform": rng.random(n),
                  "three values": rng.choice([0.0, 0.5, 1.0], n), "constant": np.full(n, 0.5)}[kind]
    draws = population[np.argsort(rng.random((runs, n)), axis=1)]
    lo, hi = mean_bounds(draws, n, alpha, SETTINGS)
    truth = population.mean()
    missed = ((lo > truth + 1e-12) | (hi < truth - 1e-12)).any(axis=1)
    assert missed.mean() <= alpha
    # and, where they held, they close on the truth once every value is seen
    np.testing.assert_allclose(lo[~missed, -1], truth, atol=1e-9)
    np.testing.assert_allclose(hi[~missed, -1], truth, atol=1e-9)


def test_total_bounds_scale_to_the_case_and_start_wide():
    sample = CaseSample(np.array([]), population=10, low=-2.0, high=2.0, unit_bound=2.0, scorer_units=10)
    assert total_bounds(sample, 0.01, SETTINGS) == (-20.0, 20.0)
    seen = CaseSample(np.zeros(10), population=10, low=-2.0, high=2.0, unit_bound=2.0, scorer_units=10)
    lo, hi = total_bounds(seen, 0.01, SETTINGS)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------ the band's bound


def _result(units, strata, numerators, denominators):
    frame = pd.DataFrame({"unit": units, "stratum": strata})
    return ScoreResult("ChartQA_TEST", {}, pd.DataFrame({"index": units, "unit": units}), frame,
                       {"m": [Ratio(np.asarray(numerators, float), np.asarray(denominators, float), 100.0)]})


def _populations():
    rng = np.random.default_rng(11)
    out = []
    for n, p_base, p_lav, strata in [(20, 0.5, 0.5, 1), (20, 0.05, 0.5, 1), (40, 0.5, 0.1, 2), (200, 0.3, 0.6, 2),
                                     (2500, 0.1, 0.32, 2), (30, 0.9, 0.1, 1), (1164, 0.31, 0.30, 20)]:
        base = (rng.random(n) < p_base).astype(float)
        lav = np.where(rng.random(n) < 0.8, base, (rng.random(n) < p_lav).astype(float))
        out.append((n, base, lav, np.arange(n) % strata))
    continuous = rng.random(500)
    out.append((500, continuous, np.clip(continuous + rng.normal(0, 0.3, 500), 0, 1), np.zeros(500, int)))
    return out


@pytest.mark.parametrize("population", _populations(), ids=lambda p: f"n{p[0]}")
def test_the_band_bound_covers_the_full_runs_bootstrap_band(population):
    """The full run's band half-width (percentile bootstrap, 2,000 resamples) never exceeds
    band_bound at the complete data's values: small, skewed, two-valued and stratified data."""
    n, base, lav, strata = population
    ones = np.ones(n)
    b, l = _result(np.arange(n), strata, base, ones), _result(np.arange(n), strata, lav, ones)
    unit_bound = 100.0 / n
    theta = {"base": 100.0 * base.mean(), "lavender": 100.0 * lav.mean()}
    worst = 0.0
    for seed in range(3):
        interval = paired_bootstrap_many(b, l, ["m"], n_resamples=2000, confidence=0.95, seed=seed)["m"]
        for quantity, half in (("base", interval.base.half_width), ("lavender", interval.lavender.half_width),
                               ("gain", interval.gain.half_width)):
            totals = ([(theta["lavender"],) * 2, (theta["base"],) * 2] if quantity == "gain"
                      else [(theta[quantity],) * 2])
            bound = band_bound(quantity, unit_bound, n, totals, 0.0, 0.95, SETTINGS.band_margin)
            assert half <= bound + 1e-9, (quantity, half, bound)
            worst = max(worst, half / bound if bound else 0.0)
    assert worst > 0.0  # the check compared real widths


def test_the_band_bound_never_goes_below_the_floor():
    assert band_bound("base", 0.04, 2500, [(0.0, 0.0)], 0.5, 0.95, 1.15) == 0.5


# ------------------------------------------------------------------ the decision


def _chartqa_cases(gain=22.64, mode="reproduce"):
    return [GateCase("ChartQA_TEST-Overall", "ChartQA_TEST", q, v, 0.01, one_sided=mode == "no-regression" and q != "base")
            for q, v in (("base", 9.96), ("lavender", 9.96 + gain), ("gain", gain))]


def _chartqa_samples(base, lav, drawn):
    n = len(base)
    common = dict(population=n, unit_bound=100.0 / n, scorer_units=n)
    b, l = 100.0 / n * base[:drawn], 100.0 / n * lav[:drawn]
    return {("ChartQA_TEST-Overall", "base"): CaseSample(b, low=0, high=100.0 / n, **common),
            ("ChartQA_TEST-Overall", "lavender"): CaseSample(l, low=0, high=100.0 / n, **common),
            ("ChartQA_TEST-Overall", "gain"): CaseSample(l - b, low=-100.0 / n, high=100.0 / n, **common)}


def test_an_adapter_that_changes_nothing_fails_within_five_percent():
    rng = np.random.default_rng(3)
    base = (rng.random(2500) < 0.0996).astype(float)
    decision = decide(_chartqa_cases(), _chartqa_samples(base, base, 125), 0.01 / 4, 0.95, SETTINGS)
    assert decision.stop
    assert ("ChartQA_TEST-Overall", "gain") in {(f.row_id, f.quantity) for f in decision.failures}
    failure = next(f for f in decision.failures if f.quantity == "gain")
    assert failure.direction == "below" and failure.bounds[1] < 22.64 - failure.band_bound


def test_a_model_that_reproduces_the_report_never_stops_it():
    rng = np.random.default_rng(4)
    base = np.zeros(2500)
    base[rng.choice(2500, 249, replace=False)] = 1
    lav = base.copy()
    lav[rng.choice(np.flatnonzero(base == 0), 566, replace=False)] = 1
    for drawn in (50, 125, 250, 500, 875, 1500, 2500):
        assert not decide(_chartqa_cases(), _chartqa_samples(base, lav, drawn), 0.01, 0.95, SETTINGS).stop


def test_no_regression_does_not_stop_on_a_gain_above_the_band():
    rng = np.random.default_rng(5)
    base = (rng.random(2500) < 0.0996).astype(float)
    better = np.maximum(base, (rng.random(2500) < 0.9).astype(float))
    both = _chartqa_samples(base, better, 400)
    assert decide(_chartqa_cases(mode="reproduce"), both, 0.01, 0.95, SETTINGS).stop
    assert not decide(_chartqa_cases(mode="no-regression"), both, 0.01, 0.95, SETTINGS).stop


def test_a_case_whose_band_cannot_be_bounded_never_stops_the_run():
    rng = np.random.default_rng(3)
    base = (rng.random(2500) < 0.0996).astype(float)
    samples = _chartqa_samples(base, base, 400)
    for key in samples:
        samples[key].linear = False
    decision = decide(_chartqa_cases(), samples, 0.01, 0.95, SETTINGS)
    assert not decision.stop and len(decision.undecidable) == 3


def test_alpha_is_shared_out_over_benchmarks_then_cases():
    cases = _chartqa_cases() + [GateCase("MME-total", "MME", q, 1.0, 0.01, False) for q in ("base", "lavender")]
    alphas = case_alphas(cases, 0.01)
    assert sum(alphas.values()) == pytest.approx(0.01)
    assert alphas[("MME-total", "base")] == pytest.approx(0.01 / 2 / 2)
    assert alphas[("ChartQA_TEST-Overall", "gain")] == pytest.approx(0.01 / 2 / 3)

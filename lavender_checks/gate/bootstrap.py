"""The paired bootstrap over resampling units.

Every metric of a ``ScoreResult`` is written as ``sum(scale * sum(w * num) / sum(w * den))``
over its ``units`` (``ScoreResult.forms``). With every weight equal to 1 that is the metric
itself; a bootstrap resample is one vector of weights: how many times each unit was drawn.

Resamples are drawn *within strata* (``units["stratum"]``: ChartQA's split, MMBench's and
MME's category), so every stratum keeps its size in every resample. That mirrors how the
benchmarks are built (fixed subset sizes) and means a metric whose terms are ratios over
whole strata (a category score, a split score, an overall mean) can never meet a zero
denominator. Only a term over a subset that is *not* a union of strata can; resamples in
which any term's denominator is zero are dropped (the interval is then conditional on that
subset being drawn) and ``BootstrapResult.n_resamples`` says how many were kept.

Base and Lavender are resampled with the *same* weights, unit by unit (paired): the gain's
interval then reflects only the units whose outcome changed, which is far narrower than two
independent intervals when, as here, most units answer alike under both models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lavender_checks.benchmarks.base import Ratio, ScoreResult

__all__ = [
    "BootstrapResult", "Interval", "PairingError", "bootstrap_weights", "metric_from_forms",
    "metric_forms", "paired_bootstrap", "paired_bootstrap_many", "bootstrap_interval",
    "bootstrap_intervals",
]

# A metric is named by a key of ScoreResult.forms, or by a sequence of keys whose forms
# are summed (a derived metric such as MME's total = perception + reasoning).
MetricSpec = str | Sequence[str]


class PairingError(ValueError):
    """Base and Lavender results that cannot be compared unit by unit."""


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval of one quantity."""

    lo: float
    hi: float
    n_units: int  # units that enter the metric (non-zero denominator in some term)
    n_resamples: int  # resamples kept (those with a zero denominator are dropped)
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals of base, Lavender and their gain (Lavender − base), paired."""

    base_lo: float
    base_hi: float
    lav_lo: float
    lav_hi: float
    gain_lo: float
    gain_hi: float
    n_units: int  # units that enter the metric (non-zero denominator in some term)
    n_resamples: int = 0  # resamples kept
    confidence: float = 0.0

    @property
    def base(self) -> Interval:
        return Interval(self.base_lo, self.base_hi, self.n_units, self.n_resamples, self.confidence)

    @property
    def lavender(self) -> Interval:
        return Interval(self.lav_lo, self.lav_hi, self.n_units, self.n_resamples, self.confidence)

    @property
    def gain(self) -> Interval:
        return Interval(self.gain_lo, self.gain_hi, self.n_units, self.n_resamples, self.confidence)


def bootstrap_weights(units: pd.DataFrame, n_resamples: int, seed: int) -> np.ndarray:
    """Resample weights, shape ``(n_resamples, len(units))``, float64.

    Row ``b`` counts how often each unit was drawn in resample ``b``: within each stratum
    of size ``n``, ``n`` draws with replacement, i.e. a Multinomial(n, uniform) count
    vector, so every row sums to ``n`` over every stratum. ``units`` needs a ``stratum``
    column unless there is a single stratum (a missing column or all-NaN values mean one
    stratum). Deterministic for a given ``seed`` and unit order.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n_units = len(units)
    if n_units == 0:
        raise ValueError("no resampling units: the result is empty")
    if "stratum" in units.columns:
        codes, _ = pd.factorize(units["stratum"], use_na_sentinel=False)
    else:
        codes = np.zeros(n_units, dtype=np.intp)
    # Put each stratum's units side by side, draw positions inside each stratum's block,
    # count them per resample, then put the counts back into the units' own order.
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # uint16 draws are several times faster than int64 ones; positions must fit the type.
    dtype = np.uint16 if n_units <= np.iinfo(np.uint16).max else np.uint32
    rng = np.random.default_rng(seed)
    draws = np.empty((n_resamples, n_units), dtype=dtype)
    for start, size in zip(starts, sizes):
        block = draws[:, start:start + size]
        block[...] = rng.integers(0, size, size=(n_resamples, size), dtype=dtype)
        block += dtype(start)
    weights = np.empty((n_resamples, n_units), dtype=np.float64)
    # One bincount per resample touches a unit-sized array that stays in cache; a single
    # bincount over the flattened (resample, position) pairs is several times slower.
    if np.array_equal(order, np.arange(n_units)):
        for b in range(n_resamples):
            weights[b] = np.bincount(draws[b], minlength=n_units)
    else:
        for b in range(n_resamples):
            weights[b, order] = np.bincount(draws[b], minlength=n_units)
    return weights


def metric_from_forms(forms: Sequence[Ratio], weights: np.ndarray) -> np.ndarray:
    """``sum(scale * (W @ num) / (W @ den))`` over the terms, one value per row of ``W``.

    ``weights`` is ``(B, U)`` (or ``(U,)`` for one resample). A resample where some term's
    denominator is zero gives NaN for that resample (see the module docstring).
    """
    if not forms:
        raise ValueError("a metric needs at least one Ratio term")
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_units = w.shape[1]
    for term in forms:
        if len(term.numerator) != n_units or len(term.denominator) != n_units:
            raise ValueError(
                f"a Ratio term has {len(term.numerator)} numerators and {len(term.denominator)} "
                f"denominators, but the weights cover {n_units} units"
            )
    # One matrix product for all terms: columns are num_1, den_1, num_2, den_2, ...
    columns = np.empty((n_units, 2 * len(forms)), dtype=np.float64)
    for i, term in enumerate(forms):
        columns[:, 2 * i] = term.numerator
        columns[:, 2 * i + 1] = term.denominator
    sums = w @ columns
    scales = np.array([term.scale for term in forms], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = sums[:, 0::2] / sums[:, 1::2]
    ratios[sums[:, 1::2] == 0] = np.nan
    return ratios @ scales if len(forms) > 1 else ratios[:, 0] * scales[0]


def metric_forms(result: ScoreResult, metric: MetricSpec) -> list[Ratio]:
    """The Ratio terms of ``metric`` in ``result``; a sequence of keys sums their terms."""
    keys = [metric] if isinstance(metric, str) else list(metric)
    terms: list[Ratio] = []
    for key in keys:
        if key not in result.forms:
            raise KeyError(
                f"{result.benchmark}: no bootstrap form for metric {key!r}; "
                f"forms exist for: {', '.join(result.forms) or 'none'}"
            )
        terms.extend(result.forms[key])
    return terms


def _checked_unit_ids(result: ScoreResult, label: str) -> pd.Index:
    if "unit" not in result.units.columns:
        raise ValueError(f"{result.benchmark} ({label}): ScoreResult.units has no 'unit' column")
    ids = pd.Index(result.units["unit"])
    if ids.has_duplicates:
        dupes = ids[ids.duplicated()].unique()[:5].tolist()
        raise ValueError(f"{result.benchmark} ({label}): duplicate unit ids in ScoreResult.units: {dupes}")
    return ids


def _pair(base: ScoreResult, lavender: ScoreResult) -> np.ndarray:
    """Positions of base's units within Lavender's units; refuses anything but the same units."""
    if base.benchmark != lavender.benchmark:
        raise PairingError(
            f"cannot pair results of different benchmarks: {base.benchmark!r} and {lavender.benchmark!r}"
        )
    base_ids = _checked_unit_ids(base, "base")
    lav_ids = _checked_unit_ids(lavender, "lavender")
    position = lav_ids.get_indexer(base_ids)
    only_base = base_ids[position < 0]
    only_lav = lav_ids.difference(base_ids, sort=False)
    if len(only_base) or len(only_lav):
        raise PairingError(
            f"{base.benchmark}: base and Lavender were scored on different units "
            f"(base {len(base_ids)}, Lavender {len(lav_ids)}; {len(only_base)} only in base, e.g. "
            f"{only_base[:3].tolist()}; {len(only_lav)} only in Lavender, e.g. {only_lav[:3].tolist()}). "
            "The comparison must be paired: score both on the same subset."
        )
    if "stratum" in base.units.columns or "stratum" in lavender.units.columns:
        base_strata = base.units["stratum"].to_numpy() if "stratum" in base.units else None
        lav_strata = lavender.units["stratum"].to_numpy()[position] if "stratum" in lavender.units else None
        if base_strata is None or lav_strata is None or not pd.Series(base_strata).equals(pd.Series(lav_strata)):
            raise PairingError(
                f"{base.benchmark}: base and Lavender put the same units in different strata"
            )
    return position


def _reordered(terms: list[Ratio], position: np.ndarray) -> list[Ratio]:
    return [Ratio(np.asarray(t.numerator)[position], np.asarray(t.denominator)[position], t.scale)
            for t in terms]


def _units_in(terms: list[Ratio]) -> int:
    """How many units enter a metric: those with a non-zero denominator in some term."""
    inside = np.zeros(len(terms[0].denominator), dtype=bool)
    for term in terms:
        inside |= np.asarray(term.denominator) != 0
    return int(inside.sum())


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def paired_bootstrap_many(
    base: ScoreResult,
    lavender: ScoreResult,
    metrics: Mapping[str, MetricSpec] | Sequence[str],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, BootstrapResult]:
    """``paired_bootstrap`` for several metrics of one benchmark, sharing one weight draw.

    ``metrics`` is a list of metric keys, or a mapping name -> key or sequence of keys
    (summed). Raises ``PairingError`` unless both results cover exactly the same units.
    """
    _check_confidence(confidence)
    named = dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}
    position = _pair(base, lavender)
    # Resolve every form before drawing weights, so a missing form fails fast.
    terms = {name: (metric_forms(base, spec), _reordered(metric_forms(lavender, spec), position))
             for name, spec in named.items()}
    weights = bootstrap_weights(base.units, n_resamples, seed)
    out = {}
    for name, (base_terms, lav_terms) in terms.items():
        base_values = metric_from_forms(base_terms, weights)
        lav_values = metric_from_forms(lav_terms, weights)
        gain = lav_values - base_values
        kept = np.isfinite(gain)  # same weights, so a dropped resample is dropped for both
        if not kept.any():
            raise ValueError(
                f"{base.benchmark}: metric {name!r} has a zero denominator in every resample"
            )
        base_lo, base_hi = _percentiles(base_values[kept], confidence)
        lav_lo, lav_hi = _percentiles(lav_values[kept], confidence)
        gain_lo, gain_hi = _percentiles(gain[kept], confidence)
        out[name] = BootstrapResult(base_lo, base_hi, lav_lo, lav_hi, gain_lo, gain_hi,
                                    n_units=_units_in(base_terms), n_resamples=int(kept.sum()),
                                    confidence=confidence)
    return out


def paired_bootstrap(
    base: ScoreResult,
    lavender: ScoreResult,
    metric: MetricSpec,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile intervals of base, Lavender and gain for one metric, from the same weights.

    Units are matched by ``unit`` id; results that do not cover the same units (mixed
    subsets) raise ``PairingError``. ``metric`` is a key of ``forms`` or a sequence of keys
    whose forms are summed (MME total: ``("perception", "reasoning")``).
    """
    return paired_bootstrap_many(base, lavender, {"metric": metric}, n_resamples=n_resamples,
                                 confidence=confidence, seed=seed)["metric"]


def bootstrap_intervals(
    result: ScoreResult,
    metrics: Mapping[str, MetricSpec] | Sequence[str],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Intervals of one result's metrics on their own (when its partner result is missing)."""
    _check_confidence(confidence)
    named = dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}
    _checked_unit_ids(result, "result")
    terms = {name: metric_forms(result, spec) for name, spec in named.items()}
    weights = bootstrap_weights(result.units, n_resamples, seed)
    out = {}
    for name, metric_terms in terms.items():
        values = metric_from_forms(metric_terms, weights)
        kept = np.isfinite(values)
        if not kept.any():
            raise ValueError(
                f"{result.benchmark}: metric {name!r} has a zero denominator in every resample"
            )
        lo, hi = _percentiles(values[kept], confidence)
        out[name] = Interval(lo, hi, _units_in(metric_terms), int(kept.sum()), confidence)
    return out


def bootstrap_interval(
    result: ScoreResult,
    metric: MetricSpec,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The percentile interval of one metric of one result."""
    return bootstrap_intervals(result, {"metric": metric}, n_resamples=n_resamples,
                               confidence=confidence, seed=seed)["metric"]

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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from lavender_checks.benchmarks.base import Ratio, ScoreResult

__all__ = [
    "BootstrapResult", "Interval", "PairingError", "bootstrap_weights", "metric_from_forms",
    "metric_forms", "paired_bootstrap", "paired_bootstrap_many", "bootstrap_interval",
    "bootstrap_intervals", "SubsetSampling", "subset_sampling", "paired_subset_sampling",
    "result_subset_sampling",
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


# ------------------------------------------------------------------ subsets of a benchmark


@dataclass(frozen=True)
class SubsetSampling:
    """How far a subset's metric may lie from the whole benchmark's, for the rows not run.

    A run on a subset (``--limit``, ``--fraction``, one shard) measures a sample of the
    benchmark: within each stratum ``h``, ``n_h`` of its ``N_h`` units, drawn without
    replacement. Its metric ``M`` estimates the whole benchmark's value ``F``, and
    ``M − F`` has two parts:

    * ``bias``: a term that pools several strata (an MMBench ``Overall``) weights them by
      the subset's counts, not the benchmark's, when strata are sampled at different rates
      (``--limit`` takes the same number from each). Estimated as ``M − M_w``, with ``M_w``
      the stratified estimate that weights every unit by ``N_h / n_h``.
    * ``sd``: the standard deviation of ``M_w`` around ``F`` (linearised ratio estimator of
      stratified sampling without replacement): ``Σ_h N_h² (1 − n_h/N_h) s_h² / n_h``,
      ``s_h²`` the variance of the units' linearised contributions in stratum ``h``.
      The variance is the one *under the hypothesis being tested* (a score test, as Wilson's
      interval is to Wald's): with a part's ``reported`` value given, every stratum's mean
      score is shifted by one amount so that ``M_w`` equals it, and ``s_h²`` is the sample's
      variance plus what a two-valued score gains or loses when its rate moves from the
      sample's ``p̂_h`` to the shifted ``p_h``: ``range² · (p_h(1 − p_h) − p̂_h(1 − p̂_h))``
      (exact for scores of 0 or 1; for a gain, each model's change is added, the pair's
      covariance kept). The sample's own variance is smallest exactly when a draw lies far
      from the whole (one right of 24 where the stratum has one in five): a band from it
      would fail a correct model too often.
      A sample's variance says nothing for one unit, and too little when its units all scored
      alike or a rare kind of unit showed up once or never (which a small sample shows
      often and the whole stratum rarely). So ``s_h²`` is at least ``range² · p̃(1 − p̃)``,
      the variance of a two-valued contribution whose rarer value has Agresti–Coull's
      frequency for none seen, ``p̃ = (z²/2) / (n_h + z²)``: close to the largest variance a
      bounded contribution can have (range² / 4, p(1 − p) at p = ½) for one unit, and
      shrinking as the sample grows. Each unit's score lies in [0, 1], so its contribution
      spans ``range = scale · den / D``, and a gain's twice that.

    The whole benchmark gives ``sd = bias = 0``.
    """

    sd: float
    bias: float
    n_units: int  # units of the metric in the subset
    n_population: int  # units of the metric's strata in the whole benchmark
    bounded_strata: tuple[str, ...] = ()  # strata whose variance is the least one allowed

    @property
    def fraction(self) -> float:
        return self.n_units / self.n_population if self.n_population else 1.0




def _stratum_codes(strata: np.ndarray, population: Mapping[Any, int]) -> tuple[list, np.ndarray, np.ndarray]:
    """The distinct sampled strata, each unit's position among them, and each one's N_h."""
    labels, codes = [], np.empty(len(strata), dtype=np.intp)
    seen: dict[Any, int] = {}
    for i, value in enumerate(strata):
        key = "all" if value is None or (isinstance(value, float) and np.isnan(value)) else value
        if key not in seen:
            seen[key] = len(labels)
            labels.append(key)
        codes[i] = seen[key]
    sampled = np.bincount(codes, minlength=len(labels))
    # A stratum the population does not know (a frame without the stratum column) is taken
    # as complete: nothing can be said of rows nobody listed.
    sizes = np.array([max(int(population.get(k, 0)), int(sampled[j])) for j, k in enumerate(labels)])
    return labels, codes, sizes


def subset_sampling(
    parts: Sequence[tuple[Sequence[Ratio], float] | tuple[Sequence[Ratio], float, float | None]],
    strata: np.ndarray,
    population: Mapping[Any, int],
    confidence: float = 0.95,
) -> SubsetSampling:
    """``SubsetSampling`` of ``Σ sign · metric(terms)`` over ``parts`` = [(terms, sign), ...]
    or [(terms, sign, reported), ...].

    One part is a metric of one model; the gain is ``[(lavender, +1), (base, −1)]``, whose
    units are paired (same order). ``reported``: the whole benchmark's value of the part's
    metric under test (its variance is taken at that value; None: at the sample's own).
    ``strata`` gives each unit's stratum, ``population`` each stratum's units in the whole
    benchmark (``Benchmark.population``).
    """
    labels, codes, sizes = _stratum_codes(np.asarray(strata, dtype=object), population)
    n_sampled = np.bincount(codes, minlength=len(labels)).astype(np.float64)
    expansion = (sizes / np.maximum(n_sampled, 1))[codes]  # N_h / n_h of each unit's stratum
    n_all = len(codes)
    contribution = np.zeros(n_all)
    span = np.zeros(n_all)
    inside = np.zeros(n_all, dtype=bool)
    bias = 0.0
    # Per part with a reported value: each unit's score (its contribution's place within its
    # range, in [0, 1]), that range, and how far the part's estimate lies from the value.
    hypotheses: list[tuple[np.ndarray, np.ndarray, float]] = []
    for part in parts:
        terms, sign = part[0], part[1]
        reported = part[2] if len(part) > 2 else None
        part_lo, part_span, part_value = np.zeros(n_all), np.zeros(n_all), np.zeros(n_all)
        estimate = 0.0
        for term in terms:
            num = np.asarray(term.numerator, dtype=np.float64)
            den = np.asarray(term.denominator, dtype=np.float64)
            if len(num) != n_all or len(den) != n_all:
                raise ValueError(f"a Ratio term covers {len(num)} units, the strata {n_all}")
            if np.any(num < -1e-12) or np.any(num > den + 1e-12):
                raise ValueError("a Ratio term has a unit whose numerator is outside [0, denominator]")
            if den.sum() == 0:
                continue
            inside |= den != 0
            total = float(expansion @ den)  # the whole benchmark's denominator, estimated
            weighted = float(expansion @ num) / total
            estimate += term.scale * weighted
            bias += sign * term.scale * (num.sum() / den.sum() - weighted)
            contribution += sign * term.scale * (num - weighted * den) / total
            span += term.scale * den / total
            part_lo -= term.scale * weighted * den / total
            part_span += term.scale * den / total
            part_value += term.scale * (num - weighted * den) / total
        if reported is not None and math.isfinite(reported):
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(part_span > 0, (part_value - part_lo) / part_span, 0.0)
            hypotheses.append((np.clip(score, 0.0, 1.0), part_span, float(reported) - estimate))
    _check_confidence(confidence)
    z2 = NormalDist().inv_cdf(0.5 + confidence / 2.0) ** 2
    sampled_strata = []  # (members, n_h, N_h) of the strata the metric touches and the run lacks
    for j in range(len(labels)):
        members = (codes == j) & inside
        n_h, size = int(members.sum()), int(sizes[j])
        if 0 < n_h < size:
            sampled_strata.append((j, members, n_h, size))
    # One shift of every sampled stratum's mean score per part, so that the estimate would
    # equal the reported value (strata the run has whole are known exactly and do not move).
    shifts = []
    for score, part_span, distance in hypotheses:
        reach = sum(size * float(np.max(part_span[members])) for _, members, _, size in sampled_strata)
        shifts.append(distance / reach if reach > 0 else 0.0)
    variance = 0.0
    bounded = []
    for j, members, n_h, size in sampled_strata:
        values = contribution[members]
        s2 = float(values.var(ddof=1)) if n_h > 1 else 0.0
        for (score, part_span, _), shift in zip(hypotheses, shifts):
            rate = float(score[members].mean())
            moved = min(max(rate + shift, 0.0), 1.0)
            s2 += float(np.max(part_span[members])) ** 2 * (moved * (1 - moved) - rate * (1 - rate))
        rare = (z2 / 2.0) / (n_h + z2)
        least = float(np.max(span[members])) ** 2 * rare * (1.0 - rare)
        if s2 < least:
            s2 = least
            bounded.append(str(labels[j]))
        variance += size * size * (1.0 - n_h / size) * s2 / n_h
    touched = {codes[i] for i in np.flatnonzero(inside)}
    return SubsetSampling(sd=float(np.sqrt(variance)), bias=float(bias), n_units=int(inside.sum()),
                          n_population=int(sum(int(sizes[j]) for j in touched)),
                          bounded_strata=tuple(bounded))


def paired_subset_sampling(
    base: ScoreResult,
    lavender: ScoreResult,
    metrics: Mapping[str, MetricSpec],
    population: Mapping[Any, int],
    confidence: float = 0.95,
    reported: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, SubsetSampling]]:
    """name -> {"base", "lavender", "gain"} -> ``SubsetSampling``, units paired as in
    ``paired_bootstrap_many`` (raises ``PairingError`` on different units). ``reported``:
    name -> {"base": value, "lavender": value} under test (``subset_sampling``)."""
    position = _pair(base, lavender)
    strata = _strata_of(base)
    out = {}
    for name, spec in metrics.items():
        base_terms = metric_forms(base, spec)
        lav_terms = _reordered(metric_forms(lavender, spec), position)
        values = (reported or {}).get(name, {})
        b, l = values.get("base"), values.get("lavender")
        out[name] = {
            "base": subset_sampling([(base_terms, 1.0, b)], strata, population, confidence),
            "lavender": subset_sampling([(lav_terms, 1.0, l)], strata, population, confidence),
            "gain": subset_sampling([(lav_terms, 1.0, l), (base_terms, -1.0, b)], strata, population,
                                    confidence),
        }
    return out


def result_subset_sampling(result: ScoreResult, metrics: Mapping[str, MetricSpec],
                           population: Mapping[Any, int], confidence: float = 0.95,
                           reported: Mapping[str, float] | None = None) -> dict[str, SubsetSampling]:
    """name -> ``SubsetSampling`` of one result's metrics on their own; ``reported``: name ->
    the value under test (``subset_sampling``)."""
    strata = _strata_of(result)
    return {name: subset_sampling([(metric_forms(result, spec), 1.0, (reported or {}).get(name))],
                                  strata, population, confidence)
            for name, spec in metrics.items()}


def _strata_of(result: ScoreResult) -> np.ndarray:
    if "stratum" in result.units.columns:
        return result.units["stratum"].to_numpy(dtype=object)
    return np.full(len(result.units), "all", dtype=object)

"""Stopping a gate run early: when is the full run's verdict of a case certain to be FAIL?

A run with ``--stop-early`` takes each benchmark's sampling units (``run.rounds``: rows that
share an image or a scoring unit, drawn in a seeded uniformly random order) in rounds, and
after each round asks of every gate case whether the value the *complete* run would measure
is certain, with confidence 1 − α, to lie outside the band the complete run will have.

**The value.** Every metric is ``Σ_k scale_k · Σ_u num_ku / D_k`` over the scorer's units
(``ScoreResult.forms``); the denominators ``D_k`` of the whole benchmark are known before any
prediction (they count rows, not right answers), so a case's full-run value is a population
total ``θ = Σ_g x_g`` over the case's draw units ``g``, each ``x_g`` bounded in a known range
(``[0, b]`` for a model's metric, ``[−b, b]`` for a gain, the paired difference).

**The confidence sequence** (``wor_confidence_sequence``) is the predictable plug-in
empirical-Bernstein confidence sequence for the mean of a finite population sampled without
replacement (Waudby-Smith & Ramdas, "Confidence sequences for sampling without replacement",
NeurIPS 2020, Theorem 4; the betting form in "Estimating means of bounded random variables by
betting", JRSS B 2023): with ``μ_t^WoR(m) = (N m − Σ_{i<t} X_i) / (N − t + 1)`` the mean of
the units not drawn yet under the hypothesis ``m``,

    Π_i exp(λ_i (X_i − μ_i^WoR(m)) − ψ_E(λ_i) (X_i − μ̂_{i−1})²),   ψ_E(λ) = −log(1 − λ) − λ,

is a nonnegative supermartingale for every predictable λ_i ∈ [0, 1), which gives the closed
form ``center ± margin`` of ``wor_confidence_sequence``; it is valid at every t at once, so
looking after every round costs nothing. Two sequences with different caps on λ (one for
the usual spread of answers, one for an adapter that changes almost nothing) each get half of
the case's α, and the run keeps their intersection over all t, together with the bounds no
unseen unit can break (``[S_t + (N − t)·low, S_t + (N − t)·high]``). The implementation is
checked against the authors' own (confseq 0.0.11's ``predmix_empbern_twosided_cs``) in
``tests/unit/test_sequential.py``.

**The band.** The full run's band is ``reported ± h`` with ``h = max(floor, the percentile
bootstrap half-width)`` of the complete data, not known yet; it is bounded from above
(``band_bound``): when every term's denominator is constant within each stratum the metric is
linear in the bootstrap's weights and its bootstrap variance is ``Σ_h Σ_{u∈h} (v_u − v̄_h)²``
over scorer units ``u`` with ``v_u ∈ [0, B]``, at most ``B·θ − θ²/N`` for a model's metric and
``B·(θ_Lavender + θ_base)`` for a gain; the largest value over the confidence sequences of θ
(of both models, for a gain), times the normal quantile of the reference's confidence and a
margin ``band_margin`` for the percentile interval (its validity is tested on skewed, small
and two-valued data in ``tests/unit/test_sequential.py``), bounds ``h``. A case whose terms
are not linear in the weights never stops a run.

**The decision.** A case's full-run verdict is certainly FAIL when its confidence sequence
misses every band the complete run can have (two-sided, or below it for the one-sided
quantities of ``no-regression``). α (the reference's ``[gate] stop_early_alpha``, default
0.01) is shared out over the run's cases: each benchmark of the run gets an equal part, each
case of a benchmark an equal part of that, so the chance that a run stops on a case whose
full-run verdict is not FAIL is at most α in all.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "CaseSample", "Decision", "EarlyFailure", "GateCase", "StopEarlySettings", "band_bound", "case_alphas",
    "decide", "failure_direction", "judge_cases", "load_settings", "mean_bounds", "stop_headline", "to_totals",
    "total_bounds", "wor_confidence_sequence",
]

_SETTINGS = Path(__file__).with_name("stop_early.toml")
DEFAULT_ALPHA = 0.01


@dataclass(frozen=True)
class StopEarlySettings:
    """``gate/stop_early.toml``: the rounds and the confidence sequences' tuning."""

    rounds: tuple[float, ...]  # cumulative share of every benchmark's draw units after each round
    band_margin: float  # percentile bootstrap half-width <= band_margin · z · bootstrap SD
    horizon: float  # the share of a population the bets are tuned for
    caps: tuple[float, ...]  # caps on λ of the sequences whose intersection is kept


def load_settings(path: str | Path = _SETTINGS) -> StopEarlySettings:
    with Path(path).open("rb") as fh:
        raw = tomllib.load(fh)
    rounds = tuple(float(f) for f in raw["rounds"])
    if not rounds or rounds[-1] != 1.0 or any(not 0 <= a < b for a, b in zip((0.0,) + rounds, rounds)):
        raise ValueError(f"{path}: rounds must rise strictly from above 0 to 1.0, got {list(rounds)}")
    caps = tuple(float(c) for c in raw["caps"])
    if not caps or any(not 0 < c < 1 for c in caps):
        raise ValueError(f"{path}: every cap must lie in (0, 1), got {list(caps)}")
    if not float(raw["band_margin"]) >= 1.0 or not 0 < float(raw["horizon"]) <= 1:
        raise ValueError(f"{path}: band_margin must be at least 1 and horizon in (0, 1], got "
                         f"{raw['band_margin']} and {raw['horizon']}")
    return StopEarlySettings(rounds=rounds, band_margin=float(raw["band_margin"]),
                             horizon=float(raw["horizon"]), caps=caps)


# ------------------------------------------------------------------ the confidence sequence


def wor_confidence_sequence(y: np.ndarray, population: int, alpha: float, *, cap: float = 0.5,
                            horizon: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds, at every t, of the mean of a population of ``population``
    values in [0, 1] from the first t of ``y`` (drawn uniformly without replacement), each
    side at level α/2 (module docstring). ``y`` may have leading axes (one sequence per row:
    simulations); the last axis is time. ``horizon``: the sample size the bets are tuned for
    (None: ``t·log(1 + t)``, the authors' default). No running intersection, no clipping."""
    return _sequences(y, population, alpha, (cap,), horizon)[0]


def _sequences(y: np.ndarray, population: int, alpha: float, caps: Sequence[float],
               horizon: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``wor_confidence_sequence`` for each cap, sharing what does not depend on it. The upper
    bound is the lower bound of ``1 − y`` turned back; both share their sums (the bets, the
    weights, the centre), so they are computed together."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape[-1] > population:
        raise ValueError(f"{y.shape[-1]} draws from a population of {population}")
    t = np.arange(1, y.shape[-1] + 1, dtype=np.float64)
    total = np.cumsum(y, axis=-1)
    start = np.zeros(y.shape[:-1] + (1,))
    # The bets: predictable, from a regularised mean and variance (confseq's lambda_predmix_eb);
    # the same for y and 1 − y (the regularised mean never reaches 1, so it is never clipped).
    regular_mean = (0.5 + total) / (t + 1)
    spread = (0.25 + np.cumsum((y - regular_mean) ** 2, axis=-1)) / (t + 1)
    spread_before = np.concatenate([start + 0.25, spread[..., :-1]], axis=-1)
    log_term = math.log(2.0 / alpha)
    scale = t * np.log1p(t) if horizon is None else float(horizon)
    unclipped = np.sqrt((2.0 * log_term / scale) / spread_before)
    # Each value's squared distance to the mean of the values before it (0 before the first);
    # for 1 − y the same but at the first value.
    mean_before = np.concatenate([start, total[..., :-1] / t[:-1]], axis=-1)
    distance = (y - mean_before) ** 2
    first = (1.0 - y[..., :1]) ** 2 - y[..., :1] ** 2
    remaining = population - t + 1
    lean = 1.0 + (t - 1) / remaining
    centred = y + (total - y) / remaining
    out = []
    for cap in caps:
        bets = np.minimum(unclipped, cap)
        psi = -np.log1p(-bets) - bets
        penalty = log_term + np.cumsum(distance * psi, axis=-1)
        weight = np.cumsum(bets * lean, axis=-1)
        center = np.cumsum(bets * centred, axis=-1)
        out.append(((center - penalty) / weight, (center + penalty + psi[..., :1] * first) / weight))
    return out


@dataclass
class CaseSample:
    """What one gate case has seen: its draw units' values in draw order, and the bounds.

    ``observed``: x_g of the drawn units, in order (a prefix of the case's draw order);
    ``population``: the case's draw units (those that enter its metric); every x_g lies in
    ``[low, high]``. ``unit_bound`` (B) and ``scorer_units`` (N) describe the scorer's units,
    which the full run's bootstrap resamples; ``linear``: whether that bootstrap is linear in
    the units' weights (every term's denominator constant within each stratum).
    """

    observed: np.ndarray
    population: int
    low: float
    high: float
    unit_bound: float
    scorer_units: int
    linear: bool = True

    @property
    def drawn(self) -> int:
        return len(self.observed)


def mean_bounds(y: np.ndarray, population: int, alpha: float, settings: StopEarlySettings
                ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the population mean of values in [0, 1] after each draw (last axis; leading
    axes are independent sequences), each with the running intersection over the earlier
    draws: the sequences of every cap of ``settings`` (an equal part of α each) and what no
    unseen value can change."""
    y = np.asarray(y, dtype=np.float64)
    steps = y.shape[-1]
    horizon = max(1, math.ceil(settings.horizon * population))
    (lo, hi), *others = _sequences(y, population, alpha / len(settings.caps), settings.caps, horizon)
    for a, b in others:
        np.maximum(lo, a, out=lo)
        np.minimum(hi, b, out=hi)
    seen = np.cumsum(y, axis=-1)
    unseen = population - np.arange(1, steps + 1)
    np.maximum(lo, seen / population, out=lo)
    np.minimum(hi, (seen + unseen) / population, out=hi)
    return np.maximum.accumulate(lo, axis=-1), np.minimum.accumulate(hi, axis=-1)


def to_totals(mean_lo: np.ndarray, mean_hi: np.ndarray, sample: CaseSample) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the mean of the scaled values (``mean_bounds``) as bounds of the total θ."""
    width = sample.high - sample.low
    n = sample.population
    return n * (sample.low + width * mean_lo), n * (sample.low + width * mean_hi)


def total_bounds(sample: CaseSample, alpha: float, settings: StopEarlySettings) -> tuple[float, float]:
    """The case's full-run value θ = Σ x_g lies in these bounds, with confidence 1 − α, at the
    current draw and (running intersection) at every earlier one."""
    width = sample.high - sample.low
    if sample.drawn == 0 or width <= 0:
        return sample.population * sample.low, sample.population * (sample.high if width > 0 else sample.low)
    y = (np.asarray(sample.observed, dtype=np.float64) - sample.low) / width
    lo, hi = mean_bounds(y, sample.population, alpha, settings)
    total_lo, total_hi = to_totals(lo[-1], hi[-1], sample)
    return float(total_lo), float(total_hi)


# ------------------------------------------------------------------ the band and the decision


def band_bound(quantity: str, unit_bound: float, scorer_units: int, totals: Sequence[tuple[Any, Any]],
               floor: float, confidence: float, margin: float) -> Any:
    """The largest half-width the full run's band can have (module docstring). ``totals``:
    the bounds of θ of the case itself (a model's metric) or of (Lavender, base) (a gain);
    numbers, or arrays of them (one per simulated run)."""
    if quantity == "gain":
        variance = unit_bound * sum(np.maximum(0.0, hi) for _, hi in totals)
    else:
        (lo, hi), = totals
        # B·θ − θ²/N is largest at θ = B·N/2, clipped to where θ can be.
        peak = np.minimum(np.maximum(unit_bound * scorer_units / 2.0, lo), hi)
        variance = np.maximum(0.0, unit_bound * peak - peak * peak / scorer_units)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return np.maximum(floor, margin * z * np.sqrt(variance))


def failure_direction(lo: Any, hi: Any, reported: float, half: Any, one_sided: bool) -> Any:
    """−1 where the full run's value is certainly below every band it can have, +1 above it
    (two-sided cases only), 0 where its verdict is not certain."""
    # The complete run's verdict forgives binary floating-point noise at the band's edge
    # (gate.verdicts): so does this.
    slack = 1e-9 * max(1.0, abs(reported))
    below = np.asarray(hi) < reported - np.asarray(half) - slack
    above = (np.asarray(lo) > reported + np.asarray(half) + slack) & (not one_sided)
    return np.where(below, -1, np.where(above, 1, 0))


@dataclass(frozen=True)
class EarlyFailure:
    """A case whose complete run is certain (confidence 1 − α) to fail it."""

    row_id: str
    quantity: str
    reported: float
    bounds: tuple[float, float]  # where the full run's value lies
    band_bound: float  # the full run's band is reported ± at most this
    direction: str  # "below" or "above" the band
    alpha: float  # this case's share of α
    drawn: int  # draw units seen
    population: int  # draw units of the case

    def describe(self) -> str:
        lo, hi = self.bounds
        side = (f"below {self.reported - self.band_bound:.2f}" if self.direction == "below"
                else f"above {self.reported + self.band_bound:.2f}")
        return (f"{self.row_id} {self.quantity}: the complete run's value lies in [{lo:.2f}, {hi:.2f}] "
                f"(confidence 1 - {self.alpha:.2g}), {side}, outside any band it can have "
                f"({self.reported:.2f} ± at most {self.band_bound:.2f}); "
                f"{self.drawn} of {self.population} draw units seen")


@dataclass(frozen=True)
class GateCase:
    """One verdict of the reference, as the decision needs it."""

    row_id: str
    benchmark: str
    quantity: str
    reported: float
    floor: float
    one_sided: bool  # no-regression: only a value below the band fails

    @property
    def key(self) -> tuple[str, str]:
        return (self.row_id, self.quantity)


@dataclass
class Decision:
    failures: list[EarlyFailure] = field(default_factory=list)
    undecidable: list[str] = field(default_factory=list)  # cases whose band cannot be bounded

    @property
    def stop(self) -> bool:
        return bool(self.failures)


def case_alphas(cases: Sequence[GateCase], alpha: float) -> dict[tuple[str, str], float]:
    """Each case's share of α: equal parts per benchmark, equal parts per case within it."""
    per_benchmark: dict[str, list[GateCase]] = {}
    for case in cases:
        per_benchmark.setdefault(case.benchmark, []).append(case)
    return {case.key: alpha / len(per_benchmark) / len(members)
            for members in per_benchmark.values() for case in members}


def judge_cases(cases: Sequence[GateCase], samples: Mapping[tuple[str, str], CaseSample],
                bounds: Mapping[tuple[str, str], tuple[Any, Any]], confidence: float,
                settings: StopEarlySettings) -> dict[tuple[str, str], tuple[Any, Any]]:
    """case -> (direction, band bound) of every case that can be decided (``failure_direction``),
    from the bounds of every case's θ (numbers, or arrays: one per simulated run). A case whose
    band cannot be bounded (its bootstrap is not linear in the weights) or whose parts are not
    all seen is left out."""
    out = {}
    for case in cases:
        sample = samples.get(case.key)
        if sample is None or case.key not in bounds:
            continue
        parts = [(case.row_id, "lavender"), (case.row_id, "base")] if case.quantity == "gain" else [case.key]
        if not all(p in samples and samples[p].linear and p in bounds for p in parts):
            continue
        half = band_bound(case.quantity, sample.unit_bound, sample.scorer_units, [bounds[p] for p in parts],
                          case.floor, confidence, settings.band_margin)
        lo, hi = bounds[case.key]
        out[case.key] = (failure_direction(lo, hi, case.reported, half, case.one_sided), half)
    return out


def decide(cases: Sequence[GateCase], samples: Mapping[tuple[str, str], CaseSample], alpha: float,
           confidence: float, settings: StopEarlySettings) -> Decision:
    """Which cases' complete-run verdicts are certainly FAIL, from what has been seen.

    ``samples``: (row_id, quantity) -> ``CaseSample``; a case without one (its benchmark has
    not started) cannot be decided. ``confidence``: the reference's, of the full run's bands.
    """
    alphas = case_alphas(cases, alpha)
    bounds = {case.key: total_bounds(samples[case.key], alphas[case.key], settings)
              for case in cases if samples.get(case.key) is not None and samples[case.key].drawn}
    judged = judge_cases(cases, samples, bounds, confidence, settings)
    decision = Decision(undecidable=[f"{c.row_id} {c.quantity}" for c in cases
                                     if c.key in bounds and c.key not in judged])
    for case in cases:
        if case.key not in judged:
            continue
        direction, half = judged[case.key]
        if int(direction) != 0:
            sample = samples[case.key]
            decision.failures.append(EarlyFailure(
                case.row_id, case.quantity, case.reported, bounds[case.key], float(half),
                "below" if int(direction) < 0 else "above", alphas[case.key], sample.drawn, sample.population))
    return decision


def stop_headline(early: Mapping) -> str:
    """What a ``--stop-early`` run says first (console's last lines, top of report.md), from
    ``report.json``'s ``early_stop``."""
    used, total = early["rows_used"], early["rows_total"]
    if early.get("ended_by"):  # a series' checkpoint, cut short once the exit status was certain
        return (f"not judged: the rounds ended after round {early['rounds_done']} ({used} of {total} rows "
                f"used), when {early['ended_by']}, which the exit status counts, had stopped early; "
                "no failure of this one was certain by then.")
    if not early["stopped"]:
        return (f"--stop-early: no failure was certain before the end: every row was used ({used} of "
                f"{total}); the verdicts are the complete run's.")
    share = used / total if total else 1.0
    parts = ", ".join(f"{name} {c['rows_used']}/{c['rows_total']}" for name, c in early["benchmarks"].items())
    decided = early["decided_by"]
    return (f"STOPPED EARLY after round {early['rounds_done']}: {used} of {total} rows used ({share:.1%}; "
            f"{parts}). Decided by {decided['message']}. The other cases were not judged (only a complete "
            f"run judges them); alpha = {early['alpha']:g} for {early.get('alpha_scope', 'the whole run')}.")

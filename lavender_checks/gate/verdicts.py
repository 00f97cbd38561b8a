"""Reference numbers, tolerance bands and verdicts.

The reference (``fixtures/reported/*.toml``) holds the numbers a report printed, row by row.
``judge`` compares a run's base and Lavender ``ScoreResult``s with them and gives three
verdicts per row: base, Lavender and gain (Lavender − base).

A verdict's band is centred on the reported number. Its half-width is the half-width of the
percentile bootstrap interval of the *measured* quantity (``bootstrap``: units resampled within
strata, base and Lavender paired), at the reference's confidence level, and never below the
row's floor (the report prints two decimals, so the floor is at least the printing's step).

A run on a subset of a benchmark (``ScoreResult.population`` says how large the whole is)
measures a sample of it, while the reported number is the whole benchmark's. Its band adds
the sampling error of the rows it did not run (``bootstrap.SubsetSampling``) to the run's own
noise: ``sqrt((h · sqrt(n/N))² + (z · sd)²) + |bias|``, where ``h · sqrt(n/N)`` is the
bootstrap half-width scaled to the whole benchmark's N units (what a full run's band would
be), ``sd`` and ``bias`` those of the subset's estimate of the whole benchmark. A subset's
numbers always differ from the whole's, and a run passes only if all its verdicts do, so
``z`` is the normal quantile of the confidence shared out over the m subset verdicts of the
run (Bonferroni: two-sided 1 − (1 − confidence) / m): a run that reproduces the report fails
on some subset with a probability below 1 − confidence, not once in twenty verdicts. ``sd``
is taken at the reported value (each stratum's rate shifted so that the estimate equals it: a
score test, as Wilson's interval is to Wald's), since a sample's own variance is smallest when
its draw lies furthest from the whole. At N = n the band is the full run's; a stratum of one
unit, or whose units all scored alike, gets close to the largest variance its bounded scores
allow instead of none (``bootstrap.SubsetSampling``).
The band is clipped to the metric's range (a percentage lies in [0, 100]).

Modes:
  ``reproduce``      every quantity two-sided: ``|measured − reported| ≤ half-width``.
  ``no-regression``  the gain and Lavender one-sided: ``measured ≥ reported − half-width``
                     (doing better is fine); base stays two-sided, because base predictions
                     are reused across runs and must still be the reported ones.

A result that was not computed gives ``status="missing"`` with the reason, never a number.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from lavender_checks import FIXTURES
from lavender_checks import benchmarks as registry
from lavender_checks.benchmarks.base import BenchmarkSpec, ScoreResult
from lavender_checks.gate.bootstrap import (
    Interval,
    PairingError,
    SubsetSampling,
    bootstrap_intervals,
    paired_bootstrap_many,
    paired_subset_sampling,
    result_subset_sampling,
)

__all__ = [
    "DEFAULT_REFERENCE", "MODES", "QUANTITIES", "GateSettings", "Reference", "ReferenceFileError",
    "ReferenceRow", "Verdict", "benchmark_spec", "data_mismatch", "judge", "load_reference",
    "measured_value", "noncomparable", "noncomparable_notice", "stopped_verdicts", "summary_table", "unchecked",
    "unchecked_notice",
]

DEFAULT_REFERENCE = FIXTURES / "reported" / "seed-report.toml"
MODES = ("reproduce", "no-regression")
QUANTITIES = ("base", "lavender", "gain")
STATUSES = ("pass", "fail", "missing")

# Comparisons of printed two-decimal numbers must not fail on binary floating-point noise
# (80.33 - 80.34 is not exactly -0.01 in float64).
_FLOAT_SLACK = 1e-9

_TOP_LEVEL_KEYS = ("run", "gate", "derived", "row")
_GATE_KEYS = ("confidence", "n_resamples", "seed", "consistency_tolerance", "floor")
_GATE_OPTIONAL = ("stop_early_alpha",)
DEFAULT_STOP_EARLY_ALPHA = 0.01
_ROW_REQUIRED = ("table", "benchmark", "metric", "base", "lavender", "delta")
_ROW_OPTIONAL = ("label", "subtable", "unit", "floor", "note")


class ReferenceFileError(ValueError):
    """A reference file that cannot be used; the message names the file, the row and the field."""


@dataclass(frozen=True)
class GateSettings:
    confidence: float  # of the bootstrap intervals whose half-widths are the bands
    n_resamples: int
    seed: int
    consistency_tolerance: float  # allowed |delta − (lavender − base)| of printed numbers
    floors: dict[str, float]  # metric unit ("percent", "score") -> smallest band half-width
    # --stop-early: the chance that a run stops on a case whose full-run verdict is not FAIL
    stop_early_alpha: float = DEFAULT_STOP_EARLY_ALPHA


@dataclass(frozen=True)
class ReferenceRow:
    """One printed table row of the reference report."""

    id: str  # "<benchmark>-<metric>", e.g. "ChartQA_TEST-test_human", "MME-total"
    number: int  # 1-based position among the file's [[row]] tables
    benchmark: str
    metric: str  # VLMEvalKit metric key, or a derived metric of the reference ("total")
    parts: tuple[str, ...]  # the metric keys summed: (metric,) unless derived
    table: str  # the report's table the row was printed in
    subtable: str | None
    label: str  # the row's label as printed
    unit: str  # "percent" or "score"
    base: float
    lavender: float
    delta: float
    floor: float  # smallest band half-width of this row
    note: str | None = None

    def reported(self, quantity: str) -> float:
        return {"base": self.base, "lavender": self.lavender, "gain": self.delta}[quantity]


@dataclass(frozen=True)
class Reference:
    path: Path
    run: dict[str, Any]  # the run settings the report states
    gate: GateSettings
    derived: dict[str, dict[str, tuple[str, ...]]]  # benchmark -> derived metric -> keys summed
    rows: tuple[ReferenceRow, ...]

    def row(self, row_id: str) -> ReferenceRow:
        for row in self.rows:
            if row.id == row_id:
                return row
        raise KeyError(f"{self.path}: no row {row_id!r}; rows: {', '.join(r.id for r in self.rows)}")

    @property
    def benchmarks(self) -> list[str]:
        """The benchmarks the rows name, in order of first appearance."""
        return list(dict.fromkeys(row.benchmark for row in self.rows))


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The registry's entry for ``name``, without importing its scoring module."""
    return registry.get_spec(name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_gate(path: Path, raw: Any) -> GateSettings:
    where = f"{path}: [gate]"
    if not isinstance(raw, dict):
        raise ReferenceFileError(f"{where} table is missing; it needs: {', '.join(_GATE_KEYS)}")
    unknown = sorted(set(raw) - set(_GATE_KEYS) - set(_GATE_OPTIONAL))
    if unknown:
        raise ReferenceFileError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_GATE_KEYS + _GATE_OPTIONAL)}")
    missing = [k for k in _GATE_KEYS if k not in raw]
    if missing:
        raise ReferenceFileError(f"{where}: missing key(s) {missing}")
    confidence = raw["confidence"]
    if not (_is_number(confidence) and 0 < confidence < 1):
        raise ReferenceFileError(f"{where} confidence: must be a number strictly between 0 and 1, got {confidence!r}")
    n_resamples = raw["n_resamples"]
    if not (isinstance(n_resamples, int) and not isinstance(n_resamples, bool) and n_resamples >= 1):
        raise ReferenceFileError(f"{where} n_resamples: must be a positive integer, got {n_resamples!r}")
    seed = raw["seed"]
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ReferenceFileError(f"{where} seed: must be a non-negative integer, got {seed!r}")
    tolerance = raw["consistency_tolerance"]
    if not (_is_number(tolerance) and tolerance >= 0):
        raise ReferenceFileError(f"{where} consistency_tolerance: must be a number >= 0, got {tolerance!r}")
    floors = raw["floor"]
    if not isinstance(floors, dict):
        raise ReferenceFileError(f"{where} floor: must be a table unit -> number, got {floors!r}")
    for unit, value in floors.items():
        if not (_is_number(value) and value >= 0):
            raise ReferenceFileError(f"{where} floor.{unit}: must be a number >= 0, got {value!r}")
    alpha = raw.get("stop_early_alpha", DEFAULT_STOP_EARLY_ALPHA)
    if not (_is_number(alpha) and 0 < alpha < 1):
        raise ReferenceFileError(f"{where} stop_early_alpha: must be a number strictly between 0 and 1, got {alpha!r}")
    return GateSettings(float(confidence), n_resamples, seed, float(tolerance),
                        {unit: float(v) for unit, v in floors.items()}, float(alpha))


def _load_derived(path: Path, raw: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ReferenceFileError(f"{path}: [derived] must be tables [derived.<benchmark>]")
    derived: dict[str, dict[str, tuple[str, ...]]] = {}
    for benchmark, metrics in raw.items():
        where = f"{path}: [derived.{benchmark}]"
        try:
            spec = benchmark_spec(benchmark)
        except registry.UnknownBenchmark as exc:
            raise ReferenceFileError(f"{where}: {exc}") from None
        if not isinstance(metrics, dict):
            raise ReferenceFileError(f"{where}: must map a metric name to a list of metric keys")
        derived[benchmark] = {}
        for name, parts in metrics.items():
            if name in spec.metric_keys:
                raise ReferenceFileError(f"{where} {name}: already a metric of {benchmark}; pick another name")
            if not (isinstance(parts, list) and parts and all(isinstance(p, str) for p in parts)):
                raise ReferenceFileError(f"{where} {name}: must be a non-empty list of metric keys, got {parts!r}")
            unknown = [p for p in parts if p not in spec.metric_keys]
            if unknown:
                raise ReferenceFileError(
                    f"{where} {name}: unknown metric key(s) {unknown} for {benchmark}; "
                    f"its keys: {', '.join(spec.metric_keys)}"
                )
            derived[benchmark][name] = tuple(parts)
    return derived


def _row_lines(text: str) -> list[int]:
    """1-based line numbers of the ``[[row]]`` headers (tomllib reports no positions)."""
    return [i for i, line in enumerate(text.splitlines(), start=1)
            if line.split("#", 1)[0].strip().replace(" ", "") == "[[row]]"]


def _load_row(path: Path, number: int, line: int | None, raw: Any, gate: GateSettings,
              derived: dict[str, dict[str, tuple[str, ...]]]) -> ReferenceRow:
    at_line = f", line {line}" if line else ""
    if not isinstance(raw, dict):
        raise ReferenceFileError(f"{path}: row {number}{at_line}: must be a [[row]] table")
    name = "-".join(str(raw[k]) for k in ("benchmark", "metric") if k in raw) or "unnamed"
    where = f"{path}: row {number} ({name}{at_line})"
    unknown = sorted(set(raw) - set(_ROW_REQUIRED) - set(_ROW_OPTIONAL))
    if unknown:
        raise ReferenceFileError(
            f"{where}: unknown field(s) {unknown}; allowed: {', '.join(_ROW_REQUIRED + _ROW_OPTIONAL)}"
        )
    missing = [k for k in _ROW_REQUIRED if k not in raw]
    if missing:
        raise ReferenceFileError(f"{where}: missing field(s) {missing}")
    for key in ("table", "benchmark", "metric", "label", "subtable", "unit", "note"):
        if key in raw and not isinstance(raw[key], str):
            raise ReferenceFileError(f"{where} {key}: must be a string, got {raw[key]!r}")
    for key in ("base", "lavender", "delta", "floor"):
        if key in raw and not _is_number(raw[key]):
            raise ReferenceFileError(f"{where} {key}: must be a finite number, got {raw[key]!r}")

    benchmark, metric = raw["benchmark"], raw["metric"]
    try:
        spec = benchmark_spec(benchmark)
    except registry.UnknownBenchmark as exc:
        raise ReferenceFileError(f"{where} benchmark: {exc}") from None
    benchmark_derived = derived.get(benchmark, {})
    if metric in spec.metric_keys:
        parts: tuple[str, ...] = (metric,)
    elif metric in benchmark_derived:
        parts = benchmark_derived[metric]
    else:
        extra = f"; derived: {', '.join(benchmark_derived)}" if benchmark_derived else ""
        raise ReferenceFileError(
            f"{where} metric: unknown metric {metric!r} for {benchmark}; "
            f"its keys: {', '.join(spec.metric_keys)}{extra}"
        )

    unit = raw.get("unit", spec.metric_unit)
    if unit != spec.metric_unit:
        raise ReferenceFileError(f"{where} unit: {benchmark} metrics are in {spec.metric_unit!r}, not {unit!r}")
    if "floor" in raw:
        floor = float(raw["floor"])
        if floor < 0:
            raise ReferenceFileError(f"{where} floor: must be >= 0, got {floor}")
    elif unit in gate.floors:
        floor = gate.floors[unit]
    else:
        raise ReferenceFileError(
            f"{where} floor: no floor for unit {unit!r}: set [gate.floor] {unit} or the row's floor"
        )

    base, lavender, delta = (float(raw[k]) for k in ("base", "lavender", "delta"))
    _check_range(where, spec, metric, parts, base=base, lavender=lavender, delta=delta)
    difference = lavender - base
    if abs(delta - difference) > gate.consistency_tolerance + _FLOAT_SLACK:
        raise ReferenceFileError(
            f"{where} delta: {delta:+.2f} is not lavender − base = {lavender:.2f} − {base:.2f} = "
            f"{difference:+.2f} (allowed difference {gate.consistency_tolerance} for rounding)"
        )
    return ReferenceRow(
        id=f"{benchmark}-{metric}", number=number, benchmark=benchmark, metric=metric, parts=parts,
        table=raw["table"], subtable=raw.get("subtable"), label=raw.get("label", metric), unit=unit,
        base=base, lavender=lavender, delta=delta, floor=floor, note=raw.get("note"),
    )


def _check_range(where: str, spec: BenchmarkSpec, metric: str, parts: tuple[str, ...],
                 **numbers: float) -> None:
    """A reported number outside what its metric can take (``metric_max`` in benchmarks.toml:
    a percentage in [0, 100], an MME subtask in [0, 200]; a delta in [-max, +max]) is a typo
    or another unit: no band around it means anything."""
    top = spec.max_value(parts)
    if top is None:
        return
    for name, value in numbers.items():
        low = -top if name == "delta" else 0.0
        if not low - _FLOAT_SLACK <= value <= top + _FLOAT_SLACK:
            summed = f" (= {' + '.join(parts)})" if parts != (metric,) else ""
            raise ReferenceFileError(
                f"{where} {name}: {value:g} is outside the range of {spec.name} {metric}{summed} "
                f"({spec.metric_unit}): {name} must lie in [{low:g}, {top:g}]")


def _check_derived_sums(path: Path, rows: list[ReferenceRow], tolerance: float) -> None:
    """A derived row and the rows of all its parts must add up (e.g. MME total)."""
    by_id = {row.id: row for row in rows}
    for row in rows:
        if row.parts == (row.metric,):
            continue  # not a derived metric
        part_rows = [by_id.get(f"{row.benchmark}-{p}") for p in row.parts]
        if any(r is None for r in part_rows):
            continue  # nothing printed to check against
        for quantity in QUANTITIES:
            total = sum(r.reported(quantity) for r in part_rows)
            if abs(row.reported(quantity) - total) > tolerance + _FLOAT_SLACK:
                raise ReferenceFileError(
                    f"{path}: row {row.number} ({row.id}) {quantity}: {row.reported(quantity):.2f} is not "
                    f"{' + '.join(row.parts)} = {total:.2f} (rows "
                    f"{', '.join(str(r.number) for r in part_rows)}; allowed difference {tolerance})"
                )


def _check_recorded_md5s(path: Path, md5s: Any) -> None:
    """``[run] lmu_data_md5`` (benchmark -> the md5 of the TSV the numbers came from) is read
    only once a run is judged (``data_mismatch``): checked here, before any work."""
    if md5s is None:
        return
    where = f"{path}: [run] lmu_data_md5"
    if not isinstance(md5s, dict):
        raise ReferenceFileError(f"{where}: must be a table benchmark -> md5 string, got {md5s!r}")
    for benchmark, md5 in md5s.items():
        try:
            benchmark_spec(benchmark)
        except registry.UnknownBenchmark as exc:
            raise ReferenceFileError(f"{where}: {exc}") from None
        if not isinstance(md5, str):
            raise ReferenceFileError(f"{where}.{benchmark}: must be an md5 string, got {md5!r}")


def load_reference(path: str | Path = DEFAULT_REFERENCE) -> Reference:
    """Read and check a reference file; any problem raises ``ReferenceFileError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ReferenceFileError(f"{path}: no such reference file") from None
    except IsADirectoryError:
        raise ReferenceFileError(f"{path}: a folder, not a reference file (give a .toml file)") from None
    except NotADirectoryError:
        raise ReferenceFileError(f"{path}: no such reference file (a part of the path is a file, not a folder)") from None
    except OSError as exc:
        raise ReferenceFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ReferenceFileError(f"{path}: not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ReferenceFileError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise ReferenceFileError(f"{path}: unknown top-level key(s) {unknown}; allowed: {', '.join(_TOP_LEVEL_KEYS)}")
    run = raw.get("run", {})
    if not isinstance(run, dict):
        raise ReferenceFileError(f"{path}: [run] must be a table")
    for benchmark in run.get("benchmarks", []):
        try:
            benchmark_spec(benchmark)
        except registry.UnknownBenchmark as exc:
            raise ReferenceFileError(f"{path}: [run] benchmarks: {exc}") from None
    _check_recorded_md5s(path, run.get("lmu_data_md5"))
    for key in ("profile", "profile_fingerprint"):  # read once a run is judged: checked here
        if key in run and not isinstance(run[key], str):
            raise ReferenceFileError(f"{path}: [run] {key}: must be a string, got {run[key]!r}")
    gate = _load_gate(path, raw.get("gate"))
    derived = _load_derived(path, raw.get("derived"))
    raw_rows = raw.get("row")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ReferenceFileError(f"{path}: no [[row]] tables: a reference needs at least one row")
    rows: list[ReferenceRow] = []
    seen: dict[str, int] = {}
    lines = _row_lines(text)
    if len(lines) != len(raw_rows):  # rows written as an inline array: no header to point at
        lines = []
    for number, raw_row in enumerate(raw_rows, start=1):
        row = _load_row(path, number, lines[number - 1] if lines else None, raw_row, gate, derived)
        if row.id in seen:
            raise ReferenceFileError(f"{path}: row {number} ({row.id}): the same metric as row {seen[row.id]}")
        seen[row.id] = number
        rows.append(row)
    _check_derived_sums(path, rows, gate.consistency_tolerance)
    return Reference(path=path, run=run, gate=gate, derived=derived, rows=tuple(rows))


# ---------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """One quantity (base, Lavender or gain) of one reference row, judged."""

    row_id: str
    benchmark: str
    metric: str
    label: str
    table: str
    quantity: str  # "base", "lavender" or "gain"
    mode: str  # "reproduce" or "no-regression"
    status: str  # "pass", "fail" or "missing"
    reported: float
    measured: float | None  # None when the result was not computed
    band: tuple[float, float] | None  # accepted (lo, hi) around `reported`; hi = inf when one-sided
    half_width: float | None  # max(bootstrap half-width, floor)
    bootstrap_half_width: float | None
    floor: float
    n: int | None  # resampling units behind `measured`
    unit_kind: str  # what was resampled: "question", "circular_group", "image_pair"
    metric_unit: str  # "percent" or "score"
    confidence: float
    paired: bool  # True when the interval came from the paired bootstrap
    reason: str = ""  # why a verdict is missing
    # A subset of the benchmark (None: the whole of it was run):
    population_n: int | None = None  # units of the metric in the whole benchmark
    sampling_sd: float | None = None  # sd of the subset's estimate of the whole benchmark
    sampling_bias: float | None = None  # subset metric − its stratified estimate
    bounded_strata: tuple[str, ...] = ()  # strata whose variance is the least one allowed
    # --stop-early, a run that stopped: for the case that failed, where the complete run's value
    # lies ("bounds"), the case's α, units seen; for the others {"judged": False}.
    early: dict[str, Any] | None = None

    @property
    def subset(self) -> bool:
        return self.population_n is not None and self.n is not None and self.n < self.population_n

    @property
    def one_sided(self) -> bool:
        return self.band is not None and math.isinf(self.band[1])

    def band_text(self, number: Callable[[float | None, bool], str], at_least: str = ">=", none: str = "-") -> str:
        """The band as a table shows it: ``lo .. hi``, ``>= lo`` when one-sided, ``none`` when
        there is none; ``number(value, signed)`` formats each end."""
        signed = self.quantity == "gain"
        if self.band is None:
            return none
        if math.isinf(self.band[1]):
            return f"{at_least} {number(self.band[0], signed)}"
        return f"{number(self.band[0], signed)} .. {number(self.band[1], signed)}"

    def message(self) -> str:
        """Everything a reviewer needs, in one or two lines."""
        signed = self.quantity == "gain"
        fmt = (lambda v: f"{v:+.2f}") if signed else (lambda v: f"{v:.2f}")
        head = f"{self.status.upper()} {self.row_id} {self.quantity} [{self.benchmark} {self.metric}]"
        if self.early is not None and self.status == "fail":
            lo, hi = self.early["bounds"]
            band_lo, band_hi = self.band
            band = f"[{fmt(band_lo)}, +inf)" if math.isinf(band_hi) else f"[{fmt(band_lo)}, {fmt(band_hi)}]"
            return (f"{head} (stopped early): the complete run's value lies in [{fmt(lo)}, {fmt(hi)}] "
                    f"(confidence 1 - {self.early['alpha']:.2g}), outside every band it can have: reported "
                    f"{fmt(self.reported)}, band at most {band}; {self.early['units_seen']} of "
                    f"{self.early['units']} draw units seen (rows sharing an image or a {self.unit_kind.replace('_', ' ')})\n"
                    f"    --stop-early, {self.mode}; the full run's band: max(floor {self.floor:g}, "
                    f"{self.confidence * 100:g}% bootstrap half-width), bounded by {self.half_width:.2f}")
        if self.status == "missing":
            measured = f"measured {fmt(self.measured)}, " if self.measured is not None else ""
            return f"{head}: {self.reason}\n    {measured}reported {fmt(self.reported)}, no band, {self.mode}"
        lo, hi = self.band
        band = f"[{fmt(lo)}, +inf)" if math.isinf(hi) else f"[{fmt(lo)}, {fmt(hi)}]"
        method = "paired bootstrap" if self.paired else "bootstrap"
        rule = "reported − " if math.isinf(hi) else "reported ± "
        n = f"n={self.n} of {self.population_n}" if self.subset else f"n={self.n}"
        subset = ""
        if self.subset:
            bounded = (f", least variance in {', '.join(self.bounded_strata)}"
                       if self.bounded_strata else "")
            subset = (f"; subset: {self.n} of {self.population_n} {self.unit_kind}s run, sd of its "
                      f"estimate of the whole {self.sampling_sd:.3f}, bias {self.sampling_bias:+.3f}"
                      f"{bounded}")
        return (
            f"{head}: measured {fmt(self.measured)}, reported {fmt(self.reported)}, band {band}, "
            f"{n} {self.unit_kind}s\n"
            f"    band = {rule}{self.half_width:.2f} ({self.confidence * 100:g}% {method} half-width "
            f"{self.bootstrap_half_width:.3f}{subset}, floor {self.floor:g}), {self.mode}"
            f"{', one-sided' if math.isinf(hi) else ''}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.band is not None:  # JSON has no infinity: an open end is null
            data["band"] = [None if math.isinf(v) else v for v in self.band]
        data["message"] = self.message()
        return data


@dataclass
class _Measured:
    """What is known of one quantity of one row before judging."""

    value: float | None = None
    interval: Interval | None = None
    paired: bool = False
    reason: str = ""
    sampling: SubsetSampling | None = None
    upper: float = math.inf  # the metric's largest value: the sum of its terms' scales


def measured_value(result: ScoreResult, parts: tuple[str, ...]) -> float:
    """The metric ``parts`` name (one key, or keys summed) in ``result``."""
    total = 0.0  # summed from 0 in the listed order, as VLMEvalKit sums MME's subtasks
    for key in parts:
        total += float(result.metrics[key])
    return total


def _band_problem(result: ScoreResult, parts: tuple[str, ...], label: str) -> str:
    """Why no bootstrap band can be computed for this metric ('' when it can)."""
    no_forms = [k for k in parts if not result.forms.get(k)]
    if no_forms:
        return (f"the {label} result for {result.benchmark} has no bootstrap form for "
                f"{', '.join(no_forms)}, so no band can be computed")
    if len(result.units) == 0:
        return f"the {label} result for {result.benchmark} has no resampling units"
    return ""


def _measure_benchmark(
    benchmark: str,
    rows: list[ReferenceRow],
    base: ScoreResult | None,
    lavender: ScoreResult | None,
    reference: Reference,
    n_resamples: int,
    seed: int,
    missing_reason: str | None = None,
) -> dict[tuple[str, str], _Measured]:
    settings = dict(n_resamples=n_resamples, confidence=reference.gate.confidence, seed=seed)
    out: dict[tuple[str, str], _Measured] = {}
    results = {"base": base, "lavender": lavender}
    usable: dict[str, list[ReferenceRow]] = {"base": [], "lavender": []}
    for row in rows:
        for quantity, result in results.items():
            m = out[(row.id, quantity)] = _Measured()
            if result is None:
                m.reason = f"no {quantity} result for {benchmark} ({missing_reason or 'not computed in this run'})"
                continue
            absent = [k for k in row.parts if k not in result.metrics]
            if absent:
                m.reason = (f"the {quantity} result for {benchmark} has no metric {', '.join(absent)} "
                            f"(scored on a subset without it?)")
                continue
            value = measured_value(result, row.parts)
            if not math.isfinite(value):
                m.reason = f"the {quantity} result for {benchmark} gives {' + '.join(row.parts)} = {value}"
                continue
            m.value = value  # a real number even when its band cannot be computed
            terms = [t for k in row.parts for t in result.forms.get(k, [])]
            if terms:
                m.upper = float(sum(t.scale for t in terms))  # each term lies in [0, scale]
            m.reason = _band_problem(result, row.parts, quantity)
            if not m.reason:
                usable[quantity].append(row)
        b, l = out[(row.id, "base")], out[(row.id, "lavender")]
        g = out[(row.id, "gain")] = _Measured()
        if b.value is not None and l.value is not None:
            g.value = l.value - b.value
        g.upper = min(b.upper, l.upper)
        g.reason = "; ".join(dict.fromkeys(r for r in (b.reason, l.reason) if r))

    both = [row for row in usable["base"] if row in usable["lavender"]]
    pairing_problem = ""
    if both:
        try:
            paired = paired_bootstrap_many(base, lavender, {row.id: row.parts for row in both}, **settings)
        except PairingError as exc:
            pairing_problem = str(exc)
        else:
            for row in both:
                r = paired[row.id]
                for quantity, interval in (("base", r.base), ("lavender", r.lavender), ("gain", r.gain)):
                    out[(row.id, quantity)].interval = interval
                    out[(row.id, quantity)].paired = True
    # Quantities not covered by the paired draw get their own intervals (the gain cannot).
    for quantity, result in results.items():
        alone = [row for row in usable[quantity] if out[(row.id, quantity)].interval is None]
        if alone:
            intervals = bootstrap_intervals(result, {row.id: row.parts for row in alone}, **settings)
            for row in alone:
                out[(row.id, quantity)].interval = intervals[row.id]
    if pairing_problem:
        for row in both:
            # A difference of two different unit sets is no paired gain: no number is given.
            out[(row.id, "gain")].value = None
            out[(row.id, "gain")].reason = pairing_problem
    _add_subset_sampling(out, results, usable, both if not pairing_problem else [],
                         reference.gate.confidence)
    return out


def _add_subset_sampling(out: dict[tuple[str, str], _Measured], results: dict[str, ScoreResult | None],
                         usable: dict[str, list[ReferenceRow]], paired_rows: list[ReferenceRow],
                         confidence: float) -> None:
    """The sampling error of a subset (``ScoreResult.population``) for every banded quantity."""
    populations = [r.population for r in results.values() if r is not None and r.population]
    if not populations:
        return  # the rows scored are the whole benchmark
    population = populations[0]
    # Each quantity's variance is taken at its reported value (the hypothesis under test).
    reported = {row.id: {q: row.reported(q) for q in ("base", "lavender")}
                for rows in usable.values() for row in rows}
    if paired_rows:
        sampled = paired_subset_sampling(results["base"], results["lavender"],
                                         {row.id: row.parts for row in paired_rows}, population,
                                         confidence, reported)
        for row in paired_rows:
            for quantity, sampling in sampled[row.id].items():
                out[(row.id, quantity)].sampling = sampling
    for quantity, result in results.items():
        alone = [row for row in usable[quantity] if out[(row.id, quantity)].sampling is None]
        if alone:
            sampled_alone = result_subset_sampling(result, {row.id: row.parts for row in alone},
                                                   result.population or population, confidence,
                                                   {row.id: row.reported(quantity) for row in alone})
            for row in alone:
                out[(row.id, quantity)].sampling = sampled_alone[row.id]


def _metric_range(quantity: str, upper: float) -> tuple[float, float]:
    """Where a quantity can lie: a metric in [0, the sum of its terms' scales] (a percentage
    in [0, 100], an MME subtask in [0, 200]), a gain in [−that, +that]."""
    return (-upper, upper) if quantity == "gain" else (0.0, upper)


def band_half_width(interval: Interval, sampling: SubsetSampling | None, floor: float,
                    subset_verdicts: int = 1) -> float:
    """The band's half-width: the bootstrap's, widened for a subset (module docstring);
    ``subset_verdicts``: how many verdicts of the run share the confidence."""
    if sampling is None or sampling.n_units >= sampling.n_population:
        return max(interval.half_width, floor)
    alpha = (1.0 - interval.confidence) / max(1, subset_verdicts)
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    run_noise = interval.half_width * math.sqrt(sampling.fraction)
    return max(math.hypot(run_noise, z * sampling.sd) + abs(sampling.bias), floor)


def _judge_one(row: ReferenceRow, quantity: str, measured: _Measured, mode: str,
               spec: BenchmarkSpec, confidence: float, subset_verdicts: int) -> Verdict:
    reported = row.reported(quantity)
    common = dict(
        row_id=row.id, benchmark=row.benchmark, metric=row.metric, label=row.label, table=row.table,
        quantity=quantity, mode=mode, reported=reported, floor=row.floor, unit_kind=spec.unit,
        metric_unit=row.unit, confidence=confidence, paired=measured.paired,
    )
    if measured.reason or measured.value is None or measured.interval is None:
        return Verdict(**common, status="missing", measured=measured.value, band=None,
                       half_width=None, bootstrap_half_width=None,
                       n=measured.interval.n_units if measured.interval else None,
                       reason=measured.reason or "no interval")
    interval = measured.interval
    sampling = measured.sampling
    half_width = band_half_width(interval, sampling, row.floor, subset_verdicts)
    slack = _FLOAT_SLACK * max(1.0, abs(reported))
    one_sided = mode == "no-regression" and quantity in ("lavender", "gain")
    if one_sided:
        band = (reported - half_width, math.inf)
        ok = measured.value >= band[0] - slack
    else:
        band = (reported - half_width, reported + half_width)
        ok = abs(measured.value - reported) <= half_width + slack
    low, high = _metric_range(quantity, measured.upper)
    band = (max(band[0], low), band[1] if math.isinf(band[1]) else min(band[1], high))
    subset = {}
    if sampling is not None and sampling.n_units < sampling.n_population:
        subset = dict(population_n=sampling.n_population, sampling_sd=sampling.sd,
                      sampling_bias=sampling.bias, bounded_strata=sampling.bounded_strata)
    return Verdict(**common, status="pass" if ok else "fail", measured=measured.value, band=band,
                   half_width=half_width, bootstrap_half_width=interval.half_width,
                   n=interval.n_units, **subset)


def judge(
    reference: Reference,
    results: Mapping[str, Mapping[str, ScoreResult | None]],
    *,
    mode: str = "reproduce",
    n_resamples: int | None = None,
    seed: int | None = None,
    missing_reasons: Mapping[str, str] | None = None,
) -> list[Verdict]:
    """Verdicts for every reference row: base, Lavender and gain, in the reference's order.

    ``results`` maps a benchmark name to ``{"base": ScoreResult | None, "lavender":
    ScoreResult | None}``; a benchmark or variant that is absent or None gives "missing"
    verdicts, whose reason is ``missing_reasons[benchmark]`` when given (e.g. "its TSV is
    absent: /data/MME.tsv"). ``n_resamples`` and ``seed`` override the reference's gate
    settings (tests).
    Base and Lavender that cover different units cannot be paired: their gain is "missing"
    with the reason, and each is judged on its own interval.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    n_resamples = reference.gate.n_resamples if n_resamples is None else n_resamples
    seed = reference.gate.seed if seed is None else seed
    verdicts: list[Verdict] = []
    measured: dict[tuple[str, str], _Measured] = {}
    for benchmark in reference.benchmarks:
        entry = results.get(benchmark) or {}
        unknown = sorted(set(entry) - {"base", "lavender"})
        if unknown:
            raise ValueError(f"results[{benchmark!r}] has unknown key(s) {unknown}; expected 'base' and 'lavender'")
        base, lavender = entry.get("base"), entry.get("lavender")
        for label, result in (("base", base), ("lavender", lavender)):
            if result is not None and result.benchmark != benchmark:
                raise ValueError(f"results[{benchmark!r}][{label!r}] is a {result.benchmark} result")
        rows = [row for row in reference.rows if row.benchmark == benchmark]
        measured.update(_measure_benchmark(benchmark, rows, base, lavender, reference, n_resamples, seed,
                                           (missing_reasons or {}).get(benchmark)))
    subset_verdicts = sum(1 for m in measured.values() if m.interval is not None
                          and m.sampling is not None and m.sampling.n_units < m.sampling.n_population)
    for row in reference.rows:
        spec = benchmark_spec(row.benchmark)
        for quantity in QUANTITIES:
            verdicts.append(_judge_one(row, quantity, measured[(row.id, quantity)], mode, spec,
                                       reference.gate.confidence, subset_verdicts))
    return verdicts


def stopped_verdicts(reference: Reference, failures: list, reason: str, mode: str) -> list[Verdict]:
    """The verdicts of a run that ``--stop-early`` stopped: FAIL for each case whose failure
    was certain (``gate.sequential.EarlyFailure``), missing ("not judged", ``reason``) for every
    other one: only a complete run judges them."""
    failed = {(f.row_id, f.quantity): f for f in failures}
    verdicts = []
    for row in reference.rows:
        spec = benchmark_spec(row.benchmark)
        for quantity in QUANTITIES:
            common = dict(row_id=row.id, benchmark=row.benchmark, metric=row.metric, label=row.label,
                          table=row.table, quantity=quantity, mode=mode, reported=row.reported(quantity),
                          floor=row.floor, unit_kind=spec.unit, metric_unit=row.unit,
                          confidence=reference.gate.confidence, paired=quantity == "gain", measured=None,
                          bootstrap_half_width=None)
            failure = failed.get((row.id, quantity))
            if failure is None:
                verdicts.append(Verdict(**common, status="missing", band=None, half_width=None, n=None,
                                        reason=f"not judged: {reason}", early={"judged": False}))
                continue
            one_sided = mode == "no-regression" and quantity != "base"
            half = failure.band_bound
            band = (failure.reported - half, math.inf if one_sided else failure.reported + half)
            verdicts.append(Verdict(**common, status="fail", band=band, half_width=half, n=failure.drawn,
                                    early={"judged": True, "bounds": list(failure.bounds), "alpha": failure.alpha,
                                           "direction": failure.direction, "units_seen": failure.drawn,
                                           "units": failure.population}))
    return verdicts


# ------------------------------------------------------------------------ comparable data


def data_mismatch(reference: Reference, benchmark: str, info: Mapping[str, Any] | None) -> str:
    """Why the TSV that ``info`` describes (``data.provenance``) is not the data the reference's
    numbers came from: the file the reference recorded (``[run] lmu_data_md5``), else
    VLMEvalKit's (its DATASET_MD5). '' when it is, or when no TSV was read."""
    if not info or not info.get("md5"):
        return ""
    recorded = (reference.run.get("lmu_data_md5") or {}).get(benchmark)
    expected = recorded or info.get("md5_expected")
    if not expected or info["md5"] == expected:
        return ""
    whose = f"the {benchmark} TSV {reference.path.name} was recorded from" if recorded \
        else f"VLMEvalKit's {benchmark} TSV"
    rows, rows_expected = info.get("rows_in_file"), info.get("rows_expected")
    rows_note = ""
    if rows is not None:
        rows_note = f", {rows} rows" + (f" (VLMEvalKit's has {rows_expected})"
                                        if rows_expected is not None and not recorded else "")
    synthetic = " (synthetic data, listed in its synthetic.toml)" if info.get("synthetic") else ""
    return (f"{info.get('tsv', 'the TSV')}{synthetic} is not {whose}: md5 {info['md5']} "
            f"(expected {expected}){rows_note}")


def noncomparable(reference: Reference, metadata: Mapping[str, Any]) -> dict[str, str]:
    """benchmark -> why its verdicts cannot test the reference's numbers, from a run's metadata
    (reasons joined by "; "):

    * ``data``: the TSV read is not the one the numbers came from (``data_mismatch``); under
      --from-vlmeval, of the TSV that checked the files, when there was one;
    * ``data[b]["noncomparable"]``: what the run itself found (``run.collect``): prediction
      files whose row count is not the benchmark's, a score that is not the metric the
      benchmark reports (MMBench without its circular copies);
    * ``profile``: prompts or decoding other than the reference was recorded with
      (``[run] profile``, ``profile_fingerprint``);
    * ``config.benchmarks``: a benchmark the run ran that the reference has no rows for:
      nothing of it was gated.
    """
    reasons: dict[str, list[str]] = {}
    data = metadata.get("data") or {}
    measured = [b for b in reference.benchmarks if isinstance(data.get(b), Mapping)]
    for benchmark in measured:
        info = data[benchmark]
        record = info.get("meta") if "md5" not in info and isinstance(info.get("meta"), Mapping) else info
        why = data_mismatch(reference, benchmark, record)
        found = [why] if why else []
        found += [str(r) for r in info.get("noncomparable") or ()]
        if found:
            reasons[benchmark] = found
    profile = _profile_mismatch(reference, metadata.get("profile"))
    if profile:
        for benchmark in measured:
            reasons.setdefault(benchmark, []).append(profile)
    run_benchmarks = (metadata.get("config") or {}).get("benchmarks") or []
    for benchmark in run_benchmarks:
        if benchmark not in reference.benchmarks:
            reasons[benchmark] = [f"not gated: {reference.path.name} has no rows for it (gate it against "
                                  f"a reference that has, or leave it out with --benchmark)"]
    return {benchmark: "; ".join(found) for benchmark, found in reasons.items()}


def _profile_mismatch(reference: Reference, profile: Any) -> str:
    """Why a run made with ``profile`` (``Profile.describe()``) is not prompted and decoded as
    the reference's run ('' when it is, or when either side does not say)."""
    if not isinstance(profile, Mapping):
        return ""
    name, fingerprint = reference.run.get("profile"), reference.run.get("profile_fingerprint")
    ran = f"profile {profile.get('name')!r}"
    if fingerprint and profile.get("fingerprint"):
        if profile["fingerprint"] == fingerprint:
            return ""
        return (f"the run used {ran} (fingerprint {str(profile['fingerprint'])[:12]}), "
                f"{reference.path.name} was recorded with profile {name!r} (fingerprint "
                f"{str(fingerprint)[:12]}): other prompts or decoding")
    if name and profile.get("name") and profile["name"] != name:
        return (f"the run used {ran}, {reference.path.name}'s numbers come from profile {name!r}: "
                "other prompts or decoding")
    return ""


def noncomparable_notice(problems: Mapping[str, str], allowed: bool) -> str:
    """The lines that close the console output (and open report.md) of such a run."""
    if not problems:
        return ""
    consequence = ("--allow-noncomparable was given: the verdicts above count, but they do not "
                   "test the report's numbers" if allowed else
                   "its verdicts do not test the report's numbers, so the run fails; "
                   "--allow-noncomparable gates it anyway, --strict-data refuses such data "
                   "before any work")
    lines = [f"NOT COMPARABLE with the reference: {consequence}."]
    lines += [f"  {benchmark}: {why}" for benchmark, why in problems.items()]
    return "\n".join(lines)


def unchecked(metadata: Mapping[str, Any]) -> dict[str, str]:
    """benchmark -> what the run could not check of its data (``data[b]["unchecked"]``, e.g.
    --from-vlmeval files without the benchmark's TSV); the verdicts stand, on the files as
    they are."""
    return {benchmark: str(info["unchecked"]) for benchmark, info in (metadata.get("data") or {}).items()
            if isinstance(info, Mapping) and info.get("unchecked")}


def unchecked_notice(notes: Mapping[str, str]) -> str:
    """The lines that say so, just above ``noncomparable_notice``'s."""
    if not notes:
        return ""
    lines = ["NOT CHECKED against the benchmark's data: the verdicts hold for the files as they are."]
    lines += [f"  {benchmark}: {why}" for benchmark, why in notes.items()]
    return "\n".join(lines)


def summary_table(verdicts: list[Verdict], only_problems: bool = False) -> str:
    """Fixed-width text for the terminal: one line per verdict (``only_problems``: per verdict
    that did not pass, e.g. under --quiet), then the counts."""
    def num(v: float | None, signed: bool) -> str:
        if v is None:
            return "-"
        return f"{v:+.2f}" if signed else f"{v:.2f}"

    header = ("row", "quantity", "measured", "reported", "band", "n", "status")
    lines = []
    not_judged = [v for v in verdicts if v.early is not None and not v.early.get("judged")]
    for v in verdicts:
        if only_problems and (v.status == "pass" or v in not_judged):
            continue
        signed = v.quantity == "gain"
        band = v.band_text(num)
        status = v.status.upper() if v.status != "pass" else "pass"
        if v.early is not None and v.status == "fail":
            lo, hi = v.early["bounds"]
            status += f" (stopped early: complete run in [{num(lo, signed)}, {num(hi, signed)}])"
        elif v in not_judged:
            status = "not judged (stopped early)"
        elif v.status == "missing":
            status += f" ({v.reason})" if len(v.reason) <= 60 else f" ({v.reason[:57]}...)"
        lines.append((v.row_id, v.quantity, num(v.measured, signed), num(v.reported, signed), band,
                      "-" if v.n is None else f"{v.n}/{v.population_n}" if v.subset else str(v.n), status))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    right = {2, 3, 5}  # numbers line up on the right

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = ([fmt(header), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in lines]
           if lines or not only_problems else [])
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    modes = sorted({v.mode for v in verdicts})
    judged_note = f", {len(not_judged)} not judged (stopped early)" if not_judged else ""
    out.append(f"{counts['pass']} pass, {counts['fail']} fail, {counts['missing'] - len(not_judged)} missing"
               f"{judged_note} ({', '.join(modes) or 'no verdicts'})")
    return "\n".join(out)

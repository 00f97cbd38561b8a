"""``--stop-early``: a run taken in rounds, stopped once a gate case's failure is certain.

**Order.** Every benchmark's rows are grouped into draw units: rows that share an image or a
scoring unit (a DocVQA page's questions, an MMBench question's circular copies, an MME image
pair, a ChartQA chart). The draw units are put in a seeded, uniformly random order (a hash of
(seed, benchmark, unit), like ``data.subset``'s draws: the same on every platform and numpy).
Drawing uniformly among the units not drawn yet is drawing every stratum (ChartQA split,
MMBench category, MME subtask) in proportion to what is left of it: each round holds every
stratum in proportion, on average, and the units of any stratum, or of any union of strata,
come in a uniformly random order of their own, which is what each case's confidence sequence
(``gate.sequential``) needs. (An order with fixed shares per stratum and round would make the
sequence of every pooled metric a union over its strata, several times wider.)

**Rounds.** After round r the first ``floor(f_r · G)`` draw units (at least one) of every
benchmark (G its draw units, ``f_r`` from ``gate/stop_early.toml``) are done in the base and
in each adapter still going (one, or a series' checkpoints not stopped yet), each variant in
one engine call across the benchmarks (``run.predict.predict_together``; the benchmarks with
the longest answers first, so that short rows fill the batch while long ones end). Every row
is stored as it finishes, so a later run, complete or not, reuses it. Each adapter is judged
against the base by its own ``Looker`` and stops on its own (``run_rounds_each``).

**Looking.** After each round every benchmark is scored as a whole (the rows not done yet
have a placeholder prediction; their units are left out), which gives each unit's share of
each case's full-run value exactly as the complete run will compute it: the benchmark's
columns go through VLMEvalKit's xlsx round trip once, each prediction once, as it arrives
(beside one text cell, as in a complete file that holds any text: a column of numbers alone
comes back as floats, so a benchmark is not decided before one of its predictions in each
variant is no number; tested). Under ``--from-vlmeval`` the files' own cells are scored in
their column's own type, as the complete run scores them.
The decision is ``gate.sequential.decide``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lavender_checks.benchmarks import Benchmark, ScoreResult
from lavender_checks.gate.sequential import (
    CaseSample,
    Decision,
    GateCase,
    StopEarlySettings,
    decide,
    stop_headline,
)
from lavender_checks.model import LAVENDER_VARIANT, VARIANTS

__all__ = ["BenchmarkRounds", "CaseStructure", "Looker", "RoundsRecord", "draw_labels", "draw_rank", "gate_cases",
           "run_rounds", "run_rounds_each", "units_through"]

# The engine's call of a round hands these benchmarks first: their answers are the longest
# (ChartQA's step-by-step solutions, MMBench's sentences), so the short ones fill the batch
# while the long ones end.
LONGEST_ANSWERS_FIRST = ("ChartQA_TEST", "MMBench_DEV_EN", "DocVQA_VAL", "MME")


def draw_rank(seed: int, benchmark: str, unit: Any) -> bytes:
    """Where a draw unit comes in its benchmark's order: a hash, the same on every platform."""
    return hashlib.sha256(f"{seed}\x1fstop-early\x1f{benchmark}\x1f{unit}".encode()).digest()


def units_through(fraction: float, units: int) -> int:
    """Draw units done after a round that reaches ``fraction`` of ``units``: never more than
    that share (at least one unit), every unit at 1.0."""
    return min(units, max(1, math.floor(fraction * units + 1e-9)))


def draw_labels(data: Any, bench: Benchmark, dump_suffix: str | None = None) -> np.ndarray:
    """The draw unit of every row of ``data`` (a ``data.BenchmarkData`` or a frame): rows
    joined through a shared image (``data.image_key``, when the frame has images) or a shared
    scoring unit (``data.resampling_units``), labelled by the first row's unit."""
    from lavender_checks.data import DEFAULT_DUMP_SUFFIX, image_key, resampling_units

    frame = data.frame if hasattr(data, "frame") else data
    units = resampling_units(data, bench.spec).astype(str).to_numpy()
    links = [pd.Series(units)]
    if "image" in frame.columns or "image_path" in frame.columns:
        suffix = dump_suffix or DEFAULT_DUMP_SUFFIX
        links.append(pd.Series([image_key(data, index, suffix) for index in frame["index"].tolist()]))
    # Connected components by label propagation: every row takes the smallest label among the
    # rows it shares a unit or an image with, until nothing changes.
    label = pd.Series(pd.factorize(units)[0])
    while True:
        before = label.copy()
        for key in links:
            label = label.groupby(key.to_numpy()).transform("min")
        if label.equals(before):
            break
    first_unit = pd.Series(units).groupby(label.to_numpy()).transform("first")
    return first_unit.to_numpy()


@dataclass
class BenchmarkRounds:
    """One benchmark's draw units in their drawn order, and the rows of each round."""

    name: str
    bench: Benchmark
    data: Any  # data.BenchmarkData (or a frame): the whole benchmark
    labels: np.ndarray  # draw unit of each row
    order: list  # draw units, drawn order
    rows_of: dict  # draw unit -> its rows' indices, in file order

    @classmethod
    def of(cls, bench: Benchmark, data: Any, seed: int, dump_suffix: str | None = None) -> BenchmarkRounds:
        frame = data.frame if hasattr(data, "frame") else data
        labels = draw_labels(data, bench, dump_suffix)
        rows_of: dict = {}
        for index, label in zip(frame["index"].tolist(), labels):
            rows_of.setdefault(label, []).append(index)
        order = sorted(rows_of, key=lambda unit: draw_rank(seed, bench.name, unit))
        return cls(bench.name, bench, data, labels, order, rows_of)

    @property
    def rows(self) -> int:
        return sum(len(v) for v in self.rows_of.values())

    @property
    def data_frame(self) -> pd.DataFrame:
        return self.data.frame if hasattr(self.data, "frame") else self.data

    def restricted_to(self, indices: Iterable) -> BenchmarkRounds:
        """The same order over the rows ``indices`` only (a prediction file of part of a TSV)."""
        keep = {str(i) for i in indices}
        rows_of = {unit: kept for unit, rows in self.rows_of.items()
                   if (kept := [i for i in rows if str(i) in keep])}
        order = [unit for unit in self.order if unit in rows_of]
        return BenchmarkRounds(self.name, self.bench, self.data, self.labels, order, rows_of)

    def units_through(self, fraction: float) -> int:
        return units_through(fraction, len(self.order))

    def indices(self, start: int, stop: int) -> list:
        """The rows of draw units ``start .. stop-1`` (drawn order), each unit's rows together."""
        return [index for unit in self.order[start:stop] for index in self.rows_of[unit]]

    def rows_frame(self, indices: Iterable) -> Any:
        """The rows ``indices`` of the benchmark, in file order, as ``data`` is (a
        ``BenchmarkData`` keeps the record that finds each image's owner row)."""
        from lavender_checks.data import BenchmarkData

        wanted = set(indices)
        frame = self.data_frame
        part = frame[frame["index"].isin(wanted)].reset_index(drop=True)
        if isinstance(self.data, BenchmarkData):
            record = self.data.provenance
            if record is not None:
                record = record.with_subset({"stop_early_rows": len(part)})
            return BenchmarkData(part, record)
        return part


# ------------------------------------------------------------------------------ the cases


def gate_cases(reference: Any, benchmarks: Sequence[str], mode: str) -> list[GateCase]:
    """Every verdict of the reference rows of ``benchmarks`` (``gate.verdicts.Reference``)."""
    cases = []
    for row in reference.rows:
        if row.benchmark not in benchmarks:
            continue
        for quantity in ("base", "lavender", "gain"):
            cases.append(GateCase(row.id, row.benchmark, quantity, row.reported(quantity), row.floor,
                                  one_sided=mode == "no-regression" and quantity != "base"))
    return cases


@dataclass
class _CaseTerms:
    weights: list[tuple[np.ndarray, float]]  # per term with units: (its denominators, scale / D_k)
    bound: np.ndarray  # b_u of every scorer unit: its largest share of the full-run value
    linear: bool  # the full run's bootstrap of this metric is linear in the units' weights


class CaseStructure:
    """One benchmark's scoring as the confidence sequences need it: for each reference row,
    each scorer unit's largest share ``b_u`` of the full-run value, and the draw unit it lies
    in. Built from a scoring of the whole benchmark with placeholder predictions (the
    denominators count rows, not right answers; that they do not move is checked)."""

    def __init__(self, rounds: BenchmarkRounds, rows: Sequence[Any], placeholder: ScoreResult):
        self.rounds = rounds
        self.rows = list(rows)
        self.unit_ids = placeholder.units["unit"].astype(str).to_numpy()
        draw_of_row = dict(zip((str(i) for i in rounds.data_frame["index"].tolist()), rounds.labels))
        first_row = placeholder.samples.drop_duplicates("unit")
        draw_of_unit = dict(zip(first_row["unit"].astype(str), (draw_of_row[str(i)] for i in first_row["index"])))
        self.draw_of_unit = np.array([draw_of_unit[u] for u in self.unit_ids], dtype=object)
        strata = (placeholder.units["stratum"].astype(str).to_numpy() if "stratum" in placeholder.units
                  else np.full(len(self.unit_ids), "all", dtype=object))
        self.terms: dict[str, _CaseTerms] = {}
        from lavender_checks.gate.bootstrap import metric_forms

        for row in self.rows:
            forms = metric_forms(placeholder, row.parts)
            weights, bound, linear = [], np.zeros(len(self.unit_ids)), True
            for term in forms:
                den = np.asarray(term.denominator, dtype=np.float64)
                total = float(den.sum())
                if total == 0:
                    continue
                weights.append((den, term.scale / total))
                bound += term.scale * den / total
                # The full run's bootstrap is linear in the weights only if every stratum's
                # denominator is the same for all its units (gate.sequential, the band).
                linear &= bool(pd.Series(den).groupby(strata).nunique().le(1).all())
            self.terms[row.id] = _CaseTerms(weights, bound, linear)

    def unit_values(self, result: ScoreResult, row_id: str) -> np.ndarray:
        """Each scorer unit's share of the row's metric in ``result`` (units in the order of
        the placeholder scoring)."""
        from lavender_checks.gate.bootstrap import metric_forms

        if not np.array_equal(result.units["unit"].astype(str).to_numpy(), self.unit_ids):
            raise RuntimeError(f"{self.rounds.name}: the scorer's units changed between scorings")
        row = next(r for r in self.rows if r.id == row_id)
        values = np.zeros(len(self.unit_ids))
        kept = [t for t in metric_forms(result, row.parts) if float(np.asarray(t.denominator).sum()) != 0]
        for term, (den, weight) in zip(kept, self.terms[row_id].weights):
            if not np.array_equal(np.asarray(term.denominator, dtype=np.float64), den):
                raise RuntimeError(f"{self.rounds.name} {row_id}: a denominator depends on the predictions")
            values += weight * np.asarray(term.numerator, dtype=np.float64)
        return values

    def populations(self, results: Mapping[str, ScoreResult]) -> dict[tuple[str, str], tuple[np.ndarray, CaseSample]]:
        """Every case of the benchmark as the complete run sees it (``results``: variant ->
        scoring; units not done yet count as scored): the positions of its draw units in the
        benchmark's drawn order (ascending) and a ``CaseSample`` of all their values, in that
        order."""
        position = {unit: i for i, unit in enumerate(self.rounds.order)}
        out: dict[tuple[str, str], tuple[np.ndarray, CaseSample]] = {}
        for row in self.rows:
            terms = self.terms[row.id]
            inside = terms.bound > 0
            if not inside.any():
                continue
            units = self.draw_of_unit[inside]
            draw_bound = pd.Series(terms.bound[inside]).groupby(units).sum()
            case_order = sorted(draw_bound.index, key=position.__getitem__)
            positions = np.array([position[unit] for unit in case_order])
            high = float(draw_bound.max())
            values = {variant: pd.Series(self.unit_values(results[variant], row.id)[inside]).groupby(units).sum()
                      .loc[case_order].to_numpy() for variant in VARIANTS}
            common = dict(population=len(case_order), unit_bound=float(terms.bound.max()),
                          scorer_units=int(inside.sum()), linear=terms.linear)
            for variant in VARIANTS:
                out[(row.id, variant)] = positions, CaseSample(values[variant], low=0.0, high=high, **common)
            out[(row.id, "gain")] = positions, CaseSample(values["lavender"] - values["base"], low=-high, high=high,
                                                          **common)
        return out

    def samples(self, results: Mapping[str, ScoreResult], done_units: int) -> dict[tuple[str, str], CaseSample]:
        """The ``CaseSample`` of every case of the benchmark, the first ``done_units`` draw
        units done in both variants (``results``: variant -> scoring of those predictions)."""
        return {key: dataclasses.replace(whole, observed=whole.observed[positions < done_units])
                for key, (positions, whole) in self.populations(results).items()}


# ------------------------------------------------------------------------------ looking


class Looker:
    """Scores what the rounds have done so far and decides (module docstring, "Looking")."""

    PLACEHOLDER = ""

    def __init__(self, plans: Sequence[BenchmarkRounds], reference: Any, cases: Sequence[GateCase],
                 alpha: float, settings: StopEarlySettings,
                 files: Mapping[str, tuple[Mapping[str, pd.DataFrame], pd.DataFrame | None]] | None = None):
        """``files``: for ``--from-vlmeval``, benchmark -> ({variant: the file's frame}, the
        TSV frame or None): predictions are the files' cells, scored as the complete run
        scores them (no further round trip). Without: generated predictions, which go
        through VLMEvalKit's xlsx round trip as the complete run's do."""
        from lavender_checks.vlmeval_io import prediction_frame, roundtrip

        self.plans = list(plans)
        self.reference = reference
        self.cases = list(cases)
        self.alpha = alpha
        self.settings = settings
        self.structures: dict[str, CaseStructure] = {}
        self.frames: dict[str, dict[str, pd.DataFrame]] = {}  # benchmark -> variant -> frame to fill
        self.metas: dict[str, pd.DataFrame | None] = {}
        self.cells: dict[str, dict[str, dict[str, Any]]] = {}  # benchmark -> variant -> index -> cell
        self.originals: dict[str, dict[str, pd.Series]] = {}  # --from-vlmeval: the files' columns
        # Generated predictions: whether a cell that is no number has come (module docstring).
        self.text_seen: dict[str, dict[str, bool]] = {}
        for plan in self.plans:
            if files is None:
                meta = plan.data_frame
                blank = {index: self.PLACEHOLDER for index in meta["index"].tolist()}
                frame = roundtrip(prediction_frame(meta, blank))
                self.frames[plan.name] = {variant: frame for variant in VARIANTS}
            else:
                frames, meta = files[plan.name]
                self.originals[plan.name] = {variant: frames[variant]["prediction"] for variant in VARIANTS}
                self.frames[plan.name] = {variant: frames[variant].assign(prediction=np.nan) for variant in VARIANTS}
            self.text_seen[plan.name] = dict.fromkeys(VARIANTS, files is not None)
            self.metas[plan.name] = meta
            placeholder = plan.bench.score(self.frames[plan.name]["base"], meta=meta)
            rows = [row for row in reference.rows if row.benchmark == plan.name]
            self.structures[plan.name] = CaseStructure(plan, rows, placeholder)
            self.cells[plan.name] = {variant: {} for variant in VARIANTS}

    def add(self, benchmark: str, variant: str, predictions: Mapping[Any, Any]) -> None:
        """Predictions that arrived; each generated one goes through the xlsx round trip once."""
        from lavender_checks.vlmeval_io import roundtrip

        known = self.cells[benchmark][variant]
        new = {str(k): v for k, v in predictions.items() if str(k) not in known}
        if not new:
            return
        if benchmark in self.originals:  # the files' own cells
            known.update(new)
            return
        # A cell's type comes from its whole column (pandas reads a column of numbers and
        # blanks as floats: "12" -> 12.0): one text cell beside them keeps them text, as they
        # are in the complete file once any of its cells is text.
        back = roundtrip(pd.DataFrame({"prediction": [*(str(v) for v in new.values()), "text"]}))
        cells = back["prediction"].tolist()[:-1]
        known.update(zip(new, cells))
        if not self.text_seen[benchmark][variant]:
            column = pd.Series(cells, dtype=object)
            self.text_seen[benchmark][variant] = bool((column.notna() & pd.to_numeric(column, errors="coerce").isna()).any())

    def look(self, predictions: Mapping[str, Mapping[str, Mapping[Any, Any]]],
             done_units: Mapping[str, int]) -> Decision:
        """Take a round's predictions (benchmark -> variant -> index -> text), then decide."""
        for name, variants in predictions.items():
            for variant, rows in variants.items():
                self.add(name, variant, rows)
        return self.decision(done_units)

    def decision(self, done_units: Mapping[str, int]) -> Decision:
        samples: dict[tuple[str, str], CaseSample] = {}
        for plan in self.plans:
            done = done_units.get(plan.name, 0)
            # Until a cell that is no number has come, the complete file's column may turn out
            # all numbers, which VLMEvalKit reads otherwise: no decision on that benchmark yet.
            if done == 0 or not all(self.text_seen[plan.name].values()):
                continue
            results = {variant: self.score(plan.name, variant) for variant in VARIANTS}
            samples.update(self.structures[plan.name].samples(results, done))
        confidence = self.reference.gate.confidence
        return decide(self.cases, samples, self.alpha, confidence, self.settings)

    def score(self, benchmark: str, variant: str) -> ScoreResult:
        """The benchmark scored with the predictions seen so far (placeholders elsewhere)."""
        frame = self.frames[benchmark][variant].copy()
        cells = self.cells[benchmark][variant]
        keys = frame["index"].astype(str)
        if benchmark in self.originals:  # the files' cells, in their column's own type
            frame["prediction"] = self.originals[benchmark][variant].astype(object).where(keys.isin(cells).to_numpy())
        else:
            frame["prediction"] = pd.Series([cells.get(k, np.nan) for k in keys], index=frame.index, dtype=object)
        plan = next(p for p in self.plans if p.name == benchmark)
        return plan.bench.score(frame, meta=self.metas[benchmark])


# ------------------------------------------------------------------------------ the record


@dataclass
class RoundsRecord:
    """What ``report.json``'s ``early_stop`` says, and the verdicts of a stopped run."""

    stopped: bool = False
    rounds_done: int = 0
    rows_used: int = 0
    rows_total: int = 0
    benchmarks: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list = field(default_factory=list)  # gate.sequential.EarlyFailure of the stop
    undecidable: list[str] = field(default_factory=list)
    alpha: float = 0.0
    alpha_scope: str = "the whole run"  # what alpha bounds: a series' checkpoint has its own
    ended_by: str | None = None  # a series' checkpoint cut short: the gated checkpoint(s) that stopped
    looks: list[dict[str, Any]] = field(default_factory=list)  # per round: rows, seconds spent looking

    @property
    def deciding(self):
        return self.failures[0] if self.failures else None

    @property
    def complete(self) -> bool:
        """Every row was used: the verdicts are the complete run's."""
        return not self.stopped and self.ended_by is None

    def describe(self) -> dict[str, Any]:
        return {
            "stopped": self.stopped, "rows_used": self.rows_used, "rows_total": self.rows_total,
            "benchmarks": {name: dict(counts) for name, counts in self.benchmarks.items()},
            "rounds_done": self.rounds_done, "alpha": self.alpha, "alpha_scope": self.alpha_scope,
            "ended_by": self.ended_by,
            "decided_by": ({"row": self.deciding.row_id, "quantity": self.deciding.quantity,
                            "message": self.deciding.describe()} if self.deciding else None),
            "failures": [{"row": f.row_id, "quantity": f.quantity, "reported": f.reported,
                          "bounds": list(f.bounds), "band_bound": f.band_bound, "direction": f.direction,
                          "alpha": f.alpha, "units_seen": f.drawn, "units": f.population}
                         for f in self.failures],
            "undecidable": list(self.undecidable),
            "looks": list(self.looks),
        }

    def headline(self) -> str:
        return stop_headline(self.describe())


def run_rounds(plans: Sequence[BenchmarkRounds], settings: StopEarlySettings, alpha: float,
               do_round: Callable[[int, dict[str, list]], None],
               look: Callable[[dict[str, list], dict[str, int]], Decision]) -> RoundsRecord:
    """The rounds of one adapter: ``do_round(r, rows)`` has the round's rows (benchmark ->
    indices) produced in both variants (generated, or this process's share generated and the
    others waited for); ``look(rows, done)`` decides from everything done so far (``done``:
    benchmark -> draw units done), e.g. ``Looker.look``. Stops after the round whose look
    finds a failure certain; a complete run's verdicts come from the complete run."""
    return run_rounds_each(plans, settings, {LAVENDER_VARIANT: alpha},
                           lambda number, rows, judged: do_round(number, rows),
                           lambda rows, done, judged: {LAVENDER_VARIANT: look(rows, done)})[LAVENDER_VARIANT]


def run_rounds_each(plans: Sequence[BenchmarkRounds], settings: StopEarlySettings, alphas: Mapping[str, float],
                    do_round: Callable[[int, dict[str, list], tuple[str, ...]], None],
                    look: Callable[[dict[str, list], dict[str, int], tuple[str, ...]], Mapping[str, Decision]],
                    gated: Sequence[str] | None = None) -> dict[str, RoundsRecord]:
    """The rounds of several adapters judged against one base (a checkpoint series), each of
    which stops on its own: ``alphas`` names them (each with its own alpha). ``do_round(r,
    rows, judged)`` produces the round's rows in the base and in each adapter of ``judged``
    (those still going); ``look(rows, done, judged)`` returns a ``Decision`` per adapter of
    ``judged``; one it leaves out (its adapter was refused) is dropped from later rounds and
    has no record (its rounds say nothing of it).

    The rounds end at the last, or once the exit status is certain: every adapter of
    ``gated`` (default: all) stopped or was dropped, and one stopped. The adapters still going
    then are cut short: their record says ``ended_by`` (which stopped) and their cases are
    not judged. With every adapter dropped and none stopped the rounds go on for the base."""
    total = sum(p.rows for p in plans)
    records = {name: RoundsRecord(alpha=alpha, rows_total=total) for name, alpha in alphas.items()}
    gated = tuple(alphas) if gated is None else tuple(gated)
    judged = tuple(alphas)
    dropped: set[str] = set()
    done = {p.name: 0 for p in plans}
    for number, fraction in enumerate(settings.rounds, start=1):
        rows = {}
        for plan in plans:
            stop = plan.units_through(fraction)
            rows[plan.name] = plan.indices(done[plan.name], stop)
            done[plan.name] = stop
        do_round(number, rows, judged)
        t0 = time.time()
        decisions = look(rows, dict(done), judged) if judged else {}
        seconds = round(time.time() - t0, 3)
        used = {p.name: {"rows_used": len(p.indices(0, done[p.name])), "rows_total": p.rows} for p in plans}
        rows_used = sum(c["rows_used"] for c in used.values())
        for name in judged:
            decision = decisions.get(name)
            if decision is None:
                continue
            record = records[name]
            record.rounds_done, record.benchmarks, record.rows_used = number, used, rows_used
            record.undecidable = list(decision.undecidable)
            record.looks.append({"round": number, "fraction": fraction, "rows_used": rows_used, "seconds": seconds})
            if decision.stop and rows_used < total:
                record.stopped = True
                record.failures = list(decision.failures)
        dropped.update(name for name in judged if name not in decisions)
        judged = tuple(name for name in judged if name in decisions and not records[name].stopped)
        stopped = [name for name in gated if records[name].stopped]
        if stopped and all(name in dropped or records[name].stopped for name in gated):
            for name in judged:  # the exit status no longer depends on them
                records[name].ended_by = ", ".join(stopped)
            break
    return {name: record for name, record in records.items() if name not in dropped}

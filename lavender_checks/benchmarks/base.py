"""What every benchmark declares, and what its scorer returns.

A benchmark is data (its entry in ``benchmarks.toml``) plus one module that knows its
VLMEvalKit prompt and its VLMEvalKit scorer. Nothing here knows about models or CUDA.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class BenchmarkSpec:
    """One entry of ``benchmarks.toml``."""

    name: str  # VLMEvalKit dataset name, e.g. "DocVQA_VAL"
    module: str  # module under lavender_checks.benchmarks that implements it
    tsv: str  # file name inside $LMUData
    md5: str  # VLMEvalKit's DATASET_MD5 of the full file
    rows: int | None  # expected rows of the full file (None when unknown)
    image_folder: str  # folder under $LMUData/images/ that VLMEvalKit dumps images to
    kind: str  # VLMEvalKit TYPE: "VQA", "MCQ" or "Y/N"
    required_columns: tuple[str, ...]
    unit: str  # what the bootstrap resamples: "question", "circular_group" or "image_pair"
    stratum: str | None  # column the bootstrap resamples within (keeps subset sizes), or None
    metric_keys: tuple[str, ...]  # VLMEvalKit's metric names, in VLMEvalKit's order
    metric_unit: str  # "percent" or "score" (MME sums of percents)
    url: str | None = None  # where VLMEvalKit downloads the TSV (the suite never downloads)
    # metric key -> its largest value ("default": every other key); every metric lies in [0, max]
    metric_max: Mapping[str, float] = field(default_factory=dict)

    def max_value(self, keys: tuple[str, ...] | str) -> float | None:
        """The largest value of a metric key, or of keys summed (a derived metric); None
        when benchmarks.toml does not say."""
        keys = (keys,) if isinstance(keys, str) else keys
        maxima = [self.metric_max.get(k, self.metric_max.get("default")) for k in keys]
        return None if any(m is None for m in maxima) else float(sum(maxima))


@dataclass(frozen=True)
class Ratio:
    """One term of a metric written as ``scale * sum(w * numerator) / sum(w * denominator)``.

    The arrays are aligned with the rows of ``ScoreResult.units``. With every weight ``w``
    equal to 1 the sum of a metric's terms is its value; the bootstrap draws other weights.
    Every unit's ``numerator`` lies in ``[0, denominator]`` (a unit's score is a fraction):
    the gate's variance bound for a subset relies on it.
    """

    numerator: np.ndarray
    denominator: np.ndarray
    scale: float = 100.0


@dataclass
class ScoreResult:
    """Scores of one prediction file (one model, one benchmark).

    metrics: VLMEvalKit's metric keys -> values in the units the report prints (percent;
        MMBench is VLMEvalKit's fraction * 100; MME subtasks are acc + acc+, 0-200), in
        VLMEvalKit's key order. Computed with VLMEvalKit's numerics, bit for bit.
    samples: one row per prediction row: ``index``, ``unit`` (resampling unit id),
        ``score`` (float), plus ``extracted`` for MMBench/MME and any columns useful for
        review (``split``, ``category``, ``answer``, ``prediction``).
    units: one row per resampling unit: ``unit``, ``stratum``, ``correct`` (float: the
        unit's own score; for MMBench the group hit, for MME the pair's mean question score).
    forms: metric key -> list of Ratio terms over ``units`` (for the paired bootstrap).
    population: stratum -> resampling units of the whole benchmark (``Benchmark.population``
        of its TSV), when the scored rows may be a part of it; None: the rows scored are the
        whole benchmark. The gate widens a subset's bands by the rows it did not score.
    noncomparable: why these metrics are not the ones the benchmark reports, though computed
        as VLMEvalKit would ('' when they are): e.g. MMBench rows without their circular
        copies, where CircularEval cannot be applied.
    """

    benchmark: str
    metrics: dict[str, float]
    samples: pd.DataFrame
    units: pd.DataFrame
    forms: dict[str, list[Ratio]] = field(default_factory=dict)
    population: dict[Any, int] | None = None
    noncomparable: str = ""


class Benchmark(ABC):
    """Base class of the four benchmark modules."""

    def __init__(self, spec: BenchmarkSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def dataset_prompt(self, row: Mapping[str, Any]) -> str:
        """The text VLMEvalKit's dataset ``build_prompt`` makes for this row (no image)."""
        raise NotImplementedError(
            f"{self.name} has no dataset prompt here; the run profile must give a template"
        )

    @abstractmethod
    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        """Score a prediction frame exactly as VLMEvalKit's ``evaluate`` does.

        ``predictions`` is what VLMEvalKit reads back from its prediction file: every TSV
        column except ``image``, plus ``prediction``, after the xlsx round trip
        (``lavender_checks.vlmeval_io.roundtrip``). ``meta`` is the benchmark TSV, when at
        hand, to check that every predicted index belongs to the benchmark.
        """

    def population(self, frame: pd.DataFrame) -> dict[Any, int]:
        """Resampling units per stratum of a whole benchmark frame (its TSV, or a complete
        prediction file), keyed as the scorer keys ``ScoreResult.units["stratum"]``: the
        stratum column's value, or ``"all"`` where the benchmark (or the frame) has none.
        Units follow ``spec.unit``: the question, the MMBench circular group (index modulo
        1,000,000) or the MME image."""
        if self.spec.unit == "question":
            units = frame["index"]
        elif self.spec.unit == "circular_group":
            units = pd.to_numeric(frame["index"], errors="coerce") % 1_000_000
        elif self.spec.unit == "image_pair":
            units = frame["image_path"]
        else:
            raise ValueError(f"{self.name}: unknown resampling unit {self.spec.unit!r}")
        column = self.spec.stratum
        if column and column in frame.columns:
            strata = frame[column].map(lambda v: v if isinstance(v, str) else str(v))
        else:
            strata = pd.Series("all", index=frame.index)
        pairs = pd.DataFrame({"unit": units.to_numpy(), "stratum": strata.to_numpy()})
        first = pairs.drop_duplicates("unit")  # a unit belongs to the stratum of its first row
        return {stratum: int(count) for stratum, count in first["stratum"].value_counts(sort=False).items()}

    def __repr__(self) -> str:
        return f"<Benchmark {self.name}>"

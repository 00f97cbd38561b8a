"""What the four VLMEvalKit scorers share: input checks, VLMEvalKit's numerics, the rules file.

Kept apart from ``base.py`` (the contract) so that the contract stays free of
VLMEvalKit details.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from lavender_checks.benchmarks.base import Ratio

_RULES = Path(__file__).with_name("vlmeval_rules.toml")
_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


class ScoringInputError(ValueError):
    """A prediction frame (or its meta) that VLMEvalKit would crash on or that cannot be
    scored faithfully. The message names the benchmark, the row and the column."""


@cache
def _all_rules() -> dict:
    with _RULES.open("rb") as fh:
        return tomllib.load(fh)


def rules(benchmark: str) -> dict:
    """The ``vlmeval_rules.toml`` table of ``benchmark`` (empty when it has none)."""
    return _all_rules().get(benchmark, {})


def percent_mean(values: Iterable[float] | np.ndarray) -> float:
    """``numpy.mean`` over a float64 array in the given order, *then* times 100.

    This is VLMEvalKit's ``np.mean(hit) * 100``; ``100 * sum / n`` differs in the last
    bit for some inputs (e.g. 1 of 3: 33.33333333333333 vs 33.333333333333336).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ScoringInputError("no rows to average")  # VLMEvalKit would print nan
    return float(np.mean(array)) * 100


def vlmeval_str(value) -> str:
    """``str()`` of a cell as VLMEvalKit applies it after reading its file: a missing
    value reads back as float NaN, so it becomes ``'nan'`` (pandas' ``NA`` too)."""
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return str(value)


def row_label(position: int, index=None) -> str:
    """How error messages name a row: 1-based data row (header excluded) and its index."""
    label = f"data row {position + 1}"
    return label if index is None else f"{label} (index {index})"


def require_columns(frame: pd.DataFrame, columns: Sequence[str], benchmark: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ScoringInputError(
            f"{benchmark}: prediction frame lacks column(s) {', '.join(map(repr, missing))}; "
            f"columns found: {', '.join(map(str, frame.columns))}"
        )


def require_rows(frame: pd.DataFrame, benchmark: str) -> None:
    if len(frame) == 0:
        raise ScoringInputError(f"{benchmark}: the prediction frame has no rows")


def _as_int(value) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str) and _INTEGER_TEXT.match(value):
        return int(value)
    return None


def integer_indices(frame: pd.DataFrame, benchmark: str) -> np.ndarray:
    """The ``index`` column as int64; every benchmark here has int indices (VLMEvalKit
    asserts it for MMBench). Non-integer or duplicated indices raise ScoringInputError."""
    values = frame["index"].tolist()
    out = np.empty(len(values), dtype=np.int64)
    for position, value in enumerate(values):
        converted = _as_int(value)
        if converted is None:
            raise ScoringInputError(
                f"{benchmark}: {row_label(position)} column 'index' holds {value!r}, "
                "not an integer")
        out[position] = converted
    unique, counts = np.unique(out, return_counts=True)
    duplicated = unique[counts > 1]
    if duplicated.size:
        shown = ", ".join(str(x) for x in duplicated[:10])
        raise ScoringInputError(
            f"{benchmark}: column 'index' repeats {duplicated.size} value(s): {shown}"
            + (" ..." if duplicated.size > 10 else ""))
    return out


def meta_indices(meta: pd.DataFrame, benchmark: str) -> dict[int, int]:
    """index -> row position of the benchmark TSV (``meta``)."""
    if "index" not in meta.columns:
        raise ScoringInputError(
            f"{benchmark}: the benchmark TSV has no 'index' column; columns found: "
            f"{', '.join(map(str, meta.columns))}")
    positions = {}
    for position, value in enumerate(meta["index"].tolist()):
        converted = _as_int(value)
        if converted is None:
            raise ScoringInputError(
                f"{benchmark}: benchmark TSV {row_label(position)} column 'index' holds "
                f"{value!r}, not an integer")
        positions[converted] = position
    return positions


def check_meta(indices: np.ndarray, meta: pd.DataFrame | None, benchmark: str) -> dict[int, int] | None:
    """Every predicted index must be a row of the benchmark TSV (a subset is fine), as
    VLMEvalKit asserts. Returns index -> meta row position, or None without meta."""
    if meta is None:
        return None
    positions = meta_indices(meta, benchmark)
    missing = [int(i) for i in indices if int(i) not in positions]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20])
        raise ScoringInputError(
            f"{benchmark}: {len(missing)} predicted index(es) are not in the benchmark TSV: "
            f"{shown}" + (" ..." if len(missing) > 20 else ""))
    return positions


def group_order(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """Distinct values: those of ``preferred`` first, in its order, then the rest sorted."""
    present = set(values)
    return [v for v in preferred if v in present] + sorted(present.difference(preferred))


def string_column(frame: pd.DataFrame, column: str, benchmark: str) -> list[str]:
    """A grouping column (split, category, ...) as strings; a missing cell is an error
    because VLMEvalKit would average an empty group to nan or crash on sorting."""
    out = []
    for position, value in enumerate(frame[column].tolist()):
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            raise ScoringInputError(
                f"{benchmark}: {row_label(position, frame['index'].iloc[position])} column "
                f"{column!r} is empty")
        out.append(str(value))
    return out


def vqa_inputs(predictions: pd.DataFrame, benchmark: str, columns: Sequence[str], meta,
               parse_answers) -> tuple[np.ndarray, list[str], list[list], list[str]]:
    """The checked inputs of a VQA scorer: indices, answer cells, each row's answer list and
    the prediction cells (both cells as VLMEvalKit's ``str()`` sees them).

    ``parse_answers`` turns an answer cell into its list (DocVQA's or ChartQA's rule); a cell
    VLMEvalKit's scorer would crash on is refused with the row and column named.
    """
    from lavender_checks.text import NonStringAnswerError

    require_columns(predictions, columns, benchmark)
    require_rows(predictions, benchmark)
    indices = integer_indices(predictions, benchmark)
    check_meta(indices, meta, benchmark)
    answer_cells = [vlmeval_str(x) for x in predictions["answer"].tolist()]
    prediction_cells = [vlmeval_str(x) for x in predictions["prediction"].tolist()]
    answers = []
    for position, cell in enumerate(answer_cells):
        try:
            answers.append(parse_answers(cell))
        except NonStringAnswerError as err:
            raise ScoringInputError(
                f"{benchmark}: {row_label(position, indices[position])} column 'answer': {err}"
            ) from None
    return indices, answer_cells, answers, prediction_cells


def vqa_aggregate(benchmark: str, frame: pd.DataFrame, scores: np.ndarray,
                  split_order: Sequence[str] = ()) -> tuple[dict[str, float], dict[str, list[Ratio]], list[str]]:
    """VLMEvalKit's ImageVQADataset aggregation (sections 3.5 and 4.6).

    With a ``split`` column: one key per split (``numpy.mean`` of that split's scores,
    times 100) then ``Overall`` over all rows (a micro-average). Without one: ``Overall``,
    then one key per ``category`` value, sorted. Returns metrics, forms and the stratum of
    every row (its split, or ``"all"``).
    """
    metrics: dict[str, float] = {}
    forms: dict[str, list[Ratio]] = {}
    ones = np.ones(len(scores), dtype=np.float64)
    if "split" in frame.columns:
        splits = string_column(frame, "split", benchmark)
        split_array = np.asarray(splits, dtype=object)
        for split in group_order(splits, split_order):
            mask = split_array == split
            metrics[split] = percent_mean(scores[mask])
            forms[split] = [Ratio(scores * mask, mask.astype(np.float64), 100.0)]
        metrics["Overall"] = percent_mean(scores)
        forms["Overall"] = [Ratio(scores.copy(), ones, 100.0)]
        return metrics, forms, splits
    metrics["Overall"] = percent_mean(scores)
    forms["Overall"] = [Ratio(scores.copy(), ones, 100.0)]
    if "category" in frame.columns:
        categories = string_column(frame, "category", benchmark)
        category_array = np.asarray(categories, dtype=object)
        for category in sorted(set(categories)):
            mask = category_array == category
            metrics[category] = percent_mean(scores[mask])
            forms[category] = [Ratio(scores * mask, mask.astype(np.float64), 100.0)]
    return metrics, forms, ["all"] * len(scores)

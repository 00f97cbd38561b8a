"""VLMEvalKit's prediction files: writing them, reading them back, finding them.

VLMEvalKit never scores in-memory strings: it writes ``<model>_<dataset>.xlsx`` and its
``evaluate()`` reads the file back with ``pandas.read_excel``. That round trip changes
what is scored (spec section 1.6), so this module reproduces it:

* a cell exactly equal to one of pandas' NA strings (``NA_TOKENS``: ``''``, ``N/A``,
  ``NA``, ``None``, ``null``, ``nan``, ...) reads back as NaN, which the scorers then turn
  into the string ``'nan'``;
* a column whose every cell looks numeric is parsed as numbers;
* xlsxwriter's own conversions apply (``mailto:``/``internal:`` links lose their prefix,
  control characters become ``_xHHHH_``, text is cut at 32 767 characters), and before
  2026-07-22 a prediction starting with ``=`` became a formula that reads back as 0.

Rather than imitating each effect, :func:`roundtrip` performs the real write and read in
memory with the same libraries and options as VLMEvalKit, so every effect, known or not,
is the one VLMEvalKit sees. Cached ``_result.pkl`` / ``_auxmatch.xlsx`` files are never
read: they can hold stale scores (spec section 1.7).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

try:  # pandas' own list is the truth: read_excel and read_csv use it
    from pandas._libs.parsers import STR_NA_VALUES as _PANDAS_NA_VALUES
except ImportError:  # pragma: no cover - the list of pandas 2.x/3.x
    _PANDAS_NA_VALUES = {
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    }

__all__ = [
    "NA_TOKENS", "PREDICTION_SUFFIXES", "PredictionFileError", "roundtrip",
    "read_prediction_file", "write_prediction_file", "prediction_frame",
    "find_prediction_file",
]

#: Strings pandas' readers turn into NaN by default (``keep_default_na=True``).
NA_TOKENS: frozenset[str] = frozenset(_PANDAS_NA_VALUES)

#: File types VLMEvalKit may write (``PRED_FORMAT``) plus JSON lines, newest-first search order.
PREDICTION_SUFFIXES = (".xlsx", ".tsv", ".csv", ".json", ".jsonl")

# VLMEvalKit's run directories: new (2026-04-09 on) and legacy layout.
_RUN_DIR = re.compile(r"^T\d{8}-\d{6}$|^T\d{8}_G[0-9a-fA-F]+$")


class PredictionFileError(ValueError):
    """A prediction file that cannot be read or lacks what scoring needs."""


# --------------------------------------------------------------------------------------
# The xlsx round trip
# --------------------------------------------------------------------------------------

def _xlsx_options(formulas_as_zero: bool) -> dict:
    # Since 2026-07-22 VLMEvalKit passes strings_to_formulas=False; before, xlsxwriter's
    # defaults applied and "=..." predictions were written as formulas (cached value 0).
    return {"options": {"strings_to_formulas": bool(formulas_as_zero)}}


def _write_xlsx(frame: pd.DataFrame, target, formulas_as_zero: bool = False) -> None:
    with warnings.catch_warnings():
        # xlsxwriter warns about URLs it keeps as text and strings it truncates; both are
        # part of what VLMEvalKit's file holds, so the warnings carry no news here.
        warnings.simplefilter("ignore")
        with pd.ExcelWriter(target, engine="xlsxwriter",
                            engine_kwargs=_xlsx_options(formulas_as_zero)) as writer:
            frame.to_excel(writer, index=False)


def roundtrip(frame: pd.DataFrame, *, formulas_as_zero: bool = False) -> pd.DataFrame:
    """What VLMEvalKit's xlsx write + ``pandas.read_excel`` make of a prediction frame.

    NA tokens come back as NaN (the scorers ``str()`` them to ``'nan'``; MMBench options
    that are NaN drop out of the choices), all-numeric columns come back as numbers, and
    xlsxwriter's conversions apply. ``formulas_as_zero=True`` reproduces files written
    before 2026-07-22, where a prediction starting with ``=`` reads back as ``0``.
    """
    try:
        buffer = io.BytesIO()
        _write_xlsx(frame, buffer, formulas_as_zero)
    except (TypeError, ValueError) as err:
        raise PredictionFileError(f"cannot write the frame as xlsx: {err}") from err
    buffer.seek(0)
    return pd.read_excel(buffer)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def _records_frame(records, path: Path) -> pd.DataFrame:
    if isinstance(records, Mapping) and "columns" in records and "data" in records:
        frame = pd.DataFrame(records["data"], columns=records["columns"])
    elif isinstance(records, list) and all(isinstance(r, Mapping) for r in records):
        frame = pd.DataFrame.from_records(records)
    else:
        raise PredictionFileError(
            f"{path}: expected a list of row objects, found {type(records).__name__}")
    for column in frame.columns:
        for position, value in enumerate(frame[column].tolist()):
            if isinstance(value, (list, dict)):
                raise PredictionFileError(
                    f"{path}: data row {position + 1} column {column!r} holds a "
                    f"{type(value).__name__}; prediction files hold plain cells")
    # Score JSON rows exactly as VLMEvalKit scores the same rows in its default xlsx.
    return roundtrip(frame)


def _read_json_lines(path: Path) -> pd.DataFrame:
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PredictionFileError(f"{path}: line {line_number} is not JSON: {err}") from err
    return _records_frame(records, path)


def read_prediction_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read a VLMEvalKit prediction file as its ``evaluate()`` sees it.

    ``.xlsx``: ``pandas.read_excel`` with default NA handling; ``.tsv``/``.csv``:
    ``pandas.read_csv`` (same NA handling); ``.json``/``.jsonl``: row objects, put through
    :func:`roundtrip` so they score as the same rows written to VLMEvalKit's xlsx.
    Raises FileNotFoundError for a missing file and PredictionFileError for an
    unreadable one or one without ``index`` and ``prediction`` columns.
    """
    path = Path(path)
    if path.is_dir():  # "not found" would send the user looking for a path that is there
        raise PredictionFileError(f"{path}: a folder, not a prediction file (give the "
                                  "<model>_<dataset>.xlsx file in it)")
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in PREDICTION_SUFFIXES:
        raise PredictionFileError(
            f"{path}: unsupported file type {suffix!r}; expected one of "
            f"{', '.join(PREDICTION_SUFFIXES)}")
    try:
        if suffix == ".xlsx":
            frame = pd.read_excel(path)
        elif suffix == ".tsv":
            frame = pd.read_csv(path, sep="\t")
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".json":
            with path.open(encoding="utf-8") as fh:
                frame = _records_frame(json.load(fh), path)
        else:
            frame = _read_json_lines(path)
    except PredictionFileError:
        raise
    except Exception as err:  # pandas/openpyxl/zipfile raise many types for bad content
        raise PredictionFileError(f"{path}: cannot read it as {suffix}: {type(err).__name__}: {err}") from err
    missing = [c for c in ("index", "prediction") if c not in frame.columns]
    if missing:
        raise PredictionFileError(
            f"{path}: no {' or '.join(repr(c) for c in missing)} column; columns found: "
            f"{', '.join(map(str, frame.columns)) or '(none)'}")
    _check_integer_index(frame, path)
    return frame


def _check_integer_index(frame: pd.DataFrame, path: Path) -> None:
    """The four benchmarks index rows by integers (MMBench's circular copies by main + k·1e6);
    a file whose index is not one is named here, not by a scorer that knows no file."""
    if pd.api.types.is_integer_dtype(frame["index"]):
        return
    for position, value in enumerate(frame["index"].tolist()):
        if isinstance(value, bool) or not (
                isinstance(value, (int, np.integer))
                or (isinstance(value, (float, np.floating)) and float(value).is_integer())
                or (isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value))):
            raise PredictionFileError(
                f"{path}: data row {position + 1} column 'index' holds {value!r}, not an integer "
                "(VLMEvalKit's DocVQA, ChartQA, MMBench and MME files index rows by integers)")


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def _json_value(value):
    """VLMEvalKit's NumpyEncoder: numpy scalars as plain JSON values."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _json_records(frame: pd.DataFrame) -> list[dict]:
    records = frame.to_dict("records")
    for record in records:  # pandas' NA scalars are not JSON; VLMEvalKit's files hold NaN
        for key, value in record.items():
            if value is pd.NA or value is None:
                record[key] = math.nan
    return records


def write_prediction_file(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a prediction frame in VLMEvalKit's layout and format, atomically.

    The layout is every TSV column except ``image``, in TSV order, plus ``prediction``
    (an ``image`` column is dropped here, as VLMEvalKit does). ``.xlsx`` is written with
    pandas + xlsxwriter and ``strings_to_formulas=False`` (VLMEvalKit since 2026-07-22);
    ``.tsv``/``.csv`` with every field quoted; ``.json`` as indented row objects;
    ``.jsonl`` as one row object per line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PREDICTION_SUFFIXES:
        raise PredictionFileError(
            f"{path}: unsupported file type {suffix!r}; expected one of "
            f"{', '.join(PREDICTION_SUFFIXES)}")
    if "prediction" not in frame.columns:
        raise PredictionFileError(
            f"{path}: the frame has no 'prediction' column; columns: "
            f"{', '.join(map(str, frame.columns))}")
    if "image" in frame.columns:
        frame = frame.drop(columns=["image"])
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial-{os.getpid()}{suffix}")
    try:
        if suffix == ".xlsx":
            _write_xlsx(frame, temporary)
        elif suffix in (".tsv", ".csv"):
            frame.to_csv(temporary, sep="\t" if suffix == ".tsv" else ",", index=False,
                         encoding="utf-8", quoting=csv.QUOTE_ALL)
        elif suffix == ".json":
            with temporary.open("w", encoding="utf-8") as fh:
                json.dump(_json_records(frame), fh, indent=4, ensure_ascii=False, default=_json_value)
        else:
            with temporary.open("w", encoding="utf-8") as fh:
                for record in _json_records(frame):
                    fh.write(json.dumps(record, ensure_ascii=False, default=_json_value) + "\n")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def prediction_frame(meta: pd.DataFrame, predictions: Mapping[object, str]) -> pd.DataFrame:
    """The frame VLMEvalKit writes after inference: the benchmark frame ``meta`` without
    ``image``, in its row and column order, plus ``prediction = str(prediction)``.

    ``predictions`` maps index -> generated text (int keys, or their string form). Every
    row of ``meta`` needs one, as VLMEvalKit asserts; extra keys are ignored.
    """
    if "index" not in meta.columns:
        raise PredictionFileError(
            f"the benchmark frame has no 'index' column; columns: {', '.join(map(str, meta.columns))}")
    lookup = {}
    for key, value in predictions.items():
        lookup[str(key).strip()] = value
    indices = meta["index"].tolist()
    missing = [i for i in indices if str(i) not in lookup]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20])
        raise PredictionFileError(
            f"{len(missing)} of {len(indices)} benchmark rows have no prediction: {shown}"
            + (" ..." if len(missing) > 20 else ""))
    frame = meta.drop(columns=["image"]) if "image" in meta.columns else meta.copy()
    frame["prediction"] = [str(lookup[str(i)]) for i in indices]
    return frame


# --------------------------------------------------------------------------------------
# Finding files in a VLMEvalKit work dir
# --------------------------------------------------------------------------------------

def find_prediction_file(work_dir: str | os.PathLike, model_name: str, dataset: str) -> Path:
    """The newest ``<model>_<dataset>.{xlsx,tsv,csv,json,jsonl}`` of a VLMEvalKit work dir.

    Looks in ``<work>/<model>/`` (where VLMEvalKit keeps symlinks to the latest run),
    in every run directory below it (``T<YYYYMMDD>-<HHMMSS>`` since 2026-04-09, legacy
    ``T<YYYYMMDD>_G<hash>``) and in ``<work>`` itself (a run directory given directly).
    The newest file by modification time wins; the real file is returned (a symlink
    counts as its target). Only the exact prediction file name matches: ``…_result.pkl``,
    ``…_auxmatch.xlsx`` and other intermediate files are never picked. Raises
    FileNotFoundError listing where it looked.
    """
    work = Path(work_dir)
    names = [f"{model_name}_{dataset}{suffix}" for suffix in PREDICTION_SUFFIXES]
    folders = [work / model_name]
    if folders[0].is_dir():
        folders += sorted(p for p in folders[0].iterdir() if p.is_dir() and _RUN_DIR.match(p.name))
    folders.append(work)

    candidates: dict[Path, float] = {}  # real file -> modification time
    for folder in folders:
        for name in names:
            path = folder / name
            if path.is_file():  # follows symlinks; a dangling one is skipped
                real = path.resolve()
                candidates[real] = real.stat().st_mtime
    if not candidates:
        looked = "\n  ".join(str(f) for f in folders)
        raise FileNotFoundError(
            f"no prediction file {model_name}_{dataset}.{{{','.join(s[1:] for s in PREDICTION_SUFFIXES)}}} "
            f"found; looked in:\n  {looked}")
    # Newest wins; equal times fall back to the path so the choice is reproducible.
    return max(candidates, key=lambda real: (candidates[real], str(real)))

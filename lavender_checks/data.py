"""LMUData: where VLMEvalKit's benchmark TSVs live, how they are read, and what pixels they hold.

This module reproduces VLMEvalKit's ``ImageBaseDataset`` (``vlmeval/dataset/image_base.py``)
on purpose, quirks included, so that the rows and pixels the model gets here are the ones
it gets under ``run.py``:

* the folder: ``$LMUData`` when it names an existing folder, else ``~/LMUData``;
* the file: ``pandas.read_csv(sep='\\t')`` with pandas' default NA parsing, so an option whose
  text is exactly ``None`` (or ``NA``, ``null``, ...) becomes NaN; rows without an image are
  dropped (``skip_noimg``); ``index`` becomes int when every value is int-like;
* image cells: base64 (more than 64 characters), or a reference (at most 64) holding the
  ``index`` of the row whose image is reused;
* pixels: base64-decode, open with PIL, convert ``RGBA``/``P``/``LA`` to ``RGB`` (other modes
  are kept), then save under VLMEvalKit's dump name and open again. The dump name is the
  ``image_path`` cell when that column exists (MME: ``.jpg`` means a JPEG re-encode at PIL's
  default quality 75) and ``<index>.png`` otherwise (lossless);
* TSVs over 1 GiB are "localized": VLMEvalKit then reads ``<name>_local.tsv``, whose
  ``image_path`` points at JPEG re-encodes of every image (see ``load_benchmark``).

What VLMEvalKit does and this module deliberately does not: it never downloads, and it never
reads or writes the image dumps under ``$LMUData/images`` (VLMEvalKit reuses a dump that
already opens, even a stale one; here the pixels always come from the TSV). A file whose md5
differs from VLMEvalKit's (VLMEvalKit would download it again) gives a loud
``DataMismatchWarning``, or a ``DataMismatchError`` with ``strict=True``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import math
import numbers
import os
import re
import tempfile
import tomllib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from lavender_checks.benchmarks import Benchmark, BenchmarkSpec, get_benchmark

__all__ = [
    "DataError", "DataMismatchError", "DataMismatchWarning",
    "BenchmarkData", "Provenance", "lmudata_root", "load_benchmark", "load_benchmark_frame",
    "load_image", "image_key", "subset", "resampling_units", "provenance", "file_md5",
    "md5_cache_path",
]

LMUDATA_ENV = "LMUData"  # VLMEvalKit's environment variable
CACHE_ENV = "LAVENDER_CHECKS_CACHE"  # a folder; md5.json lives in it
DEFAULT_CACHE_DIR = Path("~/.cache/lavender-checks")
MD5_CACHE_MIN_BYTES = 16 * 2**20  # smaller files hash in milliseconds: not worth a cache entry
LOCALIZE_THRESHOLD_BYTES = 2**30  # VLMEvalKit: file_size(path, 'GB') > 1
REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an image cell of at most 64 characters is a reference
CIRCULAR_OFFSET = 1_000_000  # MMBench: circular copy k of main row i has index i + k * 1e6
SYNTHETIC_MANIFEST = "synthetic.toml"  # written next to the mini TSVs by minidata.py

HOW_TO_SET_LMUDATA = (
    "Set the environment variable LMUData to the folder that holds VLMEvalKit's TSV files "
    "(VLMEvalKit's own rule; without it VLMEvalKit uses ~/LMUData), or pass that folder "
    "explicitly. The synthetic mini benchmarks live in fixtures/lmudata-mini."
)

# Python int literals as VLMEvalKit's istype(x, int) accepts them (it evaluates the cell; this
# module does not evaluate data). Covers every form a TSV index takes: digits, sign, zeros.
_INT_LIKE = re.compile(r"\s*[+-]?(?:0+|[1-9]\d*)\s*")


class DataError(ValueError):
    """An LMUData folder, TSV or cell that cannot be used as it is."""


class DataMismatchError(DataError):
    """The TSV is not VLMEvalKit's file (md5 or row count), and strict checking was asked for."""


class DataMismatchWarning(UserWarning):
    """The TSV is not VLMEvalKit's file: its scores are not comparable with the reference report."""


class _FrozenInfo(Mapping):
    """A read-only mapping inside a ``Provenance``; immutable, so its copy is itself."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[Any, Any]):
        self._data = dict(data)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __copy__(self) -> _FrozenInfo:
        return self

    def __deepcopy__(self, memo: dict) -> _FrozenInfo:
        return self

    def __reduce__(self):
        return (_FrozenInfo, (self._data,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


@dataclass(frozen=True)
class Provenance:
    """What ``load_benchmark`` read: the file, whether it is VLMEvalKit's, which subsets were
    taken, and which row holds each row's image (``image_owner``: index -> owner index, for
    rows whose image cell referred to another row's).

    ``load_benchmark`` returns it beside the frame, in a ``BenchmarkData``; the record is
    immutable, so its copy is itself.
    """

    benchmark: str
    root: str
    tsv: str
    read_from: str
    localized: str  # "no", "local_tsv", "emulated"
    size_bytes: int
    md5: str
    md5_expected: str
    md5_matches: bool
    rows_in_file: int
    rows_expected: int | None
    rows_match: bool | None
    rows_without_image: int
    synthetic: bool
    comparable: bool
    subsets: tuple = ()  # one _FrozenInfo per ``subset`` call applied
    image_owner: Mapping = field(default_factory=dict, repr=False, compare=False)

    def __copy__(self) -> Provenance:
        return self

    def __deepcopy__(self, memo: dict) -> Provenance:
        return self

    @property
    def tsv_md5(self) -> str:
        return self.md5

    def with_subset(self, record: Mapping[str, Any]) -> Provenance:
        return dataclasses.replace(self, subsets=self.subsets + (_FrozenInfo(record),))

    def describe(self) -> dict:
        """JSON-ready (the image owners left out): what a report records about the data."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("subsets", "image_owner")}
        out["subsets"] = [{**s, "shard": list(s["shard"]) if s.get("shard") is not None else None}
                          for s in self.subsets]
        return out


class BenchmarkData(NamedTuple):
    """A benchmark's rows and the record of what was read (``load_benchmark``; ``subset`` keeps
    the two together). ``load_image``, ``image_key``, ``subset`` and ``run.predict.predict_run``
    take one, or a bare frame (no record: every row holds its own image, errors name no file).
    A tuple, so ``frame, record = load_benchmark(...)`` reads it."""

    frame: pd.DataFrame
    provenance: Provenance | None = None


def _parts(data: BenchmarkData | pd.DataFrame) -> tuple[pd.DataFrame, Provenance | None]:
    """(frame, record) of a ``BenchmarkData`` or of a bare frame (no record)."""
    if isinstance(data, BenchmarkData):
        return data.frame, data.provenance
    if isinstance(data, pd.DataFrame):
        return data, None
    raise TypeError(f"expected a BenchmarkData or a pandas DataFrame, not {type(data).__name__}")


# ---------------------------------------------------------------------------------------------
# The folder


def lmudata_root(override: str | os.PathLike | None = None) -> Path:
    """The LMUData folder: ``override``, else ``$LMUData`` if it names an existing folder,
    else ``~/LMUData`` (VLMEvalKit's ``LMUDataRoot``, which also does not expand ``~`` in the
    variable). Nothing is created."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(LMUDATA_ENV)
    if env and os.path.isdir(env):
        return Path(env)
    return Path.home() / "LMUData"


def _folders_looked_at(override: str | os.PathLike | None) -> list[str]:
    if override is not None:
        return [f"{Path(override).expanduser()} (given explicitly)"]
    env = os.environ.get(LMUDATA_ENV)
    looked = []
    if env:
        state = "a folder" if os.path.isdir(env) else "not an existing folder, so not used"
        looked.append(f"$LMUData = {env} ({state})")
    else:
        looked.append("$LMUData (not set)")
    looked.append(f"{Path.home() / 'LMUData'} (VLMEvalKit's default)")
    return looked


# ---------------------------------------------------------------------------------------------
# md5, cached


def md5_cache_path() -> Path:
    """``$LAVENDER_CHECKS_CACHE/md5.json``, else ``~/.cache/lavender-checks/md5.json``."""
    folder = os.environ.get(CACHE_ENV)
    return (Path(folder) if folder else DEFAULT_CACHE_DIR).expanduser() / "md5.json"


def _read_md5_cache(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}  # absent or damaged: the md5 is computed again
    return entries if isinstance(entries, dict) else {}


def _write_md5_cache(path: Path, entries: dict[str, dict]) -> None:
    # Entries of files that are gone are dropped; the write is atomic, so concurrent runs
    # can at worst lose each other's entries, never leave a broken file.
    entries = {k: v for k, v in entries.items() if os.path.exists(k)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".md5-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": 1, "files": entries}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file (what VLMEvalKit compares with DATASET_MD5).

    Large files are hashed once per (path, size, mtime): the result is kept in
    ``md5_cache_path()``.
    """
    path = Path(path).resolve()
    stat = path.stat()
    use_cache = stat.st_size >= MD5_CACHE_MIN_BYTES
    key = str(path)
    if use_cache:
        cache_file = md5_cache_path()
        entry = _read_md5_cache(cache_file).get(key)
        if (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns
                and isinstance(entry.get("md5"), str)):
            return entry["md5"]
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "md5").hexdigest()
    if use_cache:
        entries = _read_md5_cache(cache_file)  # read again: another run may have added entries
        entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": digest}
        _write_md5_cache(cache_file, entries)
    return digest


# ---------------------------------------------------------------------------------------------
# Reading a benchmark TSV


def _spec_of(benchmark: str | Benchmark | BenchmarkSpec) -> BenchmarkSpec:
    if isinstance(benchmark, BenchmarkSpec):
        return benchmark
    if isinstance(benchmark, Benchmark):
        return benchmark.spec
    return get_benchmark(str(benchmark)).spec


def _synthetic_entry(root: Path, spec: BenchmarkSpec) -> dict | None:
    """This TSV's entry in ``<root>/synthetic.toml``, the manifest of the mini benchmarks."""
    manifest = root / SYNTHETIC_MANIFEST
    if not manifest.is_file():
        return None
    try:
        with manifest.open("rb") as fh:
            files = tomllib.load(fh).get("files", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{manifest}: cannot read the synthetic-data manifest: {exc}") from exc
    entry = files.get(spec.name)
    if isinstance(entry, dict) and entry.get("tsv") == spec.tsv:
        return entry
    return None


def _read_tsv(path: Path, spec: BenchmarkSpec, required: list[str]) -> pd.DataFrame:
    try:
        # VLMEvalKit's load(): read_csv(sep='\t') with every pandas default, NA parsing included.
        frame = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError,
            OSError) as exc:
        raise DataError(
            f"{path}: cannot read it as VLMEvalKit does (pandas.read_csv(sep='\\t')): {exc}"
        ) from exc
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas takes the surplus leading fields of rows longer than the header as row labels,
        # shifting every column: refuse rather than read misaligned cells.
        raise DataError(
            f"{path}: data rows have more fields than the header "
            f"({len(frame.columns)} columns: {', '.join(map(str, frame.columns))})"
        )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: column(s) {', '.join(repr(c) for c in missing)} missing; {spec.name} needs "
            f"{', '.join(required)}; the file has {', '.join(map(str, frame.columns))}"
        )
    return frame


def _data_row_numbers(positions) -> str:
    # Data rows are counted from 1 below the header, as in a spreadsheet view of the file.
    numbers = [str(int(p) + 1) for p in positions]
    shown = ", ".join(numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


def _normalise_index(frame: pd.DataFrame, path: Path) -> list[str]:
    """Apply VLMEvalKit's index rule in place; return each row's index as VLMEvalKit's str().

    VLMEvalKit makes every index a str, and turns the column back into int only when every
    value is int-like; otherwise the indices stay strings (e.g. ``'3.0'`` from a float column).
    """
    raw = frame["index"]
    missing = np.flatnonzero(raw.isna().to_numpy())
    if len(missing):
        raise DataError(
            f"{path}: column 'index' is empty in data row(s) {_data_row_numbers(missing)}"
        )
    as_text = [str(x) for x in raw]
    if not pd.api.types.is_integer_dtype(raw):
        if all(_INT_LIKE.fullmatch(s) for s in as_text):
            # as_text keeps the cells' own text: VLMEvalKit matches references against it.
            frame["index"] = [int(s) for s in as_text]
        else:
            frame["index"] = as_text
    duplicated = frame["index"].duplicated(keep=False).to_numpy()
    if duplicated.any():
        groups: dict[str, list[int]] = {}
        for pos in np.flatnonzero(duplicated):
            groups.setdefault(as_text[pos], []).append(pos)
        described = "; ".join(
            f"index {value} in data rows {_data_row_numbers(rows)}"
            for value, rows in list(groups.items())[:5]
        )
        more = f" (and {len(groups) - 5} more indices)" if len(groups) > 5 else ""
        raise DataError(f"{path}: duplicate values in column 'index': {described}{more}")
    return as_text


def _resolve_references(frame: pd.DataFrame, index_text: list[str], path: Path) -> dict:
    """Replace reference cells of ``image`` by the base64 they point to (VLMEvalKit's image_map).

    Returns {index of a referring row: index of the row holding the base64}. A reference to
    an index that does not exist, or to a row that itself holds a reference, is an error: the
    VLMEvalKit revisions disagree there (an assertion, or an order-dependent silent pass).
    """
    cells = [str(x) for x in frame["image"]]
    position_of = {text: pos for pos, text in enumerate(index_text)}
    owners: dict = {}
    referring: list[int] = []
    sources: list[str] = []
    indices = frame["index"].tolist()
    for pos, cell in enumerate(cells):
        if cell.startswith("[") and cell.endswith("]"):
            raise DataError(
                f"{path}: row with index {indices[pos]}, column 'image': holds a list of images; "
                "the four benchmarks here have one image per row"
            )
        if len(cell) > REFERENCE_MAX_CHARS:
            continue
        target = position_of.get(cell)
        if target is None:
            raise DataError(
                f"{path}: row with index {indices[pos]}, column 'image': holds {cell!r}; a cell of "
                f"at most {REFERENCE_MAX_CHARS} characters names the index of the row whose image "
                f"it reuses, and no row has index {cell!r}"
            )
        if len(cells[target]) <= REFERENCE_MAX_CHARS:
            raise DataError(
                f"{path}: row with index {indices[pos]}, column 'image': refers to index {cell}, "
                f"whose own image cell is again a reference ({cells[target]!r}), not an image"
            )
        referring.append(pos)
        sources.append(cells[target])
        owners[indices[pos]] = indices[target]
    if referring:
        column = frame.columns.get_loc("image")
        frame.iloc[referring, column] = sources
    return owners


def load_benchmark_frame(
    benchmark: str | Benchmark | BenchmarkSpec,
    root: str | os.PathLike | None = None,
    *,
    strict: bool = False,
) -> pd.DataFrame:
    """``load_benchmark``'s frame alone, for its columns. The image functions want the whole
    ``BenchmarkData``: without its record, rows that share an image are not known to."""
    return load_benchmark(benchmark, root, strict=strict)[0]


def load_benchmark(
    benchmark: str | Benchmark | BenchmarkSpec,
    root: str | os.PathLike | None = None,
    *,
    strict: bool = False,
) -> BenchmarkData:
    """The benchmark's TSV as VLMEvalKit's dataset holds it (``self.data``), and the record of
    what was read (``Provenance``).

    ``root`` is the LMUData folder (``None``: ``lmudata_root()``). Image references are
    resolved, so every ``image`` cell holds base64; ``image_key`` still knows which row held it.

    Checks: the TSV's md5 against VLMEvalKit's DATASET_MD5 and its row count against
    ``benchmarks.toml``. A difference gives a ``DataMismatchWarning`` saying scores are then not
    comparable with the report; ``strict=True`` raises ``DataMismatchError`` instead. The mini
    benchmarks in fixtures/lmudata-mini are recognised by their own manifest (``synthetic.toml``,
    md5 per file): no warning, but ``comparable`` is False and ``strict=True`` refuses them.

    Localization (VLMEvalKit's rule, reproduced): when the TSV is over 1 GiB, VLMEvalKit reads
    ``<name>_local.tsv`` instead, whose ``image_path`` column points at a JPEG re-encode (PIL's
    quality 75) of every image and which has no ``image`` column. If that file exists it is
    read here too (and its images are opened from disk); if not, the re-encode is reproduced in
    memory: ``image_path`` is set to the path VLMEvalKit would write, ``<root>/images/<name>/
    <index>.jpg`` (the index of the row holding the base64), and ``load_image`` then gives the
    JPEG re-encode. The md5 check always concerns the TSV itself.

    The record says what was read and whether it is VLMEvalKit's file (``Provenance``).
    """
    spec = _spec_of(benchmark)
    root_path = lmudata_root(root)
    looked = _folders_looked_at(root)
    if not root_path.is_dir():
        raise DataError(
            f"{spec.name}: no LMUData folder. Looked at: {'; '.join(looked)}. {HOW_TO_SET_LMUDATA}"
        )
    tsv = root_path / spec.tsv
    if not tsv.is_file():
        raise DataError(
            f"{spec.name}: {tsv} does not exist (LMUData folder looked at: {'; '.join(looked)}). "
            f"{spec.name} needs VLMEvalKit's {spec.tsv} there. {HOW_TO_SET_LMUDATA}"
        )

    size = tsv.stat().st_size
    digest = file_md5(tsv)
    # VLMEvalKit: data_path.replace('.tsv', '_local.tsv')
    local_tsv = tsv.with_name(tsv.stem + "_local.tsv")
    localized = "no"
    read_from = tsv
    required = list(spec.required_columns)
    if size > LOCALIZE_THRESHOLD_BYTES:
        if local_tsv.is_file():
            localized, read_from = "local_tsv", local_tsv
            required = [c for c in required if c != "image"] + (
                [] if "image_path" in required else ["image_path"])
        else:
            localized = "emulated"

    frame = _read_tsv(read_from, spec, required)
    rows_in_file = len(frame)
    rows_without_image = 0
    if "image" in frame.columns:  # VLMEvalKit's skip_noimg
        keep = frame["image"].notna().to_numpy()
        rows_without_image = int((~keep).sum())
        frame = frame[keep].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"{read_from}: no data rows " + (
            f"with an image ({rows_without_image} without one)" if rows_without_image else "(a header only)"))
    index_text = _normalise_index(frame, read_from)
    if not pd.api.types.is_integer_dtype(frame["index"]):
        # VLMEvalKit would keep string indices, but the four benchmarks' files have integer
        # ones and their scorers need them: refused here, naming the file, before any model.
        bad = [p for p, text in enumerate(index_text) if not _INT_LIKE.fullmatch(text)]
        raise DataError(
            f"{read_from}: column 'index' holds {index_text[bad[0]]!r} in data row "
            f"{_data_row_numbers(bad[:1])}, not an integer ({len(bad)} such row(s)); "
            f"VLMEvalKit's {spec.name} file indexes rows by integers")
    owners = _resolve_references(frame, index_text, read_from) if "image" in frame.columns else {}
    if localized == "emulated":
        folder = root_path / "images" / Path(spec.tsv).stem
        frame["image_path"] = [str(folder / f"{owners.get(i, i)}.jpg") for i in frame["index"]]

    md5_matches = digest == spec.md5
    synthetic_entry = None if md5_matches else _synthetic_entry(root_path, spec)
    synthetic = synthetic_entry is not None and synthetic_entry.get("md5") == digest
    rows_match = None if spec.rows is None else rows_in_file == spec.rows
    record = Provenance(
        benchmark=spec.name, root=str(root_path), tsv=str(tsv), read_from=str(read_from),
        localized=localized, size_bytes=size, md5=digest, md5_expected=spec.md5,
        md5_matches=md5_matches, rows_in_file=rows_in_file, rows_expected=spec.rows,
        rows_match=rows_match, rows_without_image=rows_without_image, synthetic=synthetic,
        comparable=md5_matches, image_owner=_FrozenInfo(owners),
    )
    _check_identity(spec, tsv, digest, rows_in_file, md5_matches, rows_match, synthetic, strict)
    return BenchmarkData(frame, record)


def _check_identity(spec, tsv, digest, rows, md5_matches, rows_match, synthetic, strict) -> None:
    url = getattr(spec, "url", None)
    fetch = f" VLMEvalKit's file: {url}." if url else ""
    if md5_matches:
        if rows_match is False:
            # The file is VLMEvalKit's; the row count in benchmarks.toml is what is wrong.
            warnings.warn(
                f"{tsv} is VLMEvalKit's {spec.name} file (md5 {digest}) but has {rows} rows, "
                f"while benchmarks.toml says {spec.rows}: correct 'rows' there.",
                DataMismatchWarning, stacklevel=3,
            )
        return
    if synthetic:
        if strict:
            raise DataMismatchError(
                f"{tsv} is the synthetic mini {spec.name} (see {SYNTHETIC_MANIFEST}), not "
                f"VLMEvalKit's file (md5 {spec.md5}); strict checking refuses it: its scores are "
                "not comparable with the reference report."
            )
        return
    rows_note = "" if spec.rows is None else f", {rows} rows (VLMEvalKit's has {spec.rows})"
    message = (
        f"LMUDATA MISMATCH for {spec.name}: {tsv} is not VLMEvalKit's file: md5 {digest} "
        f"(VLMEvalKit's is {spec.md5}){rows_note}. Scores computed from this file are NOT "
        f"comparable with the reference report (VLMEvalKit itself would download the file "
        f"again).{fetch}"
    )
    if strict:
        raise DataMismatchError(message)
    warnings.warn(message + " --strict-data (lavender-checks run, pytest) turns this into an error.", DataMismatchWarning,
                  stacklevel=3)


def provenance(data: BenchmarkData | pd.DataFrame) -> dict:
    """What ``load_benchmark`` recorded about the file (JSON-ready), or {} for a bare frame.

    Keys: benchmark, root, tsv, read_from, localized ("no", "local_tsv", "emulated"),
    size_bytes, md5, md5_expected, md5_matches, rows_in_file, rows_expected, rows_match,
    rows_without_image, synthetic, comparable, subsets (list of the ``subset`` calls applied).
    """
    record = _parts(data)[1]
    return record.describe() if record is not None else {}


# ---------------------------------------------------------------------------------------------
# Images


def _source_name(record: Provenance | None) -> str:
    return record.read_from if record is not None else "benchmark frame"


def _index_value(index: Any) -> Any:
    """``index`` itself, or the ``index`` entry of a row (a dict or a pandas Series)."""
    if isinstance(index, (Mapping, pd.Series)):
        return index["index"]
    return index


def _position(frame: pd.DataFrame, index: Any, record: Provenance | None) -> int:
    hits = np.flatnonzero(frame["index"].to_numpy() == index)
    if len(hits) == 0:
        raise DataError(f"{_source_name(record)}: no row with index {index!r}")
    return int(hits[0])


def _cell(frame: pd.DataFrame, position: int, column: str) -> Any:
    return frame[column].to_numpy()[position]


DEFAULT_DUMP_SUFFIX = ".png"  # the reference revision's; run profiles may say ".jpg" (older ones)


def _dump_name(frame: pd.DataFrame, record: Provenance | None, position: int, index: Any,
               dump_suffix: str = DEFAULT_DUMP_SUFFIX) -> str:
    """VLMEvalKit's dump file name: the ``image_path`` cell when that column exists, else
    ``<index><dump_suffix>``. Its extension decides the format the image is saved in."""
    if "image_path" in frame.columns:
        name = _cell(frame, position, "image_path")
        if not isinstance(name, str) or not name:
            raise DataError(
                f"{_source_name(record)}: row with index {index}, column 'image_path': empty; "
                "VLMEvalKit saves the image under this name"
            )
        return name
    return f"{index}{dump_suffix}"


def _format_for(dump_name: str, source: str, index: Any) -> str:
    """The format PIL's ``save(path)`` picks from the file extension."""
    extension = os.path.splitext(dump_name)[1].lower()
    fmt = Image.registered_extensions().get(extension)
    if fmt is None:
        raise DataError(
            f"{source}: row with index {index}, column 'image_path': {dump_name!r} has no image "
            "extension PIL knows, so VLMEvalKit could not save the image under it"
        )
    return fmt


def _owner_of(frame: pd.DataFrame, record: Provenance | None, position: int, index: Any
              ) -> tuple[Any, str]:
    """(index of the row holding the base64, the base64) for the row at ``position``."""
    cell = _cell(frame, position, "image")
    if not isinstance(cell, str):
        if cell is None or (isinstance(cell, float) and math.isnan(cell)):
            raise DataError(f"{_source_name(record)}: row with index {index}, column 'image': empty")
        cell = str(cell)
    if len(cell) > REFERENCE_MAX_CHARS:
        return (record.image_owner.get(index, index) if record is not None else index), cell
    # A reference left in the frame (a frame not made by load_benchmark).
    index_text = [str(x) for x in frame["index"].to_numpy()]
    if cell not in index_text:
        raise DataError(
            f"{_source_name(record)}: row with index {index}, column 'image': holds {cell!r}, a "
            f"reference to index {cell!r}, and no row has that index"
        )
    target = index_text.index(cell)
    target_cell = _cell(frame, target, "image")
    if not isinstance(target_cell, str) or len(target_cell) <= REFERENCE_MAX_CHARS:
        raise DataError(
            f"{_source_name(record)}: row with index {index}, column 'image': refers to index "
            f"{cell}, whose image cell is not an image ({target_cell!r})"
        )
    return frame["index"].to_numpy()[target], target_cell


def _vlmeval_pixels(encoded: str, fmt: str) -> Image.Image:
    """VLMEvalKit's decode_base64_to_image_file + Image.open, in memory."""
    data = base64.b64decode(encoded)  # not validate=True: VLMEvalKit skips stray characters too
    image = Image.open(io.BytesIO(data))
    if image.mode in ("RGBA", "P", "LA"):
        image = image.convert("RGB")
    else:
        image.load()
    if fmt == "PNG" and image.mode in ("RGB", "L"):
        # PNG stores RGB and L losslessly: the save-and-reopen round trip would give these
        # very pixels (tested), and on a document scan it costs a large share of the time.
        return image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)  # what save(path) does for that extension: JPEG -> quality 75
    buffer.seek(0)
    reopened = Image.open(buffer)
    reopened.load()
    return reopened


def load_image(
    data: BenchmarkData | pd.DataFrame,
    index: Any,
    benchmark: str | Benchmark | BenchmarkSpec | None = None,
    root: str | os.PathLike | None = None,
    dump_suffix: str = DEFAULT_DUMP_SUFFIX,
) -> Image.Image:
    """The image VLMEvalKit gives the model for the row whose ``index`` is ``index``.

    ``dump_suffix``: the extension VLMEvalKit's revision dumps index-named images under
    (``.png`` at the reference revision, ``.jpg`` before it; the run profile says which).

    Base64 rows: decoded, mode-converted and round-tripped through VLMEvalKit's dump format
    (module docstring). Localized rows (``_local.tsv``, no ``image`` column): the file named by
    ``image_path``, opened as the model opens it; a relative path is taken under
    ``<root>/images/<image folder>`` (``root`` defaults to the one the frame was read from).
    A cell that does not decode raises ``DataError`` naming the file, the row and the column.

    ``index`` is the value of the row's ``index`` column (not its position in the frame), or
    the row itself (a dict or Series with an ``index`` entry). ``data``: ``load_benchmark``'s
    ``BenchmarkData`` (or a subset of it), or a bare frame (``BenchmarkData``).
    """
    frame, record = _parts(data)
    index = _index_value(index)
    position = _position(frame, index, record)
    source = _source_name(record)
    if "image" not in frame.columns:
        return _open_localized(frame, record, position, index, benchmark, root)
    owner, encoded = _owner_of(frame, record, position, index)
    dump_name = _dump_name(frame, record, position, index, dump_suffix)
    fmt = _format_for(dump_name, source, index)
    held_by = "" if owner == index else f" (the image of index {owner}, which it refers to)"
    try:
        return _vlmeval_pixels(encoded, fmt)
    except (ValueError, OSError, Image.DecompressionBombError) as exc:
        # binascii.Error is a ValueError; PIL's UnidentifiedImageError and truncation are OSErrors.
        if isinstance(exc, binascii.Error):
            reason = f"invalid base64 ({exc})"
        elif isinstance(exc, UnidentifiedImageError):
            reason = "the decoded bytes are no image PIL can open"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        raise DataError(
            f"{source}: row with index {index}, column 'image'{held_by}: cannot be decoded as "
            f"VLMEvalKit decodes it (base64 -> PIL -> {fmt} as {dump_name!r}): {reason}"
        ) from exc


def _open_localized(frame, record, position, index, benchmark, root) -> Image.Image:
    source = _source_name(record)
    if "image_path" not in frame.columns:
        raise DataError(f"{source}: neither an 'image' nor an 'image_path' column")
    cell = _cell(frame, position, "image_path")
    if not isinstance(cell, str) or not cell:
        raise DataError(f"{source}: row with index {index}, column 'image_path': empty")
    path = Path(cell)
    if not path.is_absolute():
        base = lmudata_root(root if root is not None else (record.root if record else None))
        folder = _spec_of(benchmark).image_folder if benchmark is not None else (
            _spec_of(record.benchmark).image_folder if record else "")
        path = base / "images" / folder / path
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{source}: row with index {index}, column 'image_path': cannot open {path}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return image


def image_key(data: BenchmarkData | pd.DataFrame, index: Any,
              dump_suffix: str = DEFAULT_DUMP_SUFFIX) -> str:
    """A stable identity of the pixels ``load_image`` gives for this row, within one benchmark.

    Rows that get identical pixels share the key: the index of the row that holds the base64
    plus the extension of the dump name, e.g. ``'12.png'`` for MMBench row 12 and its circular
    copies 1000012, 2000012, or ``'5.jpg'`` for both MME questions of the image ``existence/
    0001.jpg`` held by row 5. For a localized ``_local.tsv`` it is the ``image_path`` cell.
    ``data`` and ``index`` are as for ``load_image``.
    """
    frame, record = _parts(data)
    index = _index_value(index)
    position = _position(frame, index, record)
    if "image" not in frame.columns:
        return str(_cell(frame, position, "image_path"))
    owner, _ = _owner_of(frame, record, position, index)
    extension = os.path.splitext(_dump_name(frame, record, position, index, dump_suffix))[1].lower()
    return f"{owner}{extension}"


# ---------------------------------------------------------------------------------------------
# Resampling units, subsets and shards


def resampling_units(data: BenchmarkData | pd.DataFrame,
                     benchmark: str | Benchmark | BenchmarkSpec) -> pd.Series:
    """The resampling unit of every row (aligned with ``frame``), per ``spec.unit``:

    * ``question``: the row's own index;
    * ``circular_group`` (MMBench): ``index % 1_000_000``, a main row and its circular copies;
    * ``image_pair`` (MME): ``image_path``, both questions of an image.
    """
    frame, record = _parts(data)
    spec = _spec_of(benchmark)
    if spec.unit == "question":
        values = frame["index"].to_numpy()
    elif spec.unit == "circular_group":
        indices = frame["index"].to_numpy()
        if not np.issubdtype(indices.dtype, np.integer):
            raise DataError(f"{_source_name(record)}: circular groups need integer indices")
        values = indices % CIRCULAR_OFFSET
    elif spec.unit == "image_pair":
        values = frame["image_path"].to_numpy()
    else:
        raise DataError(f"{spec.name}: unknown resampling unit {spec.unit!r} in benchmarks.toml")
    return pd.Series(values, index=frame.index, name="unit")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _hash_rank(seed: int, unit: Any) -> bytes:
    # A hash, not a random generator: the same units and seed give the same choice on every
    # numpy and Python version.
    return hashlib.sha256(f"{seed}\x1f{unit}".encode()).digest()


def balanced_shards(sizes: Sequence[int], count: int) -> list[int]:
    """The shard of each block: blocks in order, each to the shard with the fewest rows so far
    (the lowest shard on a tie). Used by ``subset`` and by ``lavender-checks bench --shard``,
    so the benchmark splits its workload the way the gate splits a benchmark."""
    load = [0] * count
    owners = []
    for size in sizes:
        target = load.index(min(load))
        load[target] += size
        owners.append(target)
    return owners


def _image_blocks(data: BenchmarkData | pd.DataFrame, units: np.ndarray, chosen: list) -> list[list]:
    """``chosen`` units joined into blocks of units that share an image (through any chain of
    rows), blocks in the order of their first unit, units within a block in ``chosen`` order."""
    frame = _parts(data)[0]
    wanted = set(chosen)
    parent = {unit: unit for unit in chosen}

    def root(unit):
        while parent[unit] != unit:
            parent[unit] = parent[parent[unit]]
            unit = parent[unit]
        return unit

    if "image" in frame.columns or "image_path" in frame.columns:
        owner_of_image: dict[str, Any] = {}
        for index, unit in zip(frame["index"].to_numpy(), units):
            if unit not in wanted:
                continue
            key = image_key(data, index)
            other = owner_of_image.setdefault(key, unit)
            a, b = root(unit), root(other)
            if a != b:
                parent[b] = a
    blocks: dict[Any, list] = {}
    for unit in chosen:
        blocks.setdefault(root(unit), []).append(unit)
    return list(blocks.values())


def subset(
    data: BenchmarkData | pd.DataFrame,
    benchmark: str | Benchmark | BenchmarkSpec,
    *,
    limit: int | None = None,
    fraction: float | None = None,
    shard: tuple[int, int] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Part of a benchmark frame, always made of whole resampling units (``resampling_units``).

    * ``limit=N``: N units, drawn at random (a hash of (seed, unit), as for ``fraction``): a
      file's order is no random order (VLMEvalKit's files come sorted by source or subtask),
      and the gate reads a subset as a random sample of the benchmark. For a benchmark with a
      stratum column (ChartQA split, MMBench category, MME subtask) each stratum gives one unit
      in turn, and never fewer than one per stratum (N is raised, with a warning): then every
      per-stratum metric is computed, and MME, whose VLMEvalKit rating fails on a missing
      subtask, stays scoreable.
    * ``fraction=f``: in every stratum, round(f * units) units (at least one), picked by a hash
      of (seed, unit).
    * ``shard=(i, n)``: applied after the above. Units that share an image (the questions of
      one DocVQA page) form a block, so each image's vision features are computed by one
      process only; blocks in file order go each to the shard with the fewest rows so far
      (the lowest i on a tie). The n shards are disjoint, together give the whole (sub)set,
      and differ in rows by at most the largest block. A shard alone need not cover every
      stratum: score the union of the shards.

    Rows keep their file order. The same inputs give the same subset. ``data``: a
    ``BenchmarkData`` gives a ``BenchmarkData`` whose record lists this subset too (and keeps
    the image owners); a bare frame gives a bare frame.
    """
    frame, loaded = _parts(data)
    spec = _spec_of(benchmark)
    if limit is not None and fraction is not None:
        raise ValueError("give either limit or fraction, not both")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
    if shard is not None:
        if (not isinstance(shard, (tuple, list)) or len(shard) != 2
                or not all(_is_int(v) for v in shard) or not 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, not {shard!r}")
        shard = (int(shard[0]), int(shard[1]))
    if limit is not None:
        limit = int(limit)

    units = resampling_units(data, spec).to_numpy()
    order = list(pd.unique(units))  # units in order of first appearance
    if spec.stratum:
        first_row = {}
        strata_column = frame[spec.stratum].to_numpy()
        for pos, unit in enumerate(units):
            first_row.setdefault(unit, pos)
        strata: dict[Any, list] = {}
        for unit in order:
            stratum = strata_column[first_row[unit]]
            strata.setdefault("<missing>" if pd.isna(stratum) else stratum, []).append(unit)
    else:
        strata = {None: order}

    chosen = order
    if limit is not None:
        if spec.stratum:
            wanted = limit
            if limit < len(strata):
                wanted = len(strata)
                warnings.warn(
                    f"{spec.name}: limit {limit} raised to {wanted} units so that every "
                    f"{spec.stratum} is represented", UserWarning, stacklevel=2,
                )
            picked: list = []
            drawn = [sorted(members, key=lambda u: _hash_rank(seed, u)) for members in strata.values()]
            for turn in range(max(len(v) for v in drawn)):
                for members in drawn:
                    if turn < len(members) and len(picked) < wanted:
                        picked.append(members[turn])
            keep = set(picked)
        else:
            keep = set(sorted(order, key=lambda u: _hash_rank(seed, u))[:limit])
        chosen = [u for u in order if u in keep]
    elif fraction is not None:
        keep = set()
        for members in strata.values():
            count = max(1, math.floor(fraction * len(members) + 0.5))
            keep.update(sorted(members, key=lambda u: _hash_rank(seed, u))[:count])
        chosen = [u for u in order if u in keep]
    if shard is not None:
        i, n = shard
        rows_of = pd.Series(units).value_counts().to_dict()
        blocks = _image_blocks(data, units, chosen)
        owners = balanced_shards([sum(rows_of[unit] for unit in block) for block in blocks], n)
        keep_mine = {unit for block, owner in zip(blocks, owners) if owner == i for unit in block}
        chosen = [unit for unit in chosen if unit in keep_mine]

    keep_units = set(chosen)
    mask = np.fromiter((u in keep_units for u in units), dtype=bool, count=len(units))
    result = frame[mask].reset_index(drop=True)
    record = {"limit": limit, "fraction": fraction, "shard": shard,
              "seed": seed if fraction is not None or limit is not None else None, "units": len(chosen),
              "rows": int(mask.sum())}
    if isinstance(data, BenchmarkData):
        return BenchmarkData(result, loaded.with_subset(record) if loaded is not None else None)
    return result

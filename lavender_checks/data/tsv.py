"""Reading a benchmark TSV as VLMEvalKit's ``ImageBaseDataset`` does, and checking that it is
VLMEvalKit's file:

* the file: ``pandas.read_csv(sep='\\t')`` with pandas' default NA parsing, so an option whose
  text is exactly ``None`` (or ``NA``, ``null``, ...) becomes NaN; rows without an image are
  dropped (``skip_noimg``); ``index`` becomes int when every value is int-like;
* image cells: base64 (more than 64 characters), or a reference (at most 64) holding the
  ``index`` of the row whose image is reused;
* TSVs over 1 GiB are "localized": VLMEvalKit then reads ``<name>_local.tsv``, whose
  ``image_path`` points at JPEG re-encodes of every image (see ``load_benchmark``).

What VLMEvalKit does and this module deliberately does not: it never downloads. A file whose
md5 differs from VLMEvalKit's (VLMEvalKit would download it again) gives a loud
``DataMismatchWarning``, or a ``DataMismatchError`` with ``strict=True``.
"""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from lavender_checks.benchmarks import Benchmark, BenchmarkSpec
from lavender_checks.data.lmudata import HOW_TO_SET_LMUDATA, _folders_looked_at, lmudata_root
from lavender_checks.data.md5 import file_md5
from lavender_checks.data.records import (
    REFERENCE_MAX_CHARS,
    BenchmarkData,
    DataError,
    DataMismatchError,
    DataMismatchWarning,
    Provenance,
    _FrozenInfo,
    _parts,
    _spec_of,
)

LOCALIZE_THRESHOLD_BYTES = 2**30  # VLMEvalKit: file_size(path, 'GB') > 1
SYNTHETIC_MANIFEST = "synthetic.toml"  # written next to the mini TSVs by minidata.py

# Python int literals as VLMEvalKit's istype(x, int) accepts them (it evaluates the cell; this
# module does not evaluate data). Covers every form a TSV index takes: digits, sign, zeros.
_INT_LIKE = re.compile(r"\s*[+-]?(?:0+|[1-9]\d*)\s*")


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
    except UnicodeDecodeError as exc:
        # pandas reports the position within one of its read buffers: name the line instead.
        raise DataError(f"{path}: cannot read it as VLMEvalKit does (pandas.read_csv(sep='\\t')): "
                        f"{_undecodable(path) or exc}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
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
    _check_last_row_complete(path, frame)
    return frame


def _undecodable(path: Path) -> str | None:
    """Where the first byte that is not UTF-8 is: line, data row and column of the line."""
    try:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    row = "the header" if number == 1 else f"data row {number - 1}"
                    fields = line[:exc.start].count(b"\t")
                    return (f"line {number} ({row}, field {fields + 1}) holds byte "
                            f"0x{line[exc.start]:02x} (byte {exc.start + 1} of the line), which is "
                            "not UTF-8 (VLMEvalKit reads its TSVs as UTF-8)")
    except OSError:
        return None
    return None


def _check_last_row_complete(path: Path, frame: pd.DataFrame) -> None:
    """A file cut short (a download or copy that stopped) ends inside its last row: pandas
    reads the missing fields as empty cells, so the row would reach the model (or the scorer)
    with no question, or half an image. Found from the last line: no line end, and fewer
    fields than the header, the rest empty."""
    if frame.empty:
        return
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return
        fh.seek(end - 1)
        if fh.read(1) in (b"\n", b"\r"):
            return
        tail, position = b"", end
        while position > 0 and b"\n" not in tail:  # the last line, however long its image
            step = min(1 << 20, position)
            position -= step
            fh.seek(position)
            tail = fh.read(step) + tail
    last = tail.rsplit(b"\n", 1)[-1]
    fields = last.count(b"\t") + 1
    columns = len(frame.columns)
    if fields < columns and frame.iloc[-1, fields:].isna().all():
        raise DataError(
            f"{path}: the file ends inside data row {len(frame)}, which has {fields} of the header's "
            f"{columns} fields and no line end: the file was cut short (an interrupted download or "
            "copy?); fetch it again")


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


def _check_image_pairs(frame: pd.DataFrame, path: Path) -> None:
    """MME's rating takes the first two questions of every image (acc+) and each image belongs
    to one subtask: a file that breaks either fails VLMEvalKit's scorer, so it is refused here,
    before any model loads, rather than after both variants have generated."""
    from lavender_checks.benchmarks.mme import group_by_image

    def text(column: str) -> list[str]:
        return [v if isinstance(v, str) else str(v) for v in frame[column]]

    images = text("image_path")
    categories = text("category") if "category" in frame.columns else ["all"] * len(images)
    stats, shared = group_by_image(categories, images)
    if shared is not None:
        image, owner, other = shared
        raise DataError(
            f"{path}: column 'image_path' holds {image!r} in data rows {_data_row_numbers(stats[owner][image])} "
            f"under categories {owner!r}, {other!r}; each MME image belongs to one subtask")
    single = sorted(rows[0] for by_image in stats.values() for rows in by_image.values() if len(rows) < 2)
    if single:
        first = single[0]
        raise DataError(
            f"{path}: column 'image_path' holds {images[first]!r} in data row "
            f"{_data_row_numbers(single[:1])} (index {frame['index'].iloc[first]}) only once "
            f"({len(single)} such image(s)); MME scores two questions per image (acc+)")


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
    if spec.unit == "image_pair" and "image_path" in frame.columns:
        _check_image_pairs(frame, read_from)
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

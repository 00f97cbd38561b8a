"""The pixels VLMEvalKit gives the model for a row, and which rows share them:

* pixels: base64-decode, open with PIL, convert ``RGBA``/``P``/``LA`` to ``RGB`` (other modes
  are kept), then save under VLMEvalKit's dump name and open again. The dump name is the
  ``image_path`` cell when that column exists (MME: ``.jpg`` means a JPEG re-encode at PIL's
  default quality 75) and ``<index>.png`` otherwise (lossless).

What VLMEvalKit does and this module deliberately does not: it never reads or writes the image
dumps under ``$LMUData/images`` (VLMEvalKit reuses a dump that already opens, even a stale one;
here the pixels always come from the TSV).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from lavender_checks.benchmarks import Benchmark, BenchmarkSpec
from lavender_checks.data.lmudata import lmudata_root
from lavender_checks.data.records import (
    REFERENCE_MAX_CHARS,
    BenchmarkData,
    DataError,
    Provenance,
    _parts,
    _source_name,
    _spec_of,
)


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

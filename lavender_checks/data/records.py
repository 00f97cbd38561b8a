"""What reading a benchmark gives: the frame and its record (``BenchmarkData``, ``Provenance``),
the errors and warnings of reading it, and what the other modules of the package share
(the reference rule for image cells, a benchmark's spec, the name of the file a record was
read from)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pandas as pd

from lavender_checks.benchmarks import Benchmark, BenchmarkSpec, get_benchmark

REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an image cell of at most 64 characters is a reference


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


def _spec_of(benchmark: str | Benchmark | BenchmarkSpec) -> BenchmarkSpec:
    if isinstance(benchmark, BenchmarkSpec):
        return benchmark
    if isinstance(benchmark, Benchmark):
        return benchmark.spec
    return get_benchmark(str(benchmark)).spec


def _source_name(record: Provenance | None) -> str:
    return record.read_from if record is not None else "benchmark frame"

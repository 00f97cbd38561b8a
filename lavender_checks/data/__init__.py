"""LMUData: where VLMEvalKit's benchmark TSVs live, how they are read, and what pixels they hold.

This package reproduces VLMEvalKit's ``ImageBaseDataset`` (``vlmeval/dataset/image_base.py``)
on purpose, quirks included, so that the rows and pixels the model gets here are the ones
it gets under ``run.py``. One module per concept, each with the VLMEvalKit behaviour it
reproduces in its docstring:

* ``records``: what was read (``Provenance``, ``BenchmarkData``) and the errors;
* ``lmudata``: the folder;
* ``md5``: the md5 of a file, cached for large files;
* ``tsv``: reading a benchmark TSV and checking that it is VLMEvalKit's file;
* ``images``: the pixels of a row, and which rows share them;
* ``subsets``: resampling units, subsets and shards.

This module is the public API; the names starting with ``_`` stay in their modules.
"""

from lavender_checks.data.images import DEFAULT_DUMP_SUFFIX, image_key, load_image
from lavender_checks.data.lmudata import LMUDATA_ENV, lmudata_root
from lavender_checks.data.md5 import CACHE_ENV, file_md5, md5_cache_path
from lavender_checks.data.records import (
    BenchmarkData,
    DataError,
    DataMismatchError,
    DataMismatchWarning,
    Provenance,
)
from lavender_checks.data.subsets import balanced_shards, resampling_units, subset
from lavender_checks.data.tsv import load_benchmark, load_benchmark_frame, provenance

__all__ = [
    # records
    "BenchmarkData",
    "DataError",
    "DataMismatchError",
    "DataMismatchWarning",
    "Provenance",
    # the folder
    "LMUDATA_ENV",
    "lmudata_root",
    # md5
    "CACHE_ENV",
    "file_md5",
    "md5_cache_path",
    # reading a TSV
    "load_benchmark",
    "load_benchmark_frame",
    "provenance",
    # images
    "DEFAULT_DUMP_SUFFIX",
    "image_key",
    "load_image",
    # subsets
    "balanced_shards",
    "resampling_units",
    "subset",
]

"""Parts of a benchmark made of whole resampling units (a question, an MMBench circular group,
an MME image pair): random subsets and shards, a shard keeping the rows that share an image."""

from __future__ import annotations

import hashlib
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lavender_checks.benchmarks import Benchmark, BenchmarkSpec
from lavender_checks.data.images import image_key
from lavender_checks.data.records import BenchmarkData, DataError, _parts, _source_name, _spec_of

CIRCULAR_OFFSET = 1_000_000  # MMBench: circular copy k of main row i has index i + k * 1e6


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

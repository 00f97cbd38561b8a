"""Batch invariance for the fast engine: each row's greedy tokens a function of that row alone.

A row's floating-point results change with the rest of its batch when a kernel's reduction
order depends on the shape of the call: a BLAS library picks another tile or split-K for
another number of rows, a reduction (an RMS norm's mean) is split across threads when there
are few rows, an attention kernel splits its keys by batch size, a padded prompt shifts a
row's keys against the kernel's key blocks. The invariant mode does not hunt these kernel by
kernel; it only makes calls whose shapes depend on the row alone or on nothing:

* **vision**: one image per tower call. The tower always runs its four tile slots, so every
  call has the same shape, whatever else the run holds.
* **prefill**: calls of exactly ``prefill_rows`` rows, each row padded at its end to its own
  length rounded up to ``prefill_bucket`` and called only with rows of that padded length; a
  call short of rows is filled with copies of its first row, which compute but write nothing
  (``runner.ModelRunner.prefill_invariant``). Every shape is then a function of the row's own length;
  the causal mask keeps a row's padding after its last real token out of its results.
  ``prefill_rows=1`` is one unpadded row per call.
* **decode**: every step runs ``decode_rows`` rows (idle slots ride along) over the whole
  self-attention cache (no key-length buckets; with ``decode_key_block`` set, over whole key
  blocks, each combined in key order so that trailing masked blocks add exact zeros:
  ``mllama.attend_keys_blocked``), whose length is a whole number of
  ``min_cache_len`` units (``cache_length``): the same shapes for any slot count, row order,
  chunk or shard. The length is the row's own: a row needing more than ``min_cache_len``
  positions is decoded in a pass of the call with the rows of its own cache length
  (``by_cache_length``), never with the others. A row's slot (its row in the batch) is the
  only thing that still differs, and matrix products compute every row of a tile the same
  way unless a reduction is split across thread blocks, which the cuBLAS settings below
  turn off.
* **cuBLAS** (CUDA only): cuBLASLt, with reduced-precision and split-K reductions off for
  bf16/fp16 products (``allow_bf16_reduced_precision_reduction = (False, False)``).

What stays part of the numerics, and so of a snapshot: the weights, the dtype, the GPU model,
the software versions (``environment`` records them), and the cache length unit
``min_cache_len`` (with the row's own length it sets the row's cache length).

The cost of this against the throughput mode (batched prefill, vision four images at a time,
decode over the active slots and a key-length bucket) is measured by ``lavender-checks bench
--paths repro`` (docs/speed.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def cache_length(need: int, unit: int) -> int:
    """Self-attention positions of the invariant cache: ``need`` rounded up to whole units, so
    that every run whose rows fit one unit reads the same number of keys each step."""
    if unit < 1:
        raise ValueError(f"min_cache_len must be at least 1 in invariant mode, got {unit}")
    return max(unit, -(-need // unit) * unit)


def by_cache_length(rows: Sequence[T], need: Callable[[T], int], unit: int) -> list[tuple[int, list[T]]]:
    """``rows`` split by their own cache length (``cache_length(need(row), unit)``), shortest
    first, each part in the given order: the engine decodes each part with caches of that
    length, so a long row changes the shapes of no other row, in its call or after it."""
    parts: dict[int, list[T]] = {}
    for row in rows:
        parts.setdefault(cache_length(need(row), unit), []).append(row)
    return sorted(parts.items())


@contextlib.contextmanager
def blas_settings(device: Any, enabled: bool = True) -> Iterator[None]:
    """cuBLASLt with reduced-precision and split-K reductions off, for the duration of a call;
    the previous settings are restored after. A no-op off CUDA (CPU products do not split the
    reduction by the number of rows) or when ``enabled`` is false."""
    import torch

    if not enabled or getattr(device, "type", str(device)) != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = (torch.backends.cuda.preferred_blas_library(),
                matmul.allow_bf16_reduced_precision_reduction,
                matmul.allow_fp16_reduced_precision_reduction)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        # The (reduced precision, split-K) form needs the cuBLASLt backend (set just above).
        matmul.allow_bf16_reduced_precision_reduction = (False, False)
        matmul.allow_fp16_reduced_precision_reduction = (False, False)
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = previous[1]
        matmul.allow_fp16_reduced_precision_reduction = previous[2]
        torch.backends.cuda.preferred_blas_library(previous[0])


def cublas_version() -> str | None:
    """The cuBLAS(Lt) library this process loaded, as "major.minor.patch" (None if not found)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    for name in ("libcublasLt.so", "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)  # only a library torch already loaded
        except OSError:
            continue
        lib.cublasLtGetVersion.restype = ctypes.c_size_t
        v = int(lib.cublasLtGetVersion())  # major * 10000 + minor * 100 + patch
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return None


def environment(device: Any = None) -> dict[str, Any]:
    """What a bf16 result depends on besides the inputs: the GPU model and the software
    versions (recorded in run metadata so that a changed snapshot can be explained)."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "peft"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    on_cuda = torch.cuda.is_available() and (device is None or getattr(device, "type", str(device)).startswith("cuda"))
    if on_cuda:
        index = device if device is not None and getattr(device, "index", None) is not None else None
        out["gpu"] = torch.cuda.get_device_name(index)
        out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        out["cublas"] = cublas_version()
        out["cudnn"] = torch.backends.cudnn.version()
    else:
        out["gpu"] = None
    return out

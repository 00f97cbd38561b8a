"""The fast engine's knobs."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
# Rows a run hands the fast engine at a time: more than any benchmark here has, so each
# benchmark and variant is one call and its batch drains once. The engine reports rows as
# they finish and holds only the images it is preprocessing, so a large chunk costs neither
# resumability nor memory.
DEFAULT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class FastGenConfig:
    """Knobs of the fast engine. The defaults are the configuration measured on one H100
    (docs/speed.md, where the options without a measurement say so)."""

    max_slots: int = 128  # rows decoded together (the decode batch); cut to fit the memory budget
    admit_fraction: float = 0.125  # prefill waiting rows once this fraction of slots is free
    max_prefill_tokens: int = 4096  # padded prompt tokens per prefill call
    vision_batch: int = 4  # distinct images per vision-tower call
    cuda_graphs: bool = True  # capture the decode step (CUDA only)
    # The peak the caches are sized for (memory.py): what the process holds when they are sized
    # (the model) plus memory_share of the card's free memory then, at most memory_budget_gib
    # (None: no cap). 0.85 gives an 80 GB H100 with the bf16 pair ~70 GiB (the budget its runs
    # were measured with), an H200 ~121 GiB.
    memory_share: float = 0.85
    memory_budget_gib: float | None = None
    # kept free for vision and prefill activations (the vision of four distinct 4-tile
    # images at once needs more than 8 GiB; docs/speed.md)
    workspace_gib: float = 10.0
    prep_threads: int = 8  # CPU threads for image preprocessing and hashing
    min_bucket: int = 128  # smallest key-length bucket of the decode step
    min_cache_len: int = 1024  # self-attention cache positions allocated at least (regrowing recaptures graphs)
    # key-length buckets: "linear" (128, 256, 384, ...) or "double" (128, 256, 512, ...)
    bucket_growth: str = "linear"
    # "split" (mllama.split_vision_attention: no bias tensor, so a flash kernel can run) or
    # "transformers" (its masked attention); docs/speed.md compares them
    vision_attention: str = "split"
    phase_timing: bool = False  # synchronise at phase ends so that phase times are exact
    # Batch invariance (invariant.py): a row's tokens depend on that row alone, not on the rows
    # run with it. False: the throughput mode (prefill of the admitted rows together,
    # vision_batch images a call, decode over the slots in use and key-length buckets), whose
    # bf16 tokens depend on the batch. decode_rows, prefill_rows, prefill_bucket and
    # min_cache_len set the shapes every row is computed with: part of the numerics, like the dtype.
    invariant: bool = True
    decode_rows: int = 128  # invariant mode: rows of every decode step (max_slots is capped at it)
    # invariant mode: prefill calls of exactly prefill_rows rows (the last one filled with copies
    # that write nothing), each row padded to its own length rounded up to prefill_bucket;
    # prefill_rows=1: one unpadded row per call
    prefill_rows: int = 8
    prefill_bucket: int = 64
    # invariant mode: decode attention over blocks of this many keys (mllama.attend_keys_blocked),
    # whose result for a row does not depend on the keys after its own, so decode reads key-length
    # buckets of whole blocks instead of the whole cache; None: the whole cache each step
    # (attend_keys). Off until measured on a GPU (docs/speed.md). Must divide min_cache_len.
    decode_key_block: int | None = None
    invariant_blas: bool = True  # invariant mode on CUDA: cuBLASLt with split-K reductions off
    # invariant mode: one image per vision call needs about a quarter of the vision activations
    # that workspace_gib is sized for (four 4-tile images at once)
    invariant_workspace_gib: float = 6.0

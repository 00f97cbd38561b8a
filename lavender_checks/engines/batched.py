"""Batched greedy generation of one variant (base or Lavender), with VLMEvalKit's outputs.

``generate(pair, requests, variant)`` returns, for each request, the string VLMEvalKit's
``llama_vision`` would have stored had it run that request alone (``BatchedEngine``, the
registered engine ``"generate"``, runs it batch by batch for a run):

* the processor is called as VLMEvalKit calls it: ``processor(images, text)`` without
  ``add_special_tokens=False``. The chat-templated text already starts with
  ``<|begin_of_text|>`` and the tokenizer adds another: the double BOS is deliberate;
* greedy decoding (``do_sample=False``), whatever sampling defaults the checkpoint's
  ``generation_config.json`` holds; its other settings (EOS ids, ...) apply as they would in
  VLMEvalKit's ``model.generate``;
* the new tokens are decoded as VLMEvalKit decodes them (``request.decode_output``: cut
  after the first EOS, ``<|eot_id|>`` removed, no strip).

Batching: requests are grouped by ``max_new_tokens`` (and by whether they carry images,
which the processor cannot mix), sorted longest prompt first (less padding, and an
out-of-memory error shows up on the first batch), left-padded with
``<|finetune_right_pad_id|>``, one image list per sample. On CUDA out-of-memory a batch is
split in halves and retried, down to single samples; no sample is ever dropped or stored
as an error string.

peft's mixed-adapter batches (``generate(..., adapter_names=["__base__", "default", ...])``)
are not used: Mllama flattens the vision states to ``batch * tiles`` rows before the
cross-attention ``k_proj``/``v_proj``, so peft's per-row adapter assignment does not line up
with the batch and it raises ("Length of `adapter_names` should be the same as the number
of inputs, but got 2 and 8"); after that error peft 0.21 even leaves its hooks registered
(no try/finally in ``LoraModel._enable_peft_forward_hooks``), breaking later calls. Each
batch runs one variant; the base variant runs inside ``disable_adapter()``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lavender_checks.engines import GENERATE_ENGINE
from lavender_checks.engines.request import (
    GenerationRequest,
    GreedySettings,
    OnFinish,
    check_requests,
    decode_output,
    opened,
    pair_greedy_settings,
)

if TYPE_CHECKING:
    from lavender_checks.model import ModelPair


class GenerationOOMError(RuntimeError):
    """A single sample does not fit in GPU memory (batches are split down to one sample first)."""


def generate(
    pair: "ModelPair",
    requests: Sequence[GenerationRequest],
    variant: str,
    *,
    batch_size: int = 8,
    on_batch: OnFinish | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Greedy predictions ``{key: prediction}`` (in request order) for one variant.

    variant: "base" (the adapter disabled, or the plain model) or "lavender" (needs an
    adapter). on_batch: called with ``[(key, prediction), ...]`` after every finished batch,
    so the caller can persist results as they come.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_requests(requests)
    results: dict[str, str] = {}
    if not requests:
        return results
    settings = pair_greedy_settings(pair)
    with pair.variant(variant) as model, torch.inference_mode():
        bar = tqdm(total=len(requests), desc=f"generate {variant}", unit="sample", disable=not progress)
        try:
            for group in _groups(pair, requests):
                for finished in _batches(model, pair, settings, group, batch_size):
                    results.update(finished)
                    if on_batch is not None:
                        on_batch(finished)
                    bar.update(len(finished))
        finally:
            bar.close()
    return {request.key: results[request.key] for request in requests}


def _groups(pair: "ModelPair", requests: Sequence[GenerationRequest]) -> list[list[GenerationRequest]]:
    """Requests grouped by (max_new_tokens, has images), each group longest prompt first."""
    tokenizer = pair.processor.tokenizer
    lengths = [len(ids) for ids in tokenizer([r.text for r in requests])["input_ids"]]
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for position, request in enumerate(requests):
        groups[(request.max_new_tokens, bool(request.images))].append(position)
    # Ties keep request order, so the batches do not depend on how keys sort.
    return [
        [requests[p] for p in sorted(groups[group_key], key=lambda p: (-lengths[p], p))]
        for group_key in sorted(groups)
    ]


def _batches(model, pair, settings, group, batch_size) -> Iterator[list[tuple[str, str]]]:
    """Run a group batch by batch; after an out-of-memory split, later batches use the size that fitted."""
    start = 0
    limit = batch_size
    while start < len(group):
        batch = group[start : start + limit]
        for finished in _split_on_oom(model, pair, settings, batch):
            limit = min(limit, len(finished))  # shrinks only after a split (or at the tail)
            yield finished
        start += len(batch)


def _split_on_oom(model, pair, settings, batch) -> Iterator[list[tuple[str, str]]]:
    import torch

    try:
        predictions = _run_batch(model, pair, settings, batch)
    except torch.cuda.OutOfMemoryError as exc:
        _release_cuda_memory()
        if len(batch) == 1:
            request = batch[0]
            raise GenerationOOMError(
                f"out of GPU memory on a single sample ({request.key!r}, {len(request.images)} image(s), "
                f"max_new_tokens={request.max_new_tokens}); free GPU memory or use a larger GPU"
            ) from exc
        half = len(batch) // 2
        yield from _split_on_oom(model, pair, settings, batch[:half])
        yield from _split_on_oom(model, pair, settings, batch[half:])
        return
    yield list(zip([r.key for r in batch], predictions))


def _release_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_batch(model, pair, settings: GreedySettings, batch: Sequence[GenerationRequest]) -> list[str]:
    """Generate one batch (one variant, one max_new_tokens) and post-process each row."""
    processor = pair.processor
    texts = [r.text for r in batch]
    images = [list(r.images) for r in batch] if batch[0].images else None
    # Deliberately no add_special_tokens=False: VLMEvalKit's call, hence its double BOS.
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(pair.device)
    config = copy.deepcopy(settings.generation_config)
    config.max_new_tokens = batch[0].max_new_tokens
    output = model.generate(**inputs, generation_config=config)
    new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
    return [decode_output(processor, row, settings.eos_ids, r.clean_up_spaces) for r, row in zip(batch, new_tokens)]


class BatchedEngine:
    """The engine ``"generate"``: ``generate`` over batches of ``batch_size`` rows.

    A run hands it its rows in frame order, ``batch_size`` at a time (``plan``), so a resumed
    run batches the remaining rows exactly as an uninterrupted run would have (batched greedy
    decoding can depend on which rows share a batch). Image loaders are opened
    ``batch_size`` requests at a time, in request order, so a long call never holds all its
    images at once.
    """

    name = GENERATE_ENGINE
    batch_invariant = False  # padding and batch composition reach a row's bf16 sums

    def __init__(self, pair: "ModelPair", *, batch_size: int = 8, progress: bool = False, **_: Any):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.pair = pair
        self.batch_size = batch_size
        self.progress = progress

    def plan(self, keys: Sequence[Any], image_key_of: Callable[[Any], str]) -> list[list[Any]]:
        keys = list(keys)
        return [keys[start:start + self.batch_size] for start in range(0, len(keys), self.batch_size)]

    def generate(self, requests: Sequence[GenerationRequest], variant: str,
                 on_finish: OnFinish | None = None) -> dict[Any, str]:
        options = dict(batch_size=self.batch_size, on_batch=on_finish, progress=self.progress)
        if not any(callable(image) for request in requests for image in request.images):
            return generate(self.pair, requests, variant, **options)
        check_requests(requests)
        results: dict[Any, str] = {}
        for start in range(0, len(requests), self.batch_size):
            batch = [opened(r) for r in requests[start:start + self.batch_size]]
            results.update(generate(self.pair, batch, variant, **options))
        return {request.key: results[request.key] for request in requests}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

"""Batched greedy generation of one variant (base or Lavender), with VLMEvalKit's outputs.

``generate(pair, requests, variant)`` (also reachable as ``ModelPair.generate``) returns, for
each request, the string VLMEvalKit's ``llama_vision`` would have stored had it run that
request alone:

* the processor is called as VLMEvalKit calls it: ``processor(images, text)`` without
  ``add_special_tokens=False``. The chat-templated text already starts with
  ``<|begin_of_text|>`` and the tokenizer adds another: the double BOS is deliberate;
* greedy decoding (``do_sample=False``), whatever sampling defaults the checkpoint's
  ``generation_config.json`` holds; its other settings (EOS ids, ...) apply as they would in
  VLMEvalKit's ``model.generate``;
* the output is cut after its first EOS token (any id of the generation config's
  ``eos_token_id``, that token kept): a single-sample ``generate`` stops there, while in a
  batch the row goes on with padding until every row is done. Nothing else is removed:
  tokens before the first EOS are exactly those a single-sample run generates, a generated
  ``<|finetune_right_pad_id|>`` included;
* decoded with the processor's defaults (``skip_special_tokens=False``), then only
  ``<|eot_id|>`` is removed, with no strip (VLMEvalKit's post-processing, deliberately).

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lavender_checks.model import ModelPair

EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
# Sampling-only settings and their "off" values. Greedy decoding ignores them anyway, but
# transformers warns on every call when a checkpoint sets them (Llama 3.2 sets 0.6 / 0.9),
# and None would fall back to the checkpoint's values.
_NEUTRAL_SAMPLING = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: ``text`` is the already chat-templated string, ``images`` its PIL images
    (or zero-argument loaders of them, for the fast engine).

    ``image_key``: optional identity of the image's pixels (``data.image_key``). Requests with
    the same key get identical pixels, so the fast engine groups them by it without opening
    and hashing every row's image; without it the engine hashes the pixels itself.
    """

    key: str
    text: str
    images: list = field(default_factory=list)
    max_new_tokens: int = 512
    image_key: str | None = None


class GenerationOOMError(RuntimeError):
    """A single sample does not fit in GPU memory (batches are split down to one sample first)."""


OnBatch = Callable[[list[tuple[str, str]]], None]


def generate(
    pair: "ModelPair",
    requests: Sequence[GenerationRequest],
    variant: str,
    *,
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
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
    _validate(requests)
    results: dict[str, str] = {}
    if not requests:
        return results
    settings = _greedy_settings(pair)
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


def _validate(requests: Sequence[GenerationRequest]) -> None:
    seen: set[str] = set()
    duplicates = []
    for request in requests:
        if request.key in seen:
            duplicates.append(request.key)
        seen.add(request.key)
        if request.max_new_tokens < 1:
            raise ValueError(f"request {request.key!r}: max_new_tokens must be at least 1, got {request.max_new_tokens}")
    if duplicates:
        raise ValueError(f"duplicate request keys: {duplicates[:5]}")


@dataclass(frozen=True)
class _Settings:
    generation_config: Any
    eos_ids: frozenset[int]


def _greedy_settings(pair: "ModelPair") -> _Settings:
    tokenizer = pair.processor.tokenizer
    config = copy.deepcopy(pair.base_model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    for name, value in _NEUTRAL_SAMPLING.items():
        if getattr(config, name, None) is not None:
            setattr(config, name, value)
    config.pad_token_id = tokenizer.pad_token_id
    eos = config.eos_token_id
    if eos is None:
        eos = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        config.eos_token_id = eos
    eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
    return _Settings(config, eos_ids)


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


def _run_batch(model, pair, settings: _Settings, batch: Sequence[GenerationRequest]) -> list[str]:
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
    return [postprocess(processor, row, settings.eos_ids) for row in new_tokens]


def cut_after_first_eos(token_ids: Sequence[int], eos_ids) -> list[int]:
    """The tokens a single-sample generate would have returned: up to and with the first EOS."""
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return list(token_ids[: i + 1])
    return list(token_ids)


def postprocess(processor, token_ids: Sequence[int], eos_ids) -> str:
    """VLMEvalKit's ``processor.decode(new_tokens).replace('<|eot_id|>', '')`` of one row."""
    return processor.decode(cut_after_first_eos(token_ids, eos_ids)).replace(EOT_TOKEN, "")

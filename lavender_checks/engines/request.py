"""What every engine takes and gives back: requests, the greedy generation config, and
VLMEvalKit's decoding of the generated tokens (written here once, used by every engine).

VLMEvalKit's ``llama_vision`` stores ``processor.decode(new_tokens).replace('<|eot_id|>', '')``
of a single-sample ``generate``. An engine that decodes rows together reproduces it by:

* cutting a row after its first EOS token (any id of the generation config's
  ``eos_token_id``, that token kept): a single-sample ``generate`` stops there, while a batch
  goes on with padding until every row is done. Nothing else is removed: tokens before the
  first EOS are exactly those a single-sample run generates, a generated
  ``<|finetune_right_pad_id|>`` included;
* decoding with the processor's defaults (``skip_special_tokens=False``) and removing only
  ``<|eot_id|>``, with no strip (deliberately);
* applying transformers 4.x's decode clean-up when the run profile asks for it
  (``GenerationRequest.clean_up_spaces``).

No torch here: the run (``run.predict``) imports it to build requests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

EOT_TOKEN = "<|eot_id|>"

# Sampling-only settings and their "off" values. Greedy decoding ignores them anyway, but
# transformers warns on every call when a checkpoint sets them (Llama 3.2 sets 0.6 / 0.9),
# and None would fall back to the checkpoint's values.
NEUTRAL_SAMPLING = {
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
    or zero-argument loaders of them (an engine opens a loader when it needs the pixels, so
    a whole benchmark's images are never in memory at once).

    ``image_key``: optional identity of the image's pixels (``data.image_key``). Requests with
    the same key get identical pixels, so the fast engine groups them by it without opening
    and hashing every row's image; without it the engine hashes the pixels itself.
    ``clean_up_spaces``: apply transformers 4.x's decode clean-up to the output (the run
    profile's ``clean_up_tokenization_spaces``).
    """

    key: Any
    text: str
    images: list = field(default_factory=list)
    max_new_tokens: int = 512
    image_key: str | None = None
    clean_up_spaces: bool = False


# Called with [(key, prediction), ...] as rows finish, so the caller can store them at once.
OnFinish = Callable[[list[tuple[Any, str]]], None]


def check_requests(requests: Sequence[GenerationRequest]) -> None:
    """Every key once, every token budget at least 1."""
    seen: set = set()
    duplicates = []
    for request in requests:
        if request.key in seen:
            duplicates.append(request.key)
        seen.add(request.key)
        if int(request.max_new_tokens) < 1:
            raise ValueError(f"request {request.key!r}: max_new_tokens must be at least 1, got {request.max_new_tokens}")
    if duplicates:
        raise ValueError(f"duplicate request keys: {duplicates[:5]}")


def opened(request: GenerationRequest) -> GenerationRequest:
    """The request with its image loaders called."""
    if not any(callable(image) for image in request.images):
        return request
    images = [image() if callable(image) else image for image in request.images]
    return replace(request, images=images)


# ---------------------------------------------------------------------------------------
# Greedy settings


@dataclass(frozen=True)
class GreedySettings:
    """The generation config a greedy single-sample ``generate`` gets, and its EOS ids."""

    generation_config: Any
    eos_ids: frozenset[int]


def greedy_settings(generation_config: Any, tokenizer: Any) -> GreedySettings:
    """The checkpoint's generation config switched to greedy decoding: ``do_sample=False``,
    whatever sampling defaults it holds; its other settings (EOS ids, ...) apply as they
    would in VLMEvalKit's ``model.generate``."""
    config = copy.deepcopy(generation_config)
    config.do_sample = False
    config.num_beams = 1
    for name, value in NEUTRAL_SAMPLING.items():
        if getattr(config, name, None) is not None:
            setattr(config, name, value)
    config.pad_token_id = tokenizer.pad_token_id
    eos = config.eos_token_id
    if eos is None:
        eos = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        config.eos_token_id = eos
    eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
    return GreedySettings(config, eos_ids)


def pair_greedy_settings(pair: Any) -> GreedySettings:
    """``greedy_settings`` of a ``ModelPair``'s base model and tokenizer."""
    return greedy_settings(pair.base_model.generation_config, pair.processor.tokenizer)


# ---------------------------------------------------------------------------------------
# VLMEvalKit's output decoding


def cut_after_first_eos(token_ids: Sequence[int], eos_ids) -> list[int]:
    """The tokens a single-sample generate would have returned: up to and with the first EOS."""
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return list(token_ids[: i + 1])
    return list(token_ids)


def decode_output(processor: Any, token_ids: Sequence[int], eos_ids, clean_up_spaces: bool = False) -> str:
    """VLMEvalKit's ``processor.decode(new_tokens).replace('<|eot_id|>', '')`` of one row, then
    the profile's clean-up when asked for (the module docstring)."""
    text = processor.decode(cut_after_first_eos(token_ids, eos_ids)).replace(EOT_TOKEN, "")
    return clean_up_tokenization(text) if clean_up_spaces else text


# transformers 4.x's PreTrainedTokenizerBase.clean_up_tokenization, in its order.
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers 4.x's decode clean-up, applied when the profile asks for it.

    Deliberate: Llama 3.2's tokenizer config sets ``clean_up_tokenization_spaces=true``;
    transformers 4.x honoured it on decode, 5.x ignores it for BPE tokenizers. Applying it
    after ``<|eot_id|>`` removal gives the same string, since the clean-up never spans the
    special token at the end of a row.
    """
    for old, new in _CLEAN_UP_REPLACEMENTS:
        text = text.replace(old, new)
    return text

"""Fast greedy generation for Mllama (with or without a LoRA adapter), for whole benchmarks.

Same inputs and outputs as the suite's batched ``generate`` (``GenerationRequest`` in,
``{key: prediction}`` out, ``on_batch`` called as rows finish), and the same greedy tokens as
plain ``model.generate`` one sample at a time, but organised for throughput:

* **Vision once per image.** Rows are grouped by image content (MMBench asks each question in
  up to four rotations of one image, DocVQA about four questions per page, MME two). The
  vision tower, the projector and every cross-attention layer's keys and values run once per
  distinct image and variant; the rows of that image copy the keys and values.
* **Finished rows leave the batch.** Decoding runs over a fixed number of slots; a row that
  reaches EOS or its token budget frees its slot, and waiting rows are prefilled into free
  slots (continuous batching) instead of riding along to the longest row of a batch.
* **One launch per decode step.** The decode step (all 40 layers, LoRA included) is captured
  as a CUDA graph per variant and per key-length bucket, over a static self-attention cache
  and a static cross-attention cache that this module owns (transformers' static cache does
  not fit Mllama's cross-attention in 5.17). Attention reads only the bucket's prefix of the
  cache, so short rows do not pay for the longest possible row.
* **CPU work overlaps the GPU.** Image loading, hashing and preprocessing run on a thread
  pool ahead of the GPU loop. A request's image may be a zero-argument callable that returns
  the PIL image; it is called on that pool, and only the image being preprocessed is held
  in memory, so one call can take a whole benchmark. A request with an ``image_key`` is
  grouped by it (the runner passes ``data.image_key``); one without is opened and hashed
  up front to find the rows that share an image.

The text decoder's forward is written out here over the model's own modules (its norms,
projections with their LoRA wrappers, rotary embedding and MLPs), so the adapter is applied
exactly as peft applies it and the vision tower is transformers' own. Mllama's quirks are kept
deliberately: tokens before ``<|image|>`` attend uniformly to every vision token, padded tiles
included, and their cross-attention MLP output is zeroed (``_prepare_cross_attention_mask``);
the vision tower always runs all four tile slots.

Without CUDA the same code runs eagerly (no graphs); the tests compare its tokens with plain
``generate`` on the tiny model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

BASE_VARIANT = "base"
GIB = 1 << 30


@dataclass(frozen=True)
class FastGenConfig:
    """Knobs of the fast path. The defaults are the configuration measured on one H100
    (docs/speed.md); the options without a measurement say so there."""

    max_slots: int = 128  # rows decoded together (the decode batch); cut to fit memory_budget_gib
    admit_fraction: float = 0.125  # prefill waiting rows once this fraction of slots is free
    max_prefill_tokens: int = 4096  # padded prompt tokens per prefill call
    vision_batch: int = 4  # distinct images per vision-tower call
    cuda_graphs: bool = True  # capture the decode step (CUDA only)
    memory_budget_gib: float | None = 70.0  # slots are cut so that the caches fit this peak
    # kept free for vision and prefill activations: 8 GiB let an H100 run peak 0.24 GiB over
    # the 70 GiB budget (vision of four distinct 4-tile images at once), hence 10
    workspace_gib: float = 10.0
    prep_threads: int = 8  # CPU threads for image preprocessing and hashing
    min_bucket: int = 128  # smallest key-length bucket of the decode step
    min_cache_len: int = 1024  # self-attention cache positions allocated at least (regrowing recaptures graphs)
    # key-length buckets: "linear" (128, 256, 384, ...) or "double" (128, 256, 512, ...)
    bucket_growth: str = "linear"
    # "split" (split_vision_attention: flash-capable, 68-74 ms an image for base on an H100,
    # run 6) or "transformers" (its masked attention, which rules out flash: 80 ms, run 2)
    vision_attention: str = "split"
    phase_timing: bool = False  # synchronise at phase ends so that phase times are exact


@dataclass
class FastGenStats:
    """What one ``generate`` call did; the benchmark reports these."""

    rows: int = 0
    new_tokens: int = 0
    images: int = 0  # distinct images run through the vision tower
    rows_sharing_image: int = 0  # rows that reused another row's image features
    decode_steps: int = 0
    drain_steps: int = 0  # decode steps after the last row was admitted (the batch only empties)
    drain_rows: int = 0  # rows in the batch when the drain began
    slot_steps: int = 0  # sum over decode steps of the rows in the batch
    slots: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0  # padded
    graph_captures: int = 0
    graphs: str = "off"
    # "drain" is the part of "decode" spent in drain steps: once per call, whatever its size
    seconds: dict[str, float] = field(default_factory=lambda: {
        "total": 0.0, "prep_wait": 0.0, "vision": 0.0, "prefill": 0.0, "decode": 0.0, "drain": 0.0,
        "capture": 0.0})

    def add(self, other: "FastGenStats") -> None:
        for name in ("rows", "new_tokens", "images", "rows_sharing_image", "decode_steps", "drain_steps", "drain_rows",
                     "slot_steps", "prefill_calls", "prefill_tokens", "graph_captures"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.slots = max(self.slots, other.slots)
        self.graphs = other.graphs
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v

    @property
    def occupancy(self) -> float | None:
        """Mean fraction of the slots that held a row during decode steps."""
        if not self.decode_steps or not self.slots:
            return None
        return self.slot_steps / (self.decode_steps * self.slots)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "new_tokens": self.new_tokens, "images": self.images,
            "rows_sharing_image": self.rows_sharing_image, "decode_steps": self.decode_steps,
            "drain_steps": self.drain_steps, "drain_rows": self.drain_rows,
            "slots": self.slots, "occupancy": self.occupancy, "prefill_calls": self.prefill_calls,
            "prefill_tokens": self.prefill_tokens, "graph_captures": self.graph_captures,
            "graphs": self.graphs, "seconds": dict(self.seconds),
        }


# ---------------------------------------------------------------------------------------
# CPU side: requests -> token ids and image tensors


@dataclass
class _Row:
    position: int  # in the request list
    key: Any
    ids: list[int]
    image_pos: int  # index of <|image|> in ids: tokens from here on see the image
    image: str  # the image's group: "key:" + the request's image_key, or a digest of its pixels
    max_new: int


@dataclass
class _Image:
    pixel_values: Any  # (1, 1, max_tiles, C, H, W) float32
    aspect_ratio_ids: Any  # (1, 1)
    aspect_ratio_mask: Any  # (1, 1, max_tiles)
    num_tiles: int


def image_digest(image: Any) -> str:
    """Identity of an image's pixels: rows whose images have the same digest share features."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encode_text(processor: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids exactly as ``processor(images=..., text=[text])`` makes them (no padding).

    The processor refuses a prompt with ``<|image|>`` but no image, so this repeats its text
    path: ``build_string_from_input`` (a BOS in front unless the text holds one), then the
    tokenizer. The tests check the ids against the processor's own.
    """
    from transformers.models.mllama.processing_mllama import build_string_from_input

    text = build_string_from_input(text, processor.tokenizer.bos_token, processor.image_token)
    return list(processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_image(processor: Any, image: Any) -> _Image:
    """The processor's image tensors for one image (tiles padded to the maximum)."""
    out = processor.image_processor(images=[[image]], return_tensors="pt")
    num_tiles = out["num_tiles"]
    return _Image(
        pixel_values=out["pixel_values"],
        aspect_ratio_ids=out["aspect_ratio_ids"],
        aspect_ratio_mask=out["aspect_ratio_mask"],
        num_tiles=int(num_tiles[0][0]),
    )


def _load_and_encode(processor: Any, image: Any) -> _Image:
    """``encode_image`` of an image or of what a zero-argument loader returns."""
    return encode_image(processor, image() if callable(image) else image)


def _request_parts(request: Any) -> tuple[Any, str, Any, int, str | None]:
    images = list(request.images)
    if len(images) != 1:
        raise ValueError(f"request {request.key!r}: the fast path takes exactly one image per request, "
                         f"got {len(images)}")
    if int(request.max_new_tokens) < 1:
        raise ValueError(f"request {request.key!r}: max_new_tokens must be at least 1, "
                         f"got {request.max_new_tokens}")
    image_key = getattr(request, "image_key", None)
    return request.key, request.text, images[0], int(request.max_new_tokens), image_key


# ---------------------------------------------------------------------------------------
# Greedy logits rules: the part of transformers' logits processing that greedy generate applies


class UnsupportedGenerationSetting(ValueError):
    """The generation config asks for logits processing the fast path does not reproduce."""


# GenerationConfig fields whose non-neutral values add a logits processor that changes greedy
# choices. The fast path reproduces min_length, min_new_tokens and
# exponential_decay_length_penalty; any other one active means: use plain generate.
_UNSUPPORTED_FIELDS = (
    "guidance_scale", "sequence_bias", "encoder_no_repeat_ngram_size", "repetition_penalty",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "force_words_ids",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "suppress_tokens",
    "begin_suppress_tokens", "watermarking_config", "renormalize_logits", "forced_decoder_ids",
)


@dataclass(frozen=True)
class GreedyRules:
    """EOS ids and the length rules of greedy ``generate``, applied per row with the row's own
    prompt length (one-sample semantics)."""

    eos_ids: tuple[int, ...] = ()
    min_length: int = 0  # prompt + new tokens below this: EOS impossible
    min_new_tokens: int = 0  # new tokens below this: EOS impossible
    decay_start: int | None = None  # exponential_decay_length_penalty = (start, factor)
    decay_factor: float = 1.0

    @classmethod
    def from_generation_config(cls, config: Any) -> "GreedyRules":
        from transformers import GenerationConfig

        neutral = GenerationConfig()
        if getattr(config, "do_sample", False):
            raise UnsupportedGenerationSetting("the fast path decodes greedily; do_sample=True was asked")
        if (getattr(config, "num_beams", 1) or 1) > 1:
            raise UnsupportedGenerationSetting(f"the fast path does not do beam search (num_beams={config.num_beams})")
        active = [name for name in _UNSUPPORTED_FIELDS
                  if hasattr(config, name) and getattr(config, name) != getattr(neutral, name, None)]
        if active:
            raise UnsupportedGenerationSetting(
                "the generation config sets logits processing the fast path does not reproduce: "
                + ", ".join(f"{name}={getattr(config, name)!r}" for name in active))
        eos = getattr(config, "eos_token_id", None)
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(int(e) for e in eos))
        decay = getattr(config, "exponential_decay_length_penalty", None)
        return cls(
            eos_ids=eos,
            min_length=int(getattr(config, "min_length", 0) or 0) if eos else 0,
            min_new_tokens=int(getattr(config, "min_new_tokens", 0) or 0) if eos else 0,
            decay_start=int(decay[0]) if decay is not None and eos else None,
            decay_factor=float(decay[1]) if decay is not None and eos else 1.0,
        )

    @property
    def suppresses(self) -> bool:
        return self.min_length > 0 or self.min_new_tokens > 0

    @property
    def decays(self) -> bool:
        return self.decay_start is not None

    def suppress_eos(self, prompt_len: int, generated: int) -> bool:
        """MinLength/MinNewTokens: is EOS forbidden for the token after ``generated`` new ones?"""
        return prompt_len + generated < self.min_length or generated < self.min_new_tokens

    def decay_multiplier(self, generated: int) -> float:
        """ExponentialDecayLengthPenalty: EOS scores gain ``|score| * multiplier``.

        transformers applies it when ``cur_len > start + prompt_len`` with ``cur_len = prompt_len
        + generated``, i.e. when ``generated > start``, with exponent ``generated - start``.
        """
        if self.decay_start is None or generated <= self.decay_start:
            return 0.0
        return pow(self.decay_factor, generated - self.decay_start) - 1


# ---------------------------------------------------------------------------------------
# Model side


def _unwrap(model: Any) -> Any:
    """The ``MllamaForConditionalGeneration`` under a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def default_variant_context(model: Any) -> Callable[[str], contextlib.AbstractContextManager]:
    """``base`` runs with the adapter disabled (one weight copy); any other variant with it on."""

    def context(variant: str) -> contextlib.AbstractContextManager:
        if variant == BASE_VARIANT and hasattr(model, "disable_adapter"):
            return model.disable_adapter()
        return contextlib.nullcontext()

    return context


def _gqa_attention(q, k, v, mask, scale):
    """Grouped-query attention without repeating keys and values.

    ``q`` (b, heads, s, d); ``k``/``v`` (b, kv_heads, t, d); ``mask`` bool, broadcastable to
    (b, 1, s, t), True = attend. The query heads that share a key/value head are folded into
    the query length, so each key/value head is read once (``repeat_kv`` would copy it).
    """
    import torch.nn.functional as F

    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qf = q.reshape(b, kv_heads, group * s, d)
    if mask.shape[-2] != 1 and group > 1:
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, s, d)  # fp32 kernels may return it non-contiguous


SPLIT_VISION_ATTENTION = "lavender_checks_split_vision"
_PAD_SPLITS: dict[tuple, list] = {}  # one vision call's mask -> per image (padding rows, real rows)


def split_vision_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The vision tower's attention without a bias tensor, so the fastest kernel can run.

    Mllama's vision mask only forbids padding-to-padding pairs (``_prepare_aspect_ratio_
    attention_mask`` multiplies the padding indicator by its transpose): real tokens attend to
    every token, padding included, and padding tokens attend to the real tokens only. So all
    rows are computed unmasked, and the padding rows are then computed again over the real
    keys alone. The same function as transformers' masked attention, up to rounding.
    ``query`` etc. are (batch, heads, tokens, head_dim); returns (batch, tokens, heads, dim).
    """
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    if attention_mask is not None:
        for b, (pad, real) in enumerate(_pad_split(attention_mask)):
            if pad.numel():
                out[b, :, pad] = F.scaled_dot_product_attention(
                    query[b:b + 1, :, pad], key[b:b + 1, :, real], value[b:b + 1, :, real], scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _pad_split(mask):
    """Per image: indices of the padding rows and of the real rows, read off the additive mask
    (a padding row has masked entries). Computed once per vision call: every layer gets the
    same mask tensor."""
    key = (mask.data_ptr(), tuple(mask.shape))
    if key not in _PAD_SPLITS:
        pad = (mask[:, 0] != 0).any(-1)
        _PAD_SPLITS[key] = [(row.nonzero().flatten(), (~row).nonzero().flatten()) for row in pad]
    return _PAD_SPLITS[key]


class FastGenerator:
    """Greedy generation for one ``MllamaForConditionalGeneration`` (optionally under peft).

    ``generate(requests, variant, ...)`` has the contract of ``lavender_checks.engines.batched.
    generate``; ``generate_ids`` returns the new token ids instead of text. Buffers and
    captured graphs are kept between calls.

    ``generation_config``: the (greedy) config plain ``generate`` would get; its EOS ids and
    length rules are applied, and a setting this path cannot reproduce raises
    ``UnsupportedGenerationSetting``. Default: the model's own config.
    """

    def __init__(self, model: Any, processor: Any, *, add_special_tokens: bool = True,
                 variant_context: Callable[[str], contextlib.AbstractContextManager] | None = None,
                 generation_config: Any = None,
                 decode_text: Callable[[list[int]], str] | None = None,
                 config: FastGenConfig | None = None):
        import torch

        self.model = model
        self.processor = processor
        self.add_special_tokens = add_special_tokens
        self.config = config or FastGenConfig()
        self.variant_context = variant_context or default_variant_context(model)
        self.decode_text = decode_text or self._default_decode

        mllama = _unwrap(model)
        self.mllama = mllama
        self.text_model = mllama.model.language_model
        self.vision_model = mllama.model.vision_model
        self.projector = mllama.model.multi_modal_projector
        self.lm_head = mllama.lm_head
        text_cfg = mllama.config.get_text_config()
        self.hidden = text_cfg.hidden_size
        self.heads = text_cfg.num_attention_heads
        self.kv_heads = text_cfg.num_key_value_heads
        self.head_dim = self.hidden // self.heads
        self.cross_layers = set(text_cfg.cross_attention_layers)
        self.num_patches = int(self.vision_model.num_patches)
        self.max_tiles = int(self.vision_model.max_num_tiles)
        self.vision_tokens = self.max_tiles * self.num_patches  # one image per row
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        self.pad_id = _pad_token_id(processor, mllama)
        self.image_token_id = _image_token_id(processor, mllama)
        self.rules = GreedyRules.from_generation_config(
            generation_config if generation_config is not None else _greedy_copy(mllama.generation_config))
        self.eos_ids = frozenset(self.rules.eos_ids)
        self._eos_index = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)

        self.self_index = {}  # layer index -> position in the self-attention cache lists
        self.cross_index = {}
        for i in range(len(self.text_model.layers)):
            table = self.cross_index if i in self.cross_layers else self.self_index
            table[i] = len(table)

        self._use_graphs = self.config.cuda_graphs and self.device.type == "cuda"
        self._graph_error: str | None = None
        self._graphs: dict[tuple[str, int], Any] = {}
        self._graph_pool = None
        self._slots = 0
        self._cache_len = 0
        self.last_stats = FastGenStats()
        self._torch = torch

    # -- public API --------------------------------------------------------------------

    def generate(self, requests: Sequence[Any], variant: str, *, batch_size: int | None = None,
                 on_batch: Callable[[list[tuple[Any, str]]], None] | None = None,
                 progress: bool = False) -> dict[Any, str]:
        """``{request.key: prediction}`` in request order; ``on_batch([(key, prediction), ...])``
        is called as rows finish (before each prefill, and at the end).

        ``batch_size`` is accepted for the signature of ``generation.generate``; the decode
        batch is ``config.max_slots`` (rows enter and leave it as they start and finish).
        """
        del batch_size, progress

        def report(finished: Mapping[Any, list[int]]) -> None:
            on_batch([(key, self.decode_text(ids)) for key, ids in finished.items()])

        ids = self.generate_ids(requests, variant, on_finish=report if on_batch else None)
        return {key: self.decode_text(tokens) for key, tokens in ids.items()}

    def generate_ids(self, requests: Sequence[Any], variant: str,
                     on_finish: Callable[[Mapping[Any, list[int]]], None] | None = None
                     ) -> dict[Any, list[int]]:
        """``{request.key: new token ids}`` (up to and with the first EOS), greedy."""
        torch = self._torch
        stats = FastGenStats()
        started = time.perf_counter()
        if not requests:
            self.last_stats = stats
            return {}
        keys = [r.key for r in requests]
        if len(set(keys)) != len(keys):
            raise ValueError("requests repeat a key; each request needs its own")

        with concurrent.futures.ThreadPoolExecutor(max(1, self.config.prep_threads)) as pool:
            rows, first_images = self._prepare_rows(requests, pool)
            groups: OrderedDict[str, list[_Row]] = OrderedDict()
            for row in rows:
                groups.setdefault(row.image, []).append(row)
            stats.rows = len(rows)
            stats.rows_sharing_image = len(rows) - len(groups)
            need = max(len(r.ids) + r.max_new for r in rows)
            with torch.inference_mode(), self.variant_context(variant):
                self._ensure_buffers(need)
                stats.slots = self._slots
                results = self._run(variant, groups, first_images, pool, stats, on_finish)
        stats.seconds["total"] = time.perf_counter() - started
        stats.graphs = ("on" if self._use_graphs else
                        (f"failed: {self._graph_error}" if self._graph_error else "off"))
        self.last_stats = stats
        return {key: results[key] for key in keys}

    # -- preparation -------------------------------------------------------------------

    def _prepare_rows(self, requests, pool):
        processor, special = self.processor, self.add_special_tokens
        image_token = self.image_token_id

        def prepare(position_request):
            position, request = position_request
            key, text, image, max_new, image_key = _request_parts(request)
            ids = encode_text(processor, text, special)
            where = [i for i, t in enumerate(ids) if t == image_token]
            if len(where) != 1:
                raise ValueError(f"request {key!r}: the prompt must hold exactly one image token, "
                                 f"found {len(where)}")
            if image_key is not None:
                group = f"key:{image_key}"  # the caller vouches for identical pixels
            else:
                # A loader is called again when its image is encoded: holding every opened
                # image of a whole benchmark would not fit in memory.
                group = image_digest(image() if callable(image) else image)
            return _Row(position, key, ids, where[0], group, max_new), image

        prepared = list(pool.map(prepare, enumerate(requests)))
        rows = [row for row, _ in prepared]
        # Per group, the image (or loader) of its first row: what the vision tower encodes.
        first_images: dict[str, Any] = {}
        for row, image in prepared:
            first_images.setdefault(row.image, image)
        return rows, first_images

    # -- buffers -----------------------------------------------------------------------

    def slot_bytes(self, cache_len: int) -> int:
        """GPU bytes one slot's caches take at ``cache_len`` self-attention positions."""
        elem = self._torch.finfo(self.dtype).bits // 8
        per_pos = 2 * self.kv_heads * self.head_dim * elem
        return per_pos * (len(self.self_index) * cache_len + len(self.cross_index) * self.vision_tokens)

    def _ensure_buffers(self, need: int) -> None:
        torch = self._torch
        cache_len = max(self.config.min_bucket, self.config.min_cache_len, _round_up(need, 64))
        if self._slots and cache_len <= self._cache_len:
            return
        cache_len = max(cache_len, self._cache_len)
        # Free the old caches and the graphs that point into them before sizing the new ones.
        # The graphs' memory pool goes with them: capturing into a pool whose graphs are all
        # gone trips an allocator assertion (seen with torch 2.11), so new graphs get a new pool.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._graph_pool = None
        for name in ("_self_k", "_self_v", "_cross_k", "_cross_v"):
            setattr(self, name, None)
        slots = self.config.max_slots
        if self.device.type == "cuda" and self.config.memory_budget_gib is not None:
            torch.cuda.empty_cache()
            in_use = torch.cuda.memory_allocated(self.device)
            free, _ = torch.cuda.mem_get_info(self.device)
            # The budget, or what this card can still give (a smaller card, another process),
            # less half a GiB for the CUDA context's own allocations.
            budget = min(self.config.memory_budget_gib * GIB, in_use + free - GIB // 2)
            room = budget - in_use - self.config.workspace_gib * GIB
            fit = int(room // self.slot_bytes(cache_len))
            if fit < 1:
                raise RuntimeError(
                    f"the fast path needs {self.slot_bytes(cache_len) / GIB:.2f} GiB per slot and "
                    f"{self.config.workspace_gib} GiB of workspace; only {room / GIB:.2f} GiB are "
                    f"left under a {budget / GIB:.1f} GiB budget ({self.config.memory_budget_gib} GiB "
                    f"asked, {(in_use + free) / GIB:.1f} GiB on the card for this process)")
            if fit < slots:
                log.info("fast path: %d slots fit the %.1f GiB budget (asked for %d)", fit, budget / GIB, slots)
                slots = fit
        shape_self = (slots, self.kv_heads, cache_len, self.head_dim)
        shape_cross = (slots, self.kv_heads, self.vision_tokens, self.head_dim)
        make = lambda shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self._self_k = [make(shape_self) for _ in self.self_index]
        self._self_v = [make(shape_self) for _ in self.self_index]
        self._cross_k = [make(shape_cross) for _ in self.cross_index]
        self._cross_v = [make(shape_cross) for _ in self.cross_index]
        self._tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._next = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._suppress = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self._decay = torch.zeros(slots, dtype=torch.float32, device=self.device)
        # Every slot sees the first tile until a row moves in, so no attention row is all-masked.
        self._tile_ok = torch.zeros(slots, self.vision_tokens, dtype=torch.bool, device=self.device)
        self._tile_ok[:, : self.num_patches] = True
        self._key_arange = torch.arange(cache_len, device=self.device)
        self._slot_arange = torch.arange(slots, device=self.device)
        self._slots, self._cache_len = slots, cache_len

    def _bucket(self, length: int) -> int:
        """Keys the decode step reads: a bucket at least ``length`` long (one graph per bucket)."""
        step = self.config.min_bucket
        if self.config.bucket_growth == "linear":
            return min(_round_up(length, step), self._cache_len)
        bucket = step
        while bucket < length:
            bucket *= 2
        return min(bucket, self._cache_len)

    # -- the generation loop -----------------------------------------------------------

    def _run(self, variant, groups, first_images, pool, stats, on_finish):
        torch = self._torch
        cfg, rules = self.config, self.rules
        slots = self._slots
        admit_min = max(1, math.ceil(cfg.admit_fraction * slots))
        group_list = list(groups.items())
        # Image preprocessing runs ahead of the GPU on the thread pool, a window at a time.
        window = max(2 * cfg.vision_batch, 2 * slots)
        futures: dict[str, concurrent.futures.Future] = {}
        next_submit = 0

        def submit_ahead(upto: int) -> None:
            nonlocal next_submit
            while next_submit < min(upto, len(group_list)):
                digest = group_list[next_submit][0]
                futures[digest] = pool.submit(_load_and_encode, self.processor, first_images[digest])
                next_submit += 1

        submit_ahead(window)
        pending: list[_Row] = [row for _, rows in group_list for row in rows]
        remaining = {digest: len(rows) for digest, rows in group_list}
        group_rank = {digest: i for i, (digest, _) in enumerate(group_list)}
        image_kv: dict[str, tuple[list, list]] = {}
        image_meta: dict[str, _Image] = {}
        active: dict[int, tuple[_Row, list[int]]] = {}
        free = list(range(slots))
        results: dict[Any, list[int]] = {}
        unreported: dict[Any, list[int]] = {}
        cursor = 0
        host_pos = [0] * slots
        drained = False

        def finish(slot: int) -> None:
            row, out = active.pop(slot)
            results[row.key] = out
            unreported[row.key] = out
            stats.new_tokens += len(out)
            host_pos[slot] = 0
            free.append(slot)

        def flush() -> None:
            if on_finish is not None and unreported:
                on_finish(dict(unreported))
            unreported.clear()

        while cursor < len(pending) or active:
            if cursor < len(pending) and (len(free) >= admit_min or not active
                                          or len(free) >= len(pending) - cursor):
                flush()
                free.sort()
                take = self._admission(pending, cursor, len(free))
                batch = pending[cursor:cursor + take]
                cursor += take
                # Image features for the admitted rows, a vision batch at a time.
                missing = [d for d in dict.fromkeys(r.image for r in batch) if d not in image_kv]
                for start in range(0, len(missing), cfg.vision_batch):
                    chunk = missing[start:start + cfg.vision_batch]
                    t0 = time.perf_counter()
                    submit_ahead(group_rank[chunk[-1]] + 1 + window)
                    encoded = [futures.pop(d).result() for d in chunk]
                    stats.seconds["prep_wait"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    for digest, kv, enc in zip(chunk, self._image_features(encoded), encoded):
                        image_kv[digest] = kv
                        image_meta[digest] = enc
                    stats.images += len(chunk)
                    self._sync()
                    stats.seconds["vision"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                targets = [free.pop(0) for _ in batch]
                first = self._prefill(batch, targets, image_kv, image_meta, stats)
                stats.seconds["prefill"] += time.perf_counter() - t0
                for row, slot, token in zip(batch, targets, first):
                    active[slot] = (row, [token])
                    host_pos[slot] = len(row.ids)
                    remaining[row.image] -= 1
                    if remaining[row.image] == 0:
                        del image_kv[row.image]
                        del image_meta[row.image]
                    if token in self.eos_ids or row.max_new <= 1:
                        finish(slot)
                continue
            t0 = time.perf_counter()
            captured_before = stats.seconds["capture"]
            if cursor >= len(pending) and not drained:  # the first drain step
                drained = True
                stats.drain_rows += len(active)
            length = max(host_pos[s] for s in active) + 1
            self._positions.copy_(torch.tensor(host_pos, dtype=torch.long))
            if rules.suppresses or rules.decays:
                suppress, decay = [False] * slots, [0.0] * slots
                for slot, (row, out) in active.items():
                    suppress[slot] = rules.suppress_eos(len(row.ids), len(out))
                    decay[slot] = rules.decay_multiplier(len(out))
                self._suppress.copy_(torch.tensor(suppress, dtype=torch.bool))
                self._decay.copy_(torch.tensor(decay, dtype=torch.float32))
            self._decode(variant, self._bucket(length), stats)
            next_tokens = self._next.tolist()
            self._tokens.copy_(self._next)
            stats.decode_steps += 1
            stats.slot_steps += len(active)
            for slot in list(active):
                row, out = active[slot]
                token = next_tokens[slot]
                out.append(token)
                host_pos[slot] += 1
                if token in self.eos_ids or len(out) >= row.max_new:
                    finish(slot)
            spent = time.perf_counter() - t0
            stats.seconds["decode"] += spent
            if cursor >= len(pending):  # (graph captures are counted apart)
                stats.drain_steps += 1
                stats.seconds["drain"] += spent - (stats.seconds["capture"] - captured_before)
        flush()
        return results

    def _admission(self, pending, cursor, free_slots):
        """How many waiting rows to prefill now: the free slots, within the prefill token cap."""
        take, longest = 0, 0
        while take < free_slots and cursor + take < len(pending):
            longest_next = max(longest, len(pending[cursor + take].ids))
            if take and longest_next * (take + 1) > self.config.max_prefill_tokens:
                break
            longest = longest_next
            take += 1
        return take

    def _sync(self) -> None:
        if self.config.phase_timing and self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    # -- vision ------------------------------------------------------------------------

    def _image_features(self, encoded: list[_Image]):
        """Per image: (keys, values) of every cross-attention layer, each (kv_heads, T, d)."""
        torch = self._torch
        dev = self.device
        pixel_values = torch.cat([e.pixel_values for e in encoded]).to(dev, non_blocking=True)
        ratio_ids = torch.cat([e.aspect_ratio_ids for e in encoded]).to(dev, non_blocking=True)
        ratio_mask = torch.cat([e.aspect_ratio_mask for e in encoded]).to(dev, non_blocking=True)
        # As MllamaModel.forward: vision tower, projector, then (tiles*patches, hidden) per image.
        with self._vision_attention():
            out = self.vision_model(pixel_values=pixel_values, aspect_ratio_ids=ratio_ids,
                                    aspect_ratio_mask=ratio_mask)
        states = out.last_hidden_state
        states = self.projector(states).reshape(-1, states.shape[-2], self.hidden)
        n = len(encoded)
        states = states.reshape(n, -1, self.hidden)
        keys, values = [], []
        for index in sorted(self.cross_index):
            attn = self.text_model.layers[index].cross_attn
            k = attn.k_proj(states).view(n, -1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(states).view(n, -1, self.kv_heads, self.head_dim).transpose(1, 2)
            keys.append(attn.k_norm(k))
            values.append(v)
        return [([k[i] for k in keys], [v[i] for v in values]) for i in range(n)]

    @contextlib.contextmanager
    def _vision_attention(self):
        """The vision tower's attention for this call: transformers' own, or the split one."""
        if self.config.vision_attention == "transformers":
            yield
            return
        if self.config.vision_attention != "split":
            raise ValueError(f"unknown vision_attention {self.config.vision_attention!r}; "
                             "expected 'transformers' or 'split'")
        from transformers import AttentionInterface

        AttentionInterface.register(SPLIT_VISION_ATTENTION, split_vision_attention)
        config = self.vision_model.config
        previous = config._attn_implementation
        _PAD_SPLITS.clear()
        config._attn_implementation = SPLIT_VISION_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = previous
            _PAD_SPLITS.clear()

    # -- text decoder ------------------------------------------------------------------

    def _self_layer(self, layer, h, cos, sin, attend):
        """One self-attention decoder layer; ``attend(k, v)`` -> (keys, values, mask)."""
        from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

        b, s, _ = h.shape
        x = layer.input_layernorm(h)
        attn = layer.self_attn
        q = attn.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, vals, mask = attend(k, v)
        o = _gqa_attention(q, keys, vals, mask, attn.scaling)
        o = o.transpose(1, 2).reshape(b, s, -1)
        h = h + attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _cross_layer(self, layer, h, keys, vals, mask, row_mask):
        """One gated cross-attention layer, as MllamaCrossAttentionDecoderLayer computes it."""
        b, s, _ = h.shape
        x = layer.input_layernorm(h)
        attn = layer.cross_attn
        q = attn.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q = attn.q_norm(q)
        o = _gqa_attention(q, keys, vals, mask, attn.scaling)
        o = attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
        h = h + layer.cross_attn_attn_gate.tanh() * o
        x = layer.mlp(layer.post_attention_layernorm(h))
        if row_mask is not None:
            x = row_mask * x
        return h + layer.cross_attn_mlp_gate.tanh() * x

    def _greedy_choice(self, hidden, suppress, decay):
        """Next tokens from the last hidden states, through greedy generate's logits rules."""
        torch = self._torch
        scores = self.lm_head(hidden).float()  # generate scores in float32
        if self.rules.suppresses or self.rules.decays:
            eos = self._eos_index
            picked = scores[:, eos]
            if self.rules.suppresses:
                picked = torch.where(suppress[:, None], float("-inf"), picked)
            if self.rules.decays:
                penalty = picked.abs() * decay[:, None]
                penalty = penalty.masked_fill(~torch.isfinite(picked), 0.0)
                picked = picked + penalty
            scores[:, eos] = picked
        return scores.argmax(-1)

    def _prefill(self, batch: list[_Row], targets: list[int], image_kv, image_meta, stats) -> list[int]:
        """Run the prompts of ``batch`` (left-padded), fill their slots, return first tokens."""
        torch = self._torch
        dev = self.device
        n = len(batch)
        seq = max(len(r.ids) for r in batch)
        stats.prefill_calls += 1
        stats.prefill_tokens += n * seq
        ids = torch.full((n, seq), self.pad_id, dtype=torch.long)
        valid = torch.zeros(n, seq, dtype=torch.bool)
        image_pos = torch.zeros(n, dtype=torch.long)
        tiles = torch.zeros(n, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, seq - len(row.ids):] = torch.tensor(row.ids)
            valid[i, seq - len(row.ids):] = True
            image_pos[i] = seq - len(row.ids) + row.image_pos
            tiles[i] = image_meta[row.image].num_tiles
        ids, valid = ids.to(dev), valid.to(dev)
        image_pos, tiles = image_pos.to(dev), tiles.to(dev)
        slots = torch.tensor(targets, dtype=torch.long, device=dev)

        # Cross-attention keys and values of the new rows go into their slots; the prefill reads
        # them from there (a view when the slots are consecutive, else a gather per layer).
        for j in range(len(self.cross_index)):
            for slot, row in zip(targets, batch):
                self._cross_k[j][slot] = image_kv[row.image][0][j]
                self._cross_v[j][slot] = image_kv[row.image][1][j]
        consecutive = targets == list(range(targets[0], targets[0] + n))

        def cross_kv(j):
            if consecutive:
                return (self._cross_k[j][targets[0]:targets[0] + n],
                        self._cross_v[j][targets[0]:targets[0] + n])
            return self._cross_k[j][slots], self._cross_v[j][slots]
        vision_index = torch.arange(self.vision_tokens, device=dev)
        tile_ok = (vision_index // self.num_patches)[None, :] < tiles[:, None]  # (n, T)
        self._tile_ok[slots] = tile_ok

        positions = torch.arange(seq, device=dev)
        sees = positions[None, :] >= image_pos[:, None]  # (n, S): at or after <|image|>
        # Mllama: a token that sees no tile attends to every vision token (the mask row is
        # zeroed, not -inf) and its cross-attention MLP output is zeroed. Kept deliberately.
        cross_mask = torch.where(sees[:, :, None], tile_ok[:, None, :], True)[:, None]
        row_mask = sees.to(self.dtype)[..., None]

        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = positions[None, :] <= positions[:, None]  # (S, S): key <= query
        eye = torch.eye(seq, dtype=torch.bool, device=dev)
        # Padding queries see themselves only, so no attention row is empty.
        self_mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]

        # Where the real prompt tokens go in the slot caches: slot row, position 0..len-1.
        real = valid.nonzero(as_tuple=False)
        src_row, src_pos = real[:, 0], real[:, 1]
        dst_slot = slots[src_row]
        dst_pos = src_pos - (seq - valid.sum(-1))[src_row]

        tm = self.text_model
        h = tm.embed_tokens(ids)
        cos, sin = tm.rotary_emb(h, position_ids)
        for index, layer in enumerate(tm.layers):
            if index in self.cross_index:
                j = self.cross_index[index]
                h = self._cross_layer(layer, h, *cross_kv(j), cross_mask, row_mask)
                continue
            j = self.self_index[index]

            def attend(k, v, j=j):
                self._self_k[j][dst_slot, :, dst_pos] = k[src_row, :, src_pos]
                self._self_v[j][dst_slot, :, dst_pos] = v[src_row, :, src_pos]
                return k, v, self_mask

            h = self._self_layer(layer, h, cos, sin, attend)
        h = tm.norm(h[:, -1:])
        suppress = torch.tensor([self.rules.suppress_eos(len(r.ids), 0) for r in batch], device=dev)
        decay = torch.tensor([self.rules.decay_multiplier(0) for _ in batch], dtype=torch.float32, device=dev)
        first = self._greedy_choice(h[:, -1], suppress, decay)
        self._tokens[slots] = first
        return first.tolist()

    def _decode_step(self, length: int) -> None:
        """One token for every slot, reading and writing only the static buffers."""
        tm = self.text_model
        positions = self._positions
        h = tm.embed_tokens(self._tokens[:, None])
        cos, sin = tm.rotary_emb(h, positions[:, None])
        key_ok = (self._key_arange[:length][None, :] <= positions[:, None])[:, None, None, :]
        cross_ok = self._tile_ok[:, None, None, :]
        slot_index = self._slot_arange
        for index, layer in enumerate(tm.layers):
            if index in self.cross_index:
                j = self.cross_index[index]
                # Generated tokens always follow <|image|>: the MLP row mask is 1 (omitted).
                h = self._cross_layer(layer, h, self._cross_k[j], self._cross_v[j], cross_ok, None)
                continue
            j = self.self_index[index]

            def attend(k, v, j=j):
                cache_k, cache_v = self._self_k[j], self._self_v[j]
                cache_k[slot_index, :, positions] = k[:, :, 0]
                cache_v[slot_index, :, positions] = v[:, :, 0]
                return cache_k[:, :, :length], cache_v[:, :, :length], key_ok

            h = self._self_layer(layer, h, cos, sin, attend)
        h = tm.norm(h)
        self._next.copy_(self._greedy_choice(h[:, -1], self._suppress, self._decay))

    def _decode(self, variant: str, length: int, stats: FastGenStats) -> None:
        if self._use_graphs:
            graph = self._graphs.get((variant, length))
            if graph is None:
                t0 = time.perf_counter()
                try:
                    graph = self._capture(length)
                except Exception as exc:  # fall back to eager decoding, and say so
                    self._use_graphs = False
                    self._graph_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("CUDA graph capture failed (%s); decoding eagerly", self._graph_error)
                    self._torch.cuda.synchronize(self.device)
                else:
                    self._graphs[(variant, length)] = graph
                    stats.graph_captures += 1
                stats.seconds["capture"] += time.perf_counter() - t0
            if graph is not None:
                graph.replay()
                return
        self._decode_step(length)

    def _capture(self, length: int):
        """Capture the decode step. The warm-up steps repeat the coming step exactly (same
        inputs, same cache writes), so capturing in the middle of a generation is harmless."""
        torch = self._torch
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step(length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._decode_step(length)
        return graph

    # -- text --------------------------------------------------------------------------

    def _default_decode(self, ids: list[int]) -> str:
        """VLMEvalKit's post-processing: decode with the processor's defaults, drop
        ``<|eot_id|>`` only, no strip (deliberate)."""
        return self.processor.decode(ids).replace("<|eot_id|>", "")


def fast_generator_for_pair(pair: Any, config: FastGenConfig | None = None) -> FastGenerator:
    """The fast runner over a ``ModelPair``: its variants, the suite's greedy generation config
    and its post-processing (``generation.postprocess``), so ``generate`` is a drop-in for
    ``generation.generate(pair, ...)`` on requests with one image each."""
    from lavender_checks.engines.batched import _greedy_settings, postprocess

    settings = _greedy_settings(pair)
    return FastGenerator(pair.model, pair.processor, variant_context=pair.variant,
                         generation_config=settings.generation_config,
                         decode_text=lambda ids: postprocess(pair.processor, ids, settings.eos_ids),
                         config=config)


def _greedy_copy(generation_config: Any) -> Any:
    """The model's generation config switched to greedy, as the suite's generate does."""
    import copy

    config = copy.deepcopy(generation_config)
    config.do_sample = False
    config.num_beams = 1
    return config


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_token_id(processor: Any, model: Any) -> int:
    tok = getattr(processor, "tokenizer", None)
    for candidate in (getattr(tok, "pad_token_id", None),
                      getattr(model.generation_config, "pad_token_id", None),
                      getattr(model.config.get_text_config(), "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _image_token_id(processor: Any, model: Any) -> int:
    value = getattr(processor, "image_token_id", None)
    if value is None:
        value = getattr(model.config, "image_token_index", None)
    if value is None:
        raise ValueError("cannot tell the <|image|> token id from the processor or the model config")
    return int(value)

"""Fast greedy generation for Mllama (with or without a LoRA adapter), for whole benchmarks.

Same requests and predictions as the batched engine, and the same greedy tokens as plain
``model.generate`` one sample at a time, but organised for throughput:

* **Vision once per image.** Rows are grouped by image content (MMBench asks each question in
  up to four rotations of one image, DocVQA several questions per page, MME two). The
  vision tower, the projector and every cross-attention layer's keys and values run once per
  distinct image and variant; the rows of that image copy the keys and values.
* **Finished rows leave the batch.** Decoding runs over a fixed number of slots; a row that
  reaches EOS or its token budget frees its slot, and waiting rows are prefilled into free
  slots (continuous batching, ``scheduler.py``) instead of riding along to the longest row.
* **One launch per decode step.** The decode step is a CUDA graph per variant and key-length
  bucket over static caches (``runner.py``); the layers are ``mllama.py``.
* **Batch invariance** (``invariant.py``, on by default): every row's tokens depend on that
  row alone, not on the rows run with it, their order, the slot count, the chunking, the
  shard or the resume point; ``FastGenConfig(invariant=False)`` is the throughput mode.
* **CPU work overlaps the GPU.** Image loading, hashing and preprocessing run on a thread
  pool ahead of the GPU loop (``inputs.py``). A request's image may be a zero-argument
  loader; it is called on that pool, and only the images being preprocessed are held in
  memory, so one call can take a whole benchmark. A request with an ``image_key`` is grouped
  by it; one without is opened and hashed up front to find the rows that share an image.

Without CUDA the same code runs eagerly (no graphs); the tests compare its tokens with plain
``generate`` on the tiny model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lavender_checks.engines.fast import invariant, mllama
from lavender_checks.engines.fast.config import FastGenConfig
from lavender_checks.engines.fast.inputs import (
    EncodedImage,
    load_and_encode,
    prepare_rows,
)
from lavender_checks.engines.fast.rules import GreedyRules
from lavender_checks.engines.fast.runner import ModelRunner
from lavender_checks.engines.fast.scheduler import Row, Scheduler
from lavender_checks.engines.fast.stats import FastGenStats
from lavender_checks.engines.request import (
    OnFinish,
    check_requests,
    decode_output,
    greedy_settings,
    pair_greedy_settings,
)
from lavender_checks.model import BASE_VARIANT

log = logging.getLogger(__name__)


def default_variant_context(model: Any) -> Callable[[str], contextlib.AbstractContextManager]:
    """``base`` runs with the adapter disabled (one weight copy); any other variant with it on."""

    def context(variant: str) -> contextlib.AbstractContextManager:
        if variant == BASE_VARIANT and hasattr(model, "disable_adapter"):
            return model.disable_adapter()
        return contextlib.nullcontext()

    return context


class FastGenerator:
    """Greedy generation for one ``MllamaForConditionalGeneration`` (optionally under peft).

    ``generate(requests, variant, on_finish)`` gives predictions as the batched engine does;
    ``generate_ids`` the new token ids instead. Buffers and captured graphs are kept between
    calls; ``last_stats`` describe the last call.

    ``generation_config``: the (greedy) config plain ``generate`` would get; its EOS ids and
    length rules are applied, and a setting this engine cannot reproduce raises
    ``UnsupportedGenerationSetting``. Default: the model's own config.
    """

    def __init__(self, model: Any, processor: Any, *, add_special_tokens: bool = True,
                 variant_context: Callable[[str], contextlib.AbstractContextManager] | None = None,
                 generation_config: Any = None, config: FastGenConfig | None = None):
        self.model = model
        self.processor = processor
        self.add_special_tokens = add_special_tokens
        self.config = config or FastGenConfig()
        self.variant_context = variant_context or default_variant_context(model)
        base = mllama.unwrap(model)
        self.parts = mllama.MllamaParts.of(base)
        self.rules = GreedyRules.from_generation_config(
            generation_config if generation_config is not None
            else greedy_settings(base.generation_config, processor.tokenizer).generation_config)
        self.eos_ids = frozenset(self.rules.eos_ids)
        self.image_token_id = _image_token_id(processor, base)
        device, dtype = base.lm_head.weight.device, base.lm_head.weight.dtype
        self.device, self.dtype = device, dtype
        self.runner = ModelRunner(self.parts, device=device, dtype=dtype, config=self.config, rules=self.rules,
                                  pad_id=_pad_token_id(processor, base))
        self.last_stats = FastGenStats()

    @property
    def config(self) -> FastGenConfig:
        return self._config

    @config.setter
    def config(self, value: FastGenConfig) -> None:
        """A new config applies from the next call on (buffers already sized stay)."""
        self._config = value
        if hasattr(self, "runner"):
            self.runner.config = value

    def slot_bytes(self, cache_len: int) -> int:
        """GPU bytes one slot's caches take at ``cache_len`` self-attention positions."""
        return self.runner.slot_bytes(cache_len)

    def release(self) -> None:
        """Free the caches and captured graphs (the next call allocates them again)."""
        self.runner.release()

    # -- public API --------------------------------------------------------------------

    def generate(self, requests: Sequence[Any], variant: str, on_finish: OnFinish | None = None) -> dict[Any, str]:
        """``{request.key: prediction}`` in request order; ``on_finish([(key, prediction), ...])``
        is called as rows finish (before each prefill, and at the end)."""
        clean_up = {r.key: getattr(r, "clean_up_spaces", False) for r in requests}

        def text(key, ids: list[int]) -> str:
            return decode_output(self.processor, ids, self.eos_ids, clean_up[key])

        def report(finished: Mapping[Any, list[int]]) -> None:
            on_finish([(key, text(key, ids)) for key, ids in finished.items()])

        ids = self.generate_ids(requests, variant, on_finish=report if on_finish else None)
        return {key: text(key, tokens) for key, tokens in ids.items()}

    def generate_ids(self, requests: Sequence[Any], variant: str,
                     on_finish: Callable[[Mapping[Any, list[int]]], None] | None = None
                     ) -> dict[Any, list[int]]:
        """``{request.key: new token ids}`` (up to and with the first EOS), greedy."""
        import torch

        stats = FastGenStats()
        started = time.perf_counter()
        if not requests:
            self.last_stats = stats
            return {}
        check_requests(requests)
        keys = [r.key for r in requests]

        with concurrent.futures.ThreadPoolExecutor(max(1, self.config.prep_threads)) as pool:
            rows, first_images = prepare_rows(requests, pool, self.processor, self.add_special_tokens,
                                              self.image_token_id)
            # Rows of one image wait together, images in the order of their first row.
            by_image: dict[str, list[Row]] = {}
            for row in rows:
                by_image.setdefault(row.image, []).append(row)
            stats.rows = len(rows)
            stats.rows_sharing_image = len(rows) - len(by_image)
            waiting = [row for group in by_image.values() for row in group]
            if self.config.invariant:
                # Each part decoded with caches of its rows' own length (invariant.py).
                passes = invariant.by_cache_length(waiting, _positions_needed, self.config.min_cache_len)
                if len(passes) > 1 or passes[0][0] > self.config.min_cache_len:
                    log.info("fast path: %s", "; ".join(
                        f"{len(part)} row(s) decoded with {length} cache positions" for length, part in passes))
            else:
                passes = [(max(_positions_needed(r) for r in rows), waiting)]
            results: dict[Any, list[int]] = {}
            with (torch.inference_mode(), self.variant_context(variant),
                  invariant.blas_settings(self.device, self.config.invariant and self.config.invariant_blas)):
                feed = None
                for number, (need, part) in enumerate(passes):
                    self.runner.ensure_buffers(need)
                    stats.slots = max(stats.slots, self.runner.slots)
                    stats.cache_len = max(stats.cache_len, self.runner.cache_len)
                    stats.invariant = self.config.invariant
                    if feed is None:  # one feed for every pass: vision still runs once per image
                        feed = _ImageFeed(self.processor,
                                          {row.image: first_images[row.image] for _, rows_of in passes for row in rows_of},
                                          pool, window=max(2 * self.config.vision_batch, 2 * self.runner.slots))
                    feed.keep = {row.image for _, later in passes[number + 1:] for row in later}
                    results.update(self._run(variant, part, feed, stats, on_finish))
        stats.seconds["total"] = time.perf_counter() - started
        stats.graphs = self.runner.graphs
        self.last_stats = stats
        return {key: results[key] for key in keys}

    # -- the generation loop -----------------------------------------------------------

    def _run(self, variant: str, waiting: list[Row], feed: "_ImageFeed", stats: FastGenStats,
             on_finish) -> dict[Any, list[int]]:
        scheduler = Scheduler(waiting, self.runner.slots, admit_fraction=self.config.admit_fraction,
                              max_prefill_tokens=self.config.max_prefill_tokens, eos_ids=self.eos_ids,
                              stats=stats)
        while not scheduler.done:
            if scheduler.should_admit():
                _report(scheduler, on_finish)
                self._admit(scheduler, feed, stats)
            else:
                self._step(scheduler, variant, stats)
        _report(scheduler, on_finish)
        return scheduler.finished

    def _admit(self, scheduler: Scheduler, feed: "_ImageFeed", stats: FastGenStats) -> None:
        """Prefill the next waiting rows into free slots (their images through vision first)."""
        rows, slots = scheduler.admit()
        invariant_mode = self.config.invariant
        # invariant mode: one image a vision call (every call the same shape)
        feed.ensure(rows, self.runner, 1 if invariant_mode else self.config.vision_batch, stats)
        t0 = time.perf_counter()
        prefill = self.runner.prefill_invariant if invariant_mode else self.runner.prefill
        first = prefill(rows, slots, feed.kv, feed.meta, stats)
        stats.seconds["prefill"] += time.perf_counter() - t0
        feed.drop(scheduler.started(rows, slots, first))

    def _step(self, scheduler: Scheduler, variant: str, stats: FastGenStats) -> None:
        """One decode step of every running row."""
        t0 = time.perf_counter()
        captured_before = stats.seconds["capture"]
        length = scheduler.begin_step()
        self.runner.set_step_inputs(scheduler.positions, scheduler.running)
        self.runner.decode(variant, self.runner.bucket(length), stats)
        scheduler.stepped(self.runner.next_tokens())
        spent = time.perf_counter() - t0
        stats.seconds["decode"] += spent
        if scheduler.draining:  # (graph captures are counted apart)
            stats.seconds["drain"] += spent - (stats.seconds["capture"] - captured_before)


def _positions_needed(row: Row) -> int:
    """Self-attention cache positions a row needs: its prompt and its token budget."""
    return len(row.ids) + row.max_new


def _report(scheduler: Scheduler, on_finish) -> None:
    finished = scheduler.unreported()
    if on_finish is not None and finished:
        on_finish(finished)


class _ImageFeed:
    """Image features for admitted rows. Preprocessing runs ahead on the thread pool, a window
    of images past the last one asked for; features are kept until the last row of their
    image is admitted."""

    def __init__(self, processor: Any, first_images: dict[str, Any], pool, window: int):
        self.processor = processor
        self.first_images = first_images
        self.order = list(first_images)
        self.rank = {image: i for i, image in enumerate(self.order)}
        self.pool = pool
        self.window = window
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.submitted = 0
        self.kv: dict[str, tuple[list, list]] = {}
        self.meta: dict[str, EncodedImage] = {}
        self.keep: set[str] = set()  # images rows of a later pass still need
        self._submit_ahead(window)

    def _submit_ahead(self, upto: int) -> None:
        while self.submitted < min(upto, len(self.order)):
            image = self.order[self.submitted]
            self.futures[image] = self.pool.submit(load_and_encode, self.processor, self.first_images[image])
            self.submitted += 1

    def ensure(self, rows: list[Row], runner: ModelRunner, vision_batch: int, stats: FastGenStats) -> None:
        """Features of every image of ``rows``, a vision batch at a time."""
        missing = [d for d in dict.fromkeys(r.image for r in rows) if d not in self.kv]
        for start in range(0, len(missing), vision_batch):
            chunk = missing[start:start + vision_batch]
            t0 = time.perf_counter()
            self._submit_ahead(self.rank[chunk[-1]] + 1 + self.window)
            encoded = [self.futures.pop(d).result() for d in chunk]
            stats.seconds["prep_wait"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for digest, kv, enc in zip(chunk, runner.image_features(encoded), encoded):
                self.kv[digest] = kv
                self.meta[digest] = enc
            stats.images += len(chunk)
            runner.sync()
            stats.seconds["vision"] += time.perf_counter() - t0

    def drop(self, images: list[str]) -> None:
        for image in images:
            if image in self.keep:
                continue
            del self.kv[image]
            del self.meta[image]


def fast_generator_for_pair(pair: Any, config: FastGenConfig | None = None) -> FastGenerator:
    """The fast generator over a ``ModelPair``: its variants and the suite's greedy generation
    config, so its predictions are the batched engine's on requests with one image each."""
    return FastGenerator(pair.model, pair.processor, variant_context=pair.variant,
                         generation_config=pair_greedy_settings(pair).generation_config, config=config)


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

"""The fast engine (registered as ``"fast"``): ``FastEngine`` over a ``ModelPair``.

``engine.FastGenerator`` does the work (``scheduler``: which rows run where, no tensors;
``runner``: buffers, prefill, decode step, CUDA graphs; ``mllama``: the layers; ``inputs``:
the CPU side; ``rules``: greedy generate's logits rules; ``config``: the knobs). What it
cannot take (a generation config asking for logits processing it does not reproduce, a
request with other than one image) goes to the batched engine, logged and recorded in
``fallbacks``, which the run report shows.

Nothing heavy is imported here: ``scheduler`` and ``config`` load without torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from lavender_checks.engines import FAST_ENGINE
from lavender_checks.engines.fast.config import DEFAULT_CHUNK_ROWS, FastGenConfig
from lavender_checks.engines.fast.scheduler import pack_groups
from lavender_checks.engines.request import (
    GenerationRequest,
    OnFinish,
    pair_greedy_settings,
)

log = logging.getLogger(__name__)


class FastEngine:
    """The fast engine of one ``ModelPair``; the generator is built on first use, and again
    when the pair's greedy generation config changes."""

    name = FAST_ENGINE

    def __init__(self, pair: Any, *, batch_size: int = 8, chunk_rows: int | None = None,
                 fast_config: FastGenConfig | None = None, **_: Any):
        from lavender_checks.engines.batched import BatchedEngine

        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.pair = pair
        self.chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
        self.config = fast_config
        # Why the fast engine was not used, each reason once, in the order they came up.
        self.fallbacks: list[str] = []
        self.fallback = BatchedEngine(pair, batch_size=batch_size)
        self._generator: Any = None
        self._built_for: str | None = None
        self._refusal: str | None = None

    @property
    def batch_invariant(self) -> bool:
        return (self.config or FastGenConfig()).invariant

    @property
    def generator(self):
        """The ``FastGenerator`` built so far (None before the first call, or when the
        generation config rules it out); its ``last_stats`` describe the last call."""
        return self._generator

    def plan(self, keys: Sequence[Any], image_key_of: Callable[[Any], str]) -> list[list[Any]]:
        """Chunks of up to ``chunk_rows`` rows grouped by image, never cut inside an image:
        vision runs once per distinct image of a call, so the rotations of an MMBench
        question and the questions of one DocVQA page must share a chunk."""
        return pack_groups(keys, image_key_of, self.chunk_rows)

    def generate(self, requests: Sequence[GenerationRequest], variant: str,
                 on_finish: OnFinish | None = None) -> dict[Any, str]:
        generator, refusal = self._generator_for(requests)
        if generator is not None:
            return generator.generate(requests, variant, on_finish)
        log.warning("fast engine not used for %d request(s), generating them with the batched "
                    "engine: %s", len(requests), refusal)
        if refusal not in self.fallbacks:
            self.fallbacks.append(refusal)
        if not self.batch_invariant:
            return self.fallback.generate(requests, variant, on_finish)
        # The run stores these rows as batch-invariant ones (run.predict.store_key): one row
        # per call, since the batched engine's padding and batch reach a row's bf16 tokens.
        out: dict[Any, str] = {}
        for request in requests:
            out.update(self.fallback.generate([request], variant, on_finish))
        return out

    def describe(self) -> dict[str, Any]:
        """The engine, and what its bf16 numbers depend on besides the inputs: the invariant
        mode and its shapes, the GPU model and the software versions (``invariant.environment``)."""
        from lavender_checks.engines.fast import invariant

        config = self.config or FastGenConfig()
        return {"name": self.name, "chunk_rows": self.chunk_rows, "fallbacks": list(self.fallbacks),
                "batch_invariant": config.invariant,
                "numerics": {"decode_rows": config.decode_rows, "prefill_rows": config.prefill_rows,
                             "prefill_bucket": config.prefill_bucket, "min_cache_len": config.min_cache_len,
                             "invariant_blas": config.invariant_blas} if config.invariant else None,
                # the generator's device: asking a lazy pair for its device would load the model
                "environment": invariant.environment(getattr(self._generator, "device", None))}

    def _generator_for(self, requests) -> tuple[Any, str | None]:
        """(the generator, None) when it can run ``requests``, else (None, why not)."""
        from lavender_checks.engines.fast.engine import fast_generator_for_pair
        from lavender_checks.engines.fast.rules import UnsupportedGenerationSetting

        # Keyed by the greedy config as the batched engine would use it now: a config
        # changed after the generator was built must not be ignored.
        wanted = json.dumps(pair_greedy_settings(self.pair).generation_config.to_dict(), sort_keys=True,
                            default=str)
        if self._built_for != wanted:
            self._generator, self._refusal, self._built_for = None, None, wanted
            try:
                self._generator = fast_generator_for_pair(self.pair, self.config)
            except UnsupportedGenerationSetting as exc:
                self._refusal = str(exc)
        if self._generator is None:
            return None, self._refusal
        for request in requests:
            if len(request.images) != 1:
                return None, (f"request {request.key!r} has {len(request.images)} images; the fast "
                              "engine takes exactly one image per request")
        return self._generator, None

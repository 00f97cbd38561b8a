"""The part of transformers' logits processing that greedy ``generate`` applies, per row.

Pure Python (``GenerationConfig`` is read, no tensors): the runner turns the per-row answers
into its suppress/decay buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

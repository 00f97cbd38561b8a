"""The text VLMEvalKit's ``llama_vision`` wrapper gives the processor, and what it keeps of
the generated text.

Reproduced deliberately, as VLMEvalKit does it (reference revision e8e78f05):
* the prompt is either the wrapper's template (DocVQA, ChartQA) or the dataset's prompt
  (MMBench, MME), as the run profile says;
* one user turn holds the text and one image, in the profile's order: the wrapper's own
  prompts put the text first (since 2025-07-10), dataset prompts put the image first;
* the chat template is applied with ``add_generation_prompt=True`` and nothing else;
* only ``<|eot_id|>`` is removed from the decoded output, and nothing is stripped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lavender_checks.benchmarks import Benchmark, get_benchmark
from lavender_checks.profiles import QUESTION_FIELD, Profile

EOT = "<|eot_id|>"


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt text, without chat markup
    image_first: bool  # the image comes before the text in the user turn


def build_prompt(benchmark: Benchmark | str, row: Mapping[str, Any], profile: Profile) -> Prompt:
    """The prompt for one TSV row under ``profile``."""
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    prompting = profile.for_benchmark(bench.name)
    if prompting.source == "dataset":
        text = bench.dataset_prompt(row)
    else:
        if "question" not in row:
            raise KeyError(
                f"{bench.name} row {_row_label(row)}: no 'question' column, which the "
                f"template of profile {profile.name!r} needs"
            )
        # str.replace, not str.format: questions may hold braces. A NaN cell becomes 'nan',
        # as VLMEvalKit's f-string would make it.
        text = prompting.template.replace(QUESTION_FIELD, _cell_text(row["question"]))
    return Prompt(text=text, image_first=prompting.image_first)


def messages(prompt: Prompt) -> list[dict[str, Any]]:
    """VLMEvalKit's single user turn: text and image parts in the prompt's order."""
    text_part = {"type": "text", "text": prompt.text}
    image_part = {"type": "image"}
    content = [image_part, text_part] if prompt.image_first else [text_part, image_part]
    return [{"role": "user", "content": content}]


def chat_text(processor: Any, prompt: Prompt) -> str:
    """The chat-template text the processor tokenizes (``add_generation_prompt=True``)."""
    text = processor.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def postprocess(decoded: str) -> str:
    """VLMEvalKit's post-processing: remove ``<|eot_id|>`` only; no strip (deliberate)."""
    return decoded.replace(EOT, "")


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


def _cell_text(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def _row_label(row: Mapping[str, Any]) -> str:
    index = row.get("index") if hasattr(row, "get") else None
    return repr(index) if index is not None else "(no index)"

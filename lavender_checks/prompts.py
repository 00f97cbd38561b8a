"""The text VLMEvalKit's ``llama_vision`` wrapper gives the processor, and what it keeps of
the generated text.

Reproduced deliberately, as VLMEvalKit does it (reference revision e8e78f05):
* the prompt is either the wrapper's template (DocVQA, ChartQA) or the dataset's prompt
  (MMBench, MME), as the run profile says;
* one user turn holds the text and one image, in the profile's order: the wrapper's own
  prompts put the text first (since 2025-07-10), dataset prompts put the image first;
* the chat template is applied with ``add_generation_prompt=True`` and nothing else;
* the decoded output is VLMEvalKit's (``engines.request.decode_output``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lavender_checks.benchmarks import Benchmark, get_benchmark
from lavender_checks.profiles import QUESTION_FIELD, Profile


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


def _cell_text(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def _row_label(row: Mapping[str, Any]) -> str:
    index = row.get("index") if hasattr(row, "get") else None
    return repr(index) if index is not None else "(no index)"

"""Helpers for the model tests: requests of mixed lengths, and an independent
one-sample-at-a-time reference written the way VLMEvalKit's ``llama_vision`` generates.
The tiny checkpoints and pairs are session fixtures in ``tests/conftest.py``."""

from __future__ import annotations

import random
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------
# Requests

QUESTION_WORDS = (
    "what is the total amount shown in the document which year has the highest value "
    "is there a dog in this image please answer yes or no how many bars are there"
).split()


def sample_image(seed: int):
    """A small deterministic image of seed-dependent size (1 to 4 tiles) and colours."""
    from PIL import Image

    rng = random.Random(seed)
    width, height = rng.randint(30, 240), rng.randint(30, 240)
    image = Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
    image.paste(tuple(rng.randint(0, 255) for _ in range(3)), (0, 0, width // 2, height // 3))
    return image


def chat(processor, question: str, image_first: bool) -> str:
    content = [{"type": "text", "text": question}, {"type": "image"}]
    if image_first:
        content.reverse()
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_requests(processor, count: int, *, seed: int = 0, max_new_tokens=(24,)):
    """``count`` requests with questions of 3 to 40 words, both message orders, one image each."""
    from lavender_checks.engines.request import GenerationRequest

    rng = random.Random(seed)
    requests = []
    for i in range(count):
        question = " ".join(rng.choice(QUESTION_WORDS) for _ in range(rng.randint(3, 40))) + "?"
        requests.append(
            GenerationRequest(
                key=f"q{i:03d}",
                text=chat(processor, question, image_first=bool(i % 2)),
                images=[sample_image(seed * 1000 + i)],
                max_new_tokens=max_new_tokens[i % len(max_new_tokens)],
            )
        )
    return requests


# ---------------------------------------------------------------------------------------
# The one-sample reference


@dataclass
class ReferenceOutput:
    prediction: str
    token_ids: list[int]
    min_margin: float  # smallest top-1 minus top-2 logit gap along the greedy path


def vlmevalkit_single(pair, request, variant: str) -> ReferenceOutput:
    """One request alone, as VLMEvalKit's llama_vision runs it (batch 1, no padding):
    ``processor(images, text)``, greedy ``generate``, decode the new tokens, drop <|eot_id|>."""
    import torch

    processor = pair.processor
    inputs = processor(images=[list(request.images)], text=[request.text], return_tensors="pt").to(pair.device)
    with pair.variant(variant) as model, torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=request.max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    margins = [float(top[0] - top[1]) for top in (step[0].float().topk(2).values for step in out.scores)]
    prediction = processor.decode(new).replace("<|eot_id|>", "")
    return ReferenceOutput(prediction, new, min(margins) if margins else float("inf"))


def assert_matches_reference(predictions: dict, references: dict, *, tie_tolerance: float, min_decisive: float = 0.8):
    """Every prediction whose reference path has no near-tie must equal the reference exactly.

    A near-tie (a top-2 logit gap below ``tie_tolerance`` somewhere on the reference's greedy
    path) may flip under legitimate floating-point differences between batched and single
    runs; such rows are not compared, but they must stay a minority.
    """
    decisive = {key for key, ref in references.items() if ref.min_margin > tie_tolerance}
    assert len(decisive) >= min_decisive * len(references), (
        f"only {len(decisive)} of {len(references)} reference paths are free of near-ties"
    )
    wrong = {key: (predictions[key], references[key].prediction) for key in decisive if predictions[key] != references[key].prediction}
    assert not wrong, f"batched predictions differ from one-sample generation: {wrong}"


def lazily_opened(requests, opened: list):
    """``requests`` with each image replaced by a loader that appends the request's key to
    ``opened`` when called (to see when an engine opens images)."""
    from lavender_checks.engines.request import GenerationRequest

    def loader(request):
        def load():
            opened.append(request.key)
            return request.images[0]
        return load

    return [GenerationRequest(key=r.key, text=r.text, images=[loader(r)], max_new_tokens=r.max_new_tokens)
            for r in requests]

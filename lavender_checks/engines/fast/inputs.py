"""CPU side of the fast engine: requests -> token ids, image identities and image tensors.

Runs on the engine's thread pool, ahead of the GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from lavender_checks.engines.fast.scheduler import Row


@dataclass
class EncodedImage:
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


def encode_image(processor: Any, image: Any) -> EncodedImage:
    """The processor's image tensors for one image (tiles padded to the maximum)."""
    out = processor.image_processor(images=[[image]], return_tensors="pt")
    num_tiles = out["num_tiles"]
    return EncodedImage(
        pixel_values=out["pixel_values"],
        aspect_ratio_ids=out["aspect_ratio_ids"],
        aspect_ratio_mask=out["aspect_ratio_mask"],
        num_tiles=int(num_tiles[0][0]),
    )


def load_and_encode(processor: Any, image: Any) -> EncodedImage:
    """``encode_image`` of an image or of what a zero-argument loader returns."""
    return encode_image(processor, image() if callable(image) else image)


def request_parts(request: Any) -> tuple[Any, str, Any, int, str | None]:
    images = list(request.images)
    if len(images) != 1:
        raise ValueError(f"request {request.key!r}: the fast path takes exactly one image per request, "
                         f"got {len(images)}")
    image_key = getattr(request, "image_key", None)
    return request.key, request.text, images[0], int(request.max_new_tokens), image_key


def prepare_rows(requests, pool, processor: Any, add_special_tokens: bool,
                 image_token_id: int) -> tuple[list[Row], dict[str, Any]]:
    """The rows of ``requests`` (tokenized on ``pool``) and, per image group, the image or
    loader of its first row: what the vision tower encodes."""

    def prepare(position_request):
        position, request = position_request
        key, text, image, max_new, image_key = request_parts(request)
        ids = encode_text(processor, text, add_special_tokens)
        where = [i for i, t in enumerate(ids) if t == image_token_id]
        if len(where) != 1:
            raise ValueError(f"request {key!r}: the prompt must hold exactly one image token, "
                             f"found {len(where)}")
        if image_key is not None:
            group = f"key:{image_key}"  # the caller vouches for identical pixels
        else:
            # A loader is called again when its image is encoded: holding every opened
            # image of a whole benchmark would not fit in memory.
            group = image_digest(image() if callable(image) else image)
        return Row(position, key, ids, where[0], group, max_new), image

    prepared = list(pool.map(prepare, enumerate(requests)))
    rows = [row for row, _ in prepared]
    first_images: dict[str, Any] = {}
    for row, image in prepared:
        first_images.setdefault(row.image, image)
    return rows, first_images

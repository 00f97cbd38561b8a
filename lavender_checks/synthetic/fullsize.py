"""Llama-3.2-11B-Vision-Instruct's architecture with random weights, and a random Lavender-like
LoRA over it: real compute and memory for speed and memory tests, no weights to download.

The processor uses the real 560-pixel tiles and the tiny tokenizer; the config's special
token ids (BOS, EOS, pad, image) are set to that tokenizer's ids while the vocabulary stays
at 128256 rows, so the embedding and ``lm_head`` cost what they cost in the real model.
Random weights never choose EOS on their own: a generation runs to ``max_new_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lavender_checks.synthetic.tiny import build_tiny_processor, special_token_ids, wrap_with_random_lora

if TYPE_CHECKING:

    from lavender_checks.model import ModelPair

# Llama-3.2-11B-Vision-Instruct's config.json, as the fields transformers reads: data, kept
# beside this module.
_ARCHITECTURE = json.loads(Path(__file__).with_name("llama-3.2-11b-vision.json").read_text())
VISION: dict = _ARCHITECTURE["vision_config"]
TEXT: dict = _ARCHITECTURE["text_config"]
IMAGE_TOKEN_INDEX: int = _ARCHITECTURE["image_token_index"]
TILE_SIZE: int = _ARCHITECTURE["tile_size"]


def fullsize_config(token_ids: dict | None = None):
    """``MllamaConfig`` of Llama-3.2-11B-Vision-Instruct; ``token_ids`` overrides the special ids
    (keys as ``tiny.special_token_ids`` returns them)."""
    from transformers import MllamaConfig

    text = json.loads(json.dumps(TEXT))  # a deep copy: the module's dict stays as read
    image_token_index = IMAGE_TOKEN_INDEX
    if token_ids is not None:
        text.update(
            bos_token_id=token_ids["bos_token_id"],
            eos_token_id=token_ids["eos_token_id"],
            pad_token_id=token_ids["pad_token_id"],
        )
        image_token_index = token_ids["image_token_index"]
    return MllamaConfig(vision_config=json.loads(json.dumps(VISION)), text_config=text, image_token_index=image_token_index)


def fullsize_processor():
    """``MllamaProcessor`` with 560-pixel tiles (as the real one) and the tiny tokenizer."""
    return build_tiny_processor(TILE_SIZE)


def build_random_fullsize(device, dtype=None, seed: int = 0, processor=None):
    """The full-size model with random weights, built directly on ``device`` in ``dtype``.

    With ``processor`` the config's special token ids are the processor tokenizer's.
    Parameters are created on the device (no CPU copy) and initialised there.
    """
    import torch
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    dtype = dtype if dtype is not None else torch.bfloat16
    device = torch.device(device)
    ids = special_token_ids(processor.tokenizer) if processor is not None else None
    config = fullsize_config(ids)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = MllamaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    text = config.text_config
    # As the real generation_config.json (sampling defaults included; generation switches to greedy).
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    return model


def random_lavender_adapter(model, r: int = 8, alpha: int = 32, targets=("q_proj", "v_proj"), seed: int = 0, b_std: float = 0.02):
    """Wrap ``model`` in a peft LoRA over every ``targets`` module (vision tower included),
    with random, non-zero B (peft initialises B to zero)."""
    lora = dict(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return wrap_with_random_lora(model, lora, seed, b_std).eval()


def fullsize_pair(device=None, dtype=None, seed: int = 0, with_adapter: bool = True,
                  lora: dict | None = None, attn: str | None = None) -> "ModelPair":
    """A ``ModelPair`` of the random full-size model (and a random LoRA), ready to generate.

    ``lora``: ``r``, ``lora_alpha`` and ``target_modules`` of the random adapter (default the
    Lavender authors' r=8, alpha 32 on every q_proj/v_proj). ``attn``: the model's attention
    implementation (default transformers')."""
    from lavender_checks.model import ModelPair, count_by_tower, lora_module_names, resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    processor = fullsize_processor()
    processor.tokenizer.padding_side = "left"
    model = build_random_fullsize(device, dtype, seed, processor)
    if attn and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    pair = ModelPair(
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        base_path=None,
        base_fingerprint=f"random-fullsize-seed{seed}",
    )
    if with_adapter:
        lora = lora or {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
        targets = list(lora["target_modules"])
        pair.model = random_lavender_adapter(model, r=lora["r"], alpha=lora["lora_alpha"], targets=targets,
                                             seed=seed + 1)
        pair.adapter_fingerprint = (f"random-lora-r{lora['r']}-a{lora['lora_alpha']}-"
                                    f"{'-'.join(targets)}-seed{seed + 1}")
        pair.adapter_key_layout = "current"
        names = lora_module_names(pair.model)
        pair.lora_modules_applied = len(names)
        pair.lora_modules_by_tower = count_by_tower(names)
    for param in pair.model.parameters():
        param.requires_grad_(False)
    return pair


__all__ = [
    "build_random_fullsize",
    "fullsize_config",
    "fullsize_pair",
    "fullsize_processor",
    "random_lavender_adapter",
]

"""The fast runner gives exactly the greedy tokens of plain one-sample ``generate`` (tiny
model, CPU), whatever its scheduling: slots reused, rows sharing images, key-length buckets
crossed, EOS reached or forced off, base and Lavender from one weight copy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from lavender_checks.engines.fast.config import FastGenConfig
from lavender_checks.engines.fast.engine import FastGenerator, fast_generator_for_pair
from lavender_checks.engines.fast.inputs import encode_image, encode_text, image_digest
from lavender_checks.engines.fast.rules import GreedyRules, UnsupportedGenerationSetting
from lavender_checks.engines.request import GenerationRequest, decode_output
from lavender_checks.engines.request import pair_greedy_settings as _greedy_settings
from lavender_checks.prompts import Prompt, chat_text

TILE = 56  # the tiny processor's tile size


@pytest.fixture(scope="module")
def pair():
    from lavender_checks.model import load_pair
    from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

    paths = ensure_tiny_checkpoints()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split
    try:
        yield load_pair(paths.base, paths.adapter, device="cpu")
    finally:
        torch.set_num_threads(threads)


def noise_image(rows: int, cols: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (rows * 7, cols * 7, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").resize((cols * TILE, rows * TILE), Image.NEAREST)


WORDS = "what is the total value shown in this chart image please answer yes or no".split()


def make_requests(processor, n: int, seed: int = 0, budget=(1, 40)) -> list[GenerationRequest]:
    """Text-first and image-first prompts of varied length; images of 1-4 tiles, some rows
    sharing an image (separate but identical PIL objects, as the runner loads them)."""
    rng = np.random.default_rng(seed)
    layouts = [(1, 1), (1, 2), (2, 2), (1, 3)]
    requests = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 30))))
        text = chat_text(processor, Prompt(text=question, image_first=bool(i % 2)))
        image_id = i // 3 if i < 9 else i  # rows 0-8: three rows per image
        rows, cols = layouts[image_id % 4]
        requests.append(GenerationRequest(key=f"r{i}", text=text, images=[noise_image(rows, cols, image_id)],
                                          max_new_tokens=int(rng.integers(*budget))))
    return requests


def one_sample(pair, requests, variant, config):
    """Plain ``generate`` one request at a time: the reference."""
    out = {}
    with pair.variant(variant) as model, torch.inference_mode():
        for r in requests:
            inputs = pair.processor(images=[list(r.images)], text=[r.text], return_tensors="pt")
            cfg = copy.deepcopy(config)
            cfg.max_new_tokens = r.max_new_tokens
            if cfg.min_new_tokens:
                cfg.min_new_tokens = r.max_new_tokens
            generated = model.generate(**inputs, generation_config=cfg)
            out[r.key] = generated[0, inputs["input_ids"].shape[1]:].tolist()
    return out


def fast_for(pair, config, **knobs) -> FastGenerator:
    return FastGenerator(pair.model, pair.processor, variant_context=pair.variant, generation_config=config,
                         config=FastGenConfig(**knobs))


def test_inputs_are_the_processors(pair):
    processor = pair.processor
    for request in make_requests(processor, 6, seed=3):
        image = request.images[0]
        whole = processor(images=[[image]], text=[request.text], return_tensors="pt")
        assert encode_text(processor, request.text, True) == whole["input_ids"][0].tolist()
        encoded = encode_image(processor, image)
        assert torch.equal(encoded.pixel_values, whole["pixel_values"])
        assert torch.equal(encoded.aspect_ratio_ids, whole["aspect_ratio_ids"])
        assert torch.equal(encoded.aspect_ratio_mask, whole["aspect_ratio_mask"])
        # the processor's cross-attention mask opens exactly num_tiles tiles after <|image|>
        assert int(whole["cross_attention_mask"][0, -1, 0].sum()) == encoded.num_tiles


def test_image_digest_is_about_pixels():
    a, b = noise_image(1, 2, 5), noise_image(1, 2, 5)
    assert a is not b and image_digest(a) == image_digest(b)
    assert image_digest(noise_image(1, 2, 6)) != image_digest(a)
    assert image_digest(noise_image(2, 1, 5)) != image_digest(a)


@pytest.mark.parametrize("variant", ["base", "lavender"])
def test_same_tokens_as_one_sample_generate(pair, variant):
    config = copy.deepcopy(_greedy_settings(pair).generation_config)
    requests = make_requests(pair.processor, 14, seed=3)
    expected = one_sample(pair, requests, variant, config)
    # 3 slots for 14 rows: rows wait, enter freed slots, and cross the 16/32/64 key buckets.
    fast = fast_for(pair, config, max_slots=3, vision_batch=2, min_bucket=16, min_cache_len=16)
    got = fast.generate_ids(requests, variant)
    assert got == expected
    stats = fast.last_stats
    assert stats.images == len({image_digest(r.images[0]) for r in requests}) == 8
    assert stats.rows_sharing_image == 6
    assert stats.new_tokens == sum(len(v) for v in expected.values())
    # the model really stops on EOS here (the tiny config aims <|eot_id|> at the mean state)
    eos = set(_greedy_settings(pair).eos_ids)
    assert any(tokens[-1] in eos for tokens in expected.values())


def test_forced_lengths_and_all_rows_in_one_batch(pair):
    """EOS made impossible (min_new_tokens, as the benchmark forces lengths): every row runs to
    its budget, across buckets, with every row admitted at once."""
    config = copy.deepcopy(_greedy_settings(pair).generation_config)
    config.min_new_tokens = 1 << 30
    requests = make_requests(pair.processor, 8, seed=2, budget=(20, 70))
    expected = one_sample(pair, requests, "lavender", config)
    got = fast_for(pair, config, max_slots=64, min_bucket=32, min_cache_len=32).generate_ids(requests, "lavender")
    assert got == expected
    assert {k: len(v) for k, v in got.items()} == {r.key: r.max_new_tokens for r in requests}


def test_text_and_on_batch_follow_the_suite(pair):
    settings = _greedy_settings(pair)
    requests = make_requests(pair.processor, 7, seed=4)
    # lazy images (a loader per row) give the same result as opened ones
    lazy = [GenerationRequest(key=r.key, text=r.text, images=[(lambda im=r.images[0]: im)],
                              max_new_tokens=r.max_new_tokens) for r in requests]
    fast = fast_generator_for_pair(pair, FastGenConfig(max_slots=2))
    reported: list[tuple[str, str]] = []
    texts = fast.generate(lazy, "lavender", on_finish=reported.extend)
    expected_ids = one_sample(pair, requests, "lavender", settings.generation_config)
    expected = {k: decode_output(pair.processor, ids, settings.eos_ids) for k, ids in expected_ids.items()}
    assert texts == expected
    assert list(texts) == [r.key for r in requests]  # request order
    assert sorted(k for k, _ in reported) == sorted(expected) and dict(reported) == expected


def test_base_differs_from_lavender(pair):
    config = copy.deepcopy(_greedy_settings(pair).generation_config)
    config.min_new_tokens = 1 << 30
    requests = make_requests(pair.processor, 4, seed=5, budget=(12, 13))
    fast = fast_for(pair, config)
    assert fast.generate_ids(requests, "base") != fast.generate_ids(requests, "lavender")


def test_bad_requests_are_refused(pair):
    config = _greedy_settings(pair).generation_config
    fast = fast_for(pair, config)
    good = make_requests(pair.processor, 2)
    two = GenerationRequest(key="two", text=good[0].text, images=[good[0].images[0]] * 2, max_new_tokens=3)
    with pytest.raises(ValueError, match="'two'.*exactly one image"):
        fast.generate_ids([two], "base")
    no_token = GenerationRequest(key="plain", text="no image token here", images=good[0].images, max_new_tokens=3)
    with pytest.raises(ValueError, match="'plain'.*one image token"):
        fast.generate_ids([no_token], "base")
    # The batched engine's checks (engines.request.check_requests), before any work.
    with pytest.raises(ValueError, match=r"duplicate request keys: \['r0'\]"):
        fast.generate_ids([good[0], good[0]], "base")
    none = GenerationRequest(key="none", text=good[0].text, images=good[0].images, max_new_tokens=0)
    with pytest.raises(ValueError, match="'none': max_new_tokens must be at least 1, got 0"):
        fast.generate_ids([none], "base")


def test_greedy_rules():
    from transformers import GenerationConfig

    rules = GreedyRules.from_generation_config(
        GenerationConfig(eos_token_id=[7, 9], exponential_decay_length_penalty=(10, 1.15), min_new_tokens=2))
    assert rules.eos_ids == (7, 9)
    assert rules.decay_multiplier(10) == 0.0
    assert rules.decay_multiplier(12) == pytest.approx(1.15**2 - 1)
    assert rules.suppress_eos(prompt_len=30, generated=1) and not rules.suppress_eos(prompt_len=30, generated=2)
    with pytest.raises(UnsupportedGenerationSetting, match="repetition_penalty"):
        GreedyRules.from_generation_config(GenerationConfig(eos_token_id=1, repetition_penalty=1.2))
    with pytest.raises(UnsupportedGenerationSetting, match="greedily"):
        GreedyRules.from_generation_config(GenerationConfig(do_sample=True))
    # without EOS ids the length rules have nothing to act on
    assert not GreedyRules.from_generation_config(GenerationConfig(min_new_tokens=5)).suppresses


def test_split_vision_attention_and_linear_buckets_keep_the_tokens(pair, monkeypatch):
    """The split vision attention (no bias tensor) and linear key buckets change kernels, not
    results; the split function must really be the one the vision tower calls."""
    from lavender_checks.engines.fast import mllama as fastgen

    calls = []
    real = fastgen.split_vision_attention
    monkeypatch.setattr(fastgen, "split_vision_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = copy.deepcopy(_greedy_settings(pair).generation_config)
    requests = make_requests(pair.processor, 10, seed=3)
    expected = one_sample(pair, requests, "lavender", config)
    fast = fast_for(pair, config, max_slots=4, min_bucket=16, min_cache_len=16, bucket_growth="linear",
                    vision_attention="split")
    assert fast.generate_ids(requests, "lavender") == expected
    vision = pair.base_model.model.vision_model
    layers = vision.config.num_hidden_layers + vision.config.num_global_layers
    assert calls and len(calls) % layers == 0  # every layer of every vision call went through it
    assert vision.config._attn_implementation != fastgen.SPLIT_VISION_ATTENTION  # restored


def test_split_vision_attention_is_the_masked_attention():
    """Against transformers' eager attention with Mllama's padding mask, on random data."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    from lavender_checks.engines.fast.mllama import _PAD_SPLITS, split_vision_attention

    torch.manual_seed(0)
    tiles, patches, padded = 4, 5, 8  # 5 real patches per tile padded to 8
    ratio_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mask = _prepare_aspect_ratio_attention_mask(ratio_mask, patches, padded, torch.float32)
    q, k, v = (torch.randn(2, 3, tiles * padded, 16) for _ in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1)
    reference = (weights @ v).transpose(1, 2)
    _PAD_SPLITS.clear()
    got, _ = split_vision_attention(None, q, k, v, mask, scaling=0.25)
    _PAD_SPLITS.clear()
    assert torch.allclose(got, reference, atol=1e-5)
    assert not torch.allclose(got, torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1).matmul(v).transpose(1, 2), atol=1e-3)


def test_one_greedy_config_for_every_engine(pair):
    """The fast engine's default config and the speed bench's are the batched engine's
    (``greedy_settings``): the same settings, and the same tokens on both engines."""
    from lavender_checks.engines.fast.mllama import unwrap
    from lavender_checks.speed.subject import FORCE_NEVER_EOS, _greedy_config

    settings = _greedy_settings(pair)
    default = FastGenerator(pair.model, pair.processor, variant_context=pair.variant)
    assert default.rules == GreedyRules.from_generation_config(settings.generation_config)
    assert _greedy_config(pair.model, pair.processor, False).to_dict() == settings.generation_config.to_dict()
    forced = _greedy_config(pair.model, pair.processor, True)
    assert forced.min_new_tokens == FORCE_NEVER_EOS
    forced.min_new_tokens = settings.generation_config.min_new_tokens
    assert forced.to_dict() == settings.generation_config.to_dict()
    # A checkpoint whose config names no EOS: every engine stops at <|eot_id|>, as generate does.
    checkpoint = unwrap(pair.model).generation_config
    saved = checkpoint.eos_token_id
    checkpoint.eos_token_id = None
    try:
        eos = _greedy_settings(pair).eos_ids
        assert eos and set(FastGenerator(pair.model, pair.processor).rules.eos_ids) == set(eos)
        assert _greedy_config(pair.model, pair.processor, False).eos_token_id in eos
    finally:
        checkpoint.eos_token_id = saved
    # Sampling fields left unset (the bench's former config) or neutral (greedy_settings):
    # greedy decoding does not read them, on either engine.
    unset = copy.deepcopy(settings.generation_config)
    for name in ("temperature", "top_p", "top_k"):
        setattr(unset, name, None)
    requests = make_requests(pair.processor, 4, seed=6)
    expected = one_sample(pair, requests, "lavender", settings.generation_config)
    assert one_sample(pair, requests, "lavender", unset) == expected
    assert fast_for(pair, unset).generate_ids(requests, "lavender") == expected

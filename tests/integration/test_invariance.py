"""Batch invariance of the fast engine on the tiny pair (CPU), in float32 and bfloat16: each
row's greedy token ids are those of the row run alone, whatever else is run with it, in what
order, in how many slots, in which chunks or shards. Lengths are forced (EOS off) so every
row decodes its whole budget next to rows that come and go.

The kill-and-resume side (the prediction store, real processes) is in
tests/integration/test_resume_after_kill.py."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lavender_checks.engines.fast.config import FastGenConfig
from lavender_checks.engines.fast.engine import FastGenerator
from lavender_checks.engines.fast.scheduler import pack_groups
from lavender_checks.engines.request import GenerationRequest
from lavender_checks.engines.request import pair_greedy_settings as _greedy_settings
from tests.helpers import make_requests, sample_image

pytestmark = pytest.mark.slow

ROWS = 16
DECODE_ROWS = 16  # small, so the tiny model's every decode step stays cheap on CPU


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request, tiny_checkpoints):
    from lavender_checks.model import load_pair

    return load_pair(tiny_checkpoints.base, tiny_checkpoints.adapter, device="cpu",
                     dtype=getattr(torch, request.param))


@pytest.fixture(scope="module")
def forced(pair):
    """The suite's greedy config with EOS made impossible: every row runs its whole budget."""
    config = copy.deepcopy(_greedy_settings(pair).generation_config)
    config.min_new_tokens = 1 << 30
    return config


@pytest.fixture(scope="module")
def requests(pair):
    """Rows of varied prompt length and budget (3 to 40 new tokens); rows 0-5 share two images
    (three rows each, as DocVQA asks about one page), the others have their own."""
    made = make_requests(pair.processor, ROWS, seed=11)
    rng = random.Random(5)
    out = []
    for i, r in enumerate(made):
        image_id = i // 3 if i < 6 else i
        out.append(GenerationRequest(key=r.key, text=r.text, images=[sample_image(1000 + image_id)],
                                     max_new_tokens=rng.randint(3, 40), image_key=f"img{image_id}"))
    return out


def engine(pair, config, **knobs) -> FastGenerator:
    knobs = {"decode_rows": DECODE_ROWS, "max_slots": DECODE_ROWS, "prep_threads": 1, **knobs}
    return FastGenerator(pair.model, pair.processor, variant_context=pair.variant,
                         generation_config=config, config=FastGenConfig(**knobs))


def run_chunks(fast, chunks, variant) -> dict:
    out = {}
    for chunk in chunks:
        out.update(fast.generate_ids(chunk, variant))
    return out


def shards(requests, count: int) -> list[list[GenerationRequest]]:
    """Whole images to shards, as the gate's ``subset`` hands them out (round robin here)."""
    groups = pack_groups(requests, lambda r: r.image_key, 1)
    return [[r for g in groups[i::count] for r in g] for i in range(count)]


@pytest.fixture(scope="module", params=["base", "lavender"])
def alone(request, pair, forced, requests):
    """The reference: every row through the engine alone."""
    variant = request.param
    fast = engine(pair, forced)
    return variant, {k: v for r in requests for k, v in fast.generate_ids([r], variant).items()}


CONFIGS = {
    "default": lambda rs: [rs],
    "reversed": lambda rs: [rs[::-1]],
    "shuffled": lambda rs: [random.Random(3).sample(rs, len(rs))],
    "shards 0/2 + 1/2": lambda rs: shards(rs, 2),
    "shards 0/4 .. 3/4": lambda rs: shards(rs, 4),
    "chunks of 4 rows": lambda rs: pack_groups(rs, lambda r: r.image_key, 4),
    "chunks of 7 rows": lambda rs: pack_groups(rs, lambda r: r.image_key, 7),
}


@pytest.mark.parametrize("how", list(CONFIGS))
def test_every_row_as_if_alone(pair, forced, requests, alone, how):
    variant, reference = alone
    got = run_chunks(engine(pair, forced), CONFIGS[how](requests), variant)
    assert got.keys() == reference.keys()
    differing = sorted(k for k in reference if got[k] != reference[k])
    assert not differing, f"{how}: rows {differing} differ from the row run alone"
    assert {k: len(v) for k, v in got.items()} == {r.key: r.max_new_tokens for r in requests}


@pytest.mark.parametrize("knobs", [
    {"max_slots": 1}, {"max_slots": 3}, {"max_slots": 5, "admit_fraction": 0.5},
    {"vision_batch": 3, "max_prefill_tokens": 64}, {"min_bucket": 16, "bucket_growth": "double"},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_slots_and_scheduling_knobs_do_not_change_a_row(pair, forced, requests, alone, knobs):
    variant, reference = alone
    got = engine(pair, forced, **knobs).generate_ids(requests, variant)
    differing = sorted(k for k in reference if got[k] != reference[k])
    assert not differing, f"{knobs}: rows {differing} differ from the row run alone"


@pytest.mark.parametrize("numerics", [{"prefill_rows": 1}, {"prefill_rows": 3, "prefill_bucket": 16},
                                      {"decode_rows": 8, "max_slots": 8}], ids=str)
def test_other_numerics_settings_are_invariant_too(pair, forced, requests, numerics):
    """decode_rows, prefill_rows and prefill_bucket set the shapes every row is computed with
    (part of the numerics, like the dtype); under any of them a row still equals itself alone."""
    alone = engine(pair, forced, **numerics)
    reference = {k: v for r in requests for k, v in alone.generate_ids([r], "lavender").items()}
    got = run_chunks(engine(pair, forced, **{**numerics, "max_slots": 3}), shards(requests[::-1], 2), "lavender")
    assert got == reference


def test_same_tokens_as_one_sample_generate_in_float32(pair, requests):
    """Invariance does not cost exactness: on CPU in float32 the invariant engine still gives
    plain one-sample ``generate``'s tokens (EOS on, as the suite runs)."""
    if pair.dtype != torch.float32:
        pytest.skip("one-sample generate's tokens are the reference in float32")
    config = copy.deepcopy(_greedy_settings(pair).generation_config)
    got = engine(pair, config, max_slots=4).generate_ids(requests[:8], "lavender")
    with pair.variant("lavender") as model, torch.inference_mode():
        for r in requests[:8]:
            inputs = pair.processor(images=[list(r.images)], text=[r.text], return_tensors="pt")
            cfg = copy.deepcopy(config)
            cfg.max_new_tokens = r.max_new_tokens
            out = model.generate(**inputs, generation_config=cfg)
            assert got[r.key] == out[0, inputs["input_ids"].shape[1]:].tolist(), r.key


def test_invariant_mode_runs_rows_alone_and_whole_cache(pair, forced, requests):
    """What the mode does, as the stats show it: one prefill call per row (prefill_rows=1) and
    one vision call per image, decode over ``decode_rows`` rows and the whole cache."""
    fast = engine(pair, forced, max_slots=4, vision_batch=4, prefill_rows=1)
    fast.generate_ids(requests, "base")
    stats = fast.last_stats
    assert stats.invariant and stats.prefill_calls == len(requests)
    assert stats.images == len({r.image_key for r in requests})
    assert fast.runner.rows == DECODE_ROWS and fast.runner.slots == 4
    assert stats.cache_len == fast.config.min_cache_len
    throughput = engine(pair, forced, max_slots=4, invariant=False)
    throughput.generate_ids(requests, "base")
    assert not throughput.last_stats.invariant and throughput.runner.rows == 4
    assert throughput.last_stats.prefill_calls < len(requests)



def decode_cache_lengths(fast: FastGenerator) -> dict:
    """Record, per row key, the cache lengths of the decode steps that row took part in."""
    seen: dict = {}
    runner = fast.runner
    set_inputs, decode = runner.set_step_inputs, runner.decode
    running: list = []

    def recording_set_inputs(positions, rows):
        running[:] = [row.key for row in rows.values()]
        return set_inputs(positions, rows)

    def recording_decode(variant, length, stats):
        for key in running:
            seen.setdefault(key, set()).add(runner.cache_len)
        return decode(variant, length, stats)

    runner.set_step_inputs, runner.decode = recording_set_inputs, recording_decode
    return seen


def test_a_long_row_changes_the_shapes_of_no_other_row(pair, forced, requests):
    """A row needing more than ``min_cache_len`` positions is decoded with caches of its own
    length; the rows of its call, and of the calls after it, keep ``min_cache_len``, as in a
    run without it (a long row once grew the caches for the rest of the process)."""
    unit = 128
    assert max(len(pair.processor.tokenizer(r.text)["input_ids"]) + r.max_new_tokens for r in requests) < unit
    # It asks about the page of rows 0-2, so that page's features serve both cache lengths.
    long_row = GenerationRequest(key="long", text=requests[0].text, images=requests[0].images,
                                 max_new_tokens=unit, image_key=requests[0].image_key)
    reference = engine(pair, forced, min_cache_len=unit)
    alone = {k: v for r in requests for k, v in reference.generate_ids([r], "lavender").items()}
    fast = engine(pair, forced, min_cache_len=unit, max_slots=4)
    shapes = decode_cache_lengths(fast)
    together = fast.generate_ids([long_row, *requests[:8]], "lavender")
    assert fast.last_stats.images == len({r.image_key for r in requests[:8]})  # vision once per image
    after = fast.generate_ids(requests[8:], "lavender")
    assert shapes.pop("long") == {2 * unit}
    assert shapes == {r.key: {unit} for r in requests}, "a short row was decoded with the long row's caches"
    assert len(together.pop("long")) == unit
    assert {**together, **after} == alone
def test_decode_over_key_blocks_reads_buckets_and_keeps_every_row_as_if_alone(pair, forced, requests, alone,
                                                                               monkeypatch):
    """``decode_key_block``: decode reads key-length buckets of whole blocks (not the whole
    cache), a row's tokens are still those of the row alone (whose buckets are shorter), and in
    float32 they are the tokens of the whole-cache attention."""
    from lavender_checks.engines.fast import mllama

    variant, whole_cache = alone
    read: set[int] = set()
    blocked = mllama.attend_keys_blocked

    def spy(q, k, v, mask, scale, block):
        read.add(k.shape[2])
        return blocked(q, k, v, mask, scale, block)

    monkeypatch.setattr(mllama, "attend_keys_blocked", spy)
    single = engine(pair, forced, decode_key_block=16)
    reference = {k: v for r in requests for k, v in single.generate_ids([r], variant).items()}
    got = run_chunks(engine(pair, forced, decode_key_block=16, max_slots=3), shards(requests[::-1], 2), variant)
    assert read and all(n % 16 == 0 for n in read) and max(read) < single.config.min_cache_len
    assert len(read) > 1  # rows of different lengths: buckets of different sizes
    differing = sorted(k for k in reference if got[k] != reference[k])
    assert not differing, f"rows {differing} differ from the row run alone"
    if pair.dtype == torch.float32:
        assert reference == whole_cache

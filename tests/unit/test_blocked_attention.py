"""Decode attention over key blocks (engines/fast/mllama.attend_keys_blocked): the same
function as ``attend_keys``, and a row's result does not depend on the keys after its own."""

import pytest
import torch

from lavender_checks.engines.fast.mllama import attend_keys, attend_keys_blocked

ROWS, HEADS, KV_HEADS, DIM, BLOCK = 6, 8, 2, 16, 32
LENGTHS = torch.tensor([1, 5, 31, 32, 33, 96])  # inside, at and across block edges


def inputs(dtype, keys=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(ROWS, HEADS, 1, DIM, generator=gen).to(dtype)
    k = torch.randn(ROWS, KV_HEADS, keys, DIM, generator=gen).to(dtype)
    v = torch.randn(ROWS, KV_HEADS, keys, DIM, generator=gen).to(dtype)
    return q, k, v


def key_mask(length):
    return (torch.arange(length)[None, :] < LENGTHS[:, None])[:, None, None, :]


def test_float32_matches_attention_over_all_keys():
    q, k, v = inputs(torch.float32)
    for length in (96, 128):
        mask = key_mask(length)
        want = attend_keys(q, k[:, :, :length], v[:, :, :length], mask, 0.25)
        got = attend_keys_blocked(q, k[:, :, :length], v[:, :, :length], mask, 0.25, BLOCK)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_is_bit_for_bit_the_same_whatever_the_key_length_beyond_its_own(dtype):
    q, k, v = inputs(dtype)
    results = [attend_keys_blocked(q, k[:, :, :n], v[:, :, :n], key_mask(n), 0.25, BLOCK) for n in (96, 128)]
    assert torch.equal(results[0], results[1])
    # and a row whose keys fit one block reads the same from a one-block bucket
    short = LENGTHS <= BLOCK
    alone = attend_keys_blocked(q, k[:, :, :BLOCK], v[:, :, :BLOCK], key_mask(BLOCK), 0.25, BLOCK)
    assert torch.equal(alone[short], results[1][short])


def test_a_row_does_not_depend_on_the_other_rows_keys():
    q, k, v = inputs(torch.bfloat16)
    _, k2, v2 = inputs(torch.bfloat16, seed=1)
    k2[0], v2[0] = k[0], v[0]  # row 0 the same, every other row's keys and values new
    mask = key_mask(128)
    a = attend_keys_blocked(q, k, v, mask, 0.25, BLOCK)
    b = attend_keys_blocked(q, k2, v2, mask, 0.25, BLOCK)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])


def test_masked_keys_past_a_row_change_nothing_even_when_they_hold_extreme_values():
    q, k, v = inputs(torch.bfloat16)
    mask = key_mask(128)
    before = attend_keys_blocked(q, k, v, mask, 0.25, BLOCK)
    k[:, :, 96:], v[:, :, 96:] = 1e4, -1e4  # beyond every row's length
    assert torch.equal(attend_keys_blocked(q, k, v, mask, 0.25, BLOCK), before)


def test_a_key_length_that_is_not_whole_blocks_is_refused():
    q, k, v = inputs(torch.float32, keys=100)
    with pytest.raises(ValueError, match="not a multiple of the key block 32"):
        attend_keys_blocked(q, k, v, key_mask(100), 0.25, BLOCK)

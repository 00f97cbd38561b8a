"""The fast engine's cache sizing (engines/fast/memory.py): a share of the card's free memory."""

import pytest

from lavender_checks.engines.fast.config import GIB, FastGenConfig
from lavender_checks.engines.fast.memory import CONTEXT_RESERVE, check_share, memory_budget, plan

MODEL = 20 * GIB  # the bf16 pair with its LoRA, as the fast engine holds it
# one decode row's bf16 caches, full-size architecture: 8 KV heads x 128 x 2 (keys, values) x 2 bytes
# over 32 self-attention layers x 1,024 positions and 8 cross-attention layers x 6,404 vision tokens
SLOT = 4096 * (32 * 1024 + 8 * 6404)


def test_budget_is_what_the_process_holds_plus_a_share_of_the_free_memory():
    free = 100 * GIB
    assert memory_budget(free=free, in_use=MODEL, share=0.5) == MODEL + (free - CONTEXT_RESERVE) // 2


def test_the_default_share_gives_an_h100_about_the_budget_it_was_measured_with_and_an_h200_more():
    share = FastGenConfig().memory_share
    # free memory after loading the model: 79.1 GiB (H100 80GB) and 139.8 GiB (H200) less the model
    h100 = memory_budget(free=int(59.1 * GIB), in_use=MODEL, share=share)
    h200 = memory_budget(free=int(119.8 * GIB), in_use=MODEL, share=share)
    assert 68 * GIB < h100 <= 70.5 * GIB
    assert h200 > 115 * GIB
    # and the budget never reaches past what the card has
    assert h100 < MODEL + 59.1 * GIB and h200 < MODEL + 119.8 * GIB


def test_a_cap_limits_the_budget_and_only_when_it_is_lower():
    free = 119 * GIB
    assert memory_budget(free=free, in_use=MODEL, share=0.85, cap=70 * GIB) == 70 * GIB
    assert memory_budget(free=free, in_use=MODEL, share=0.1, cap=70 * GIB) < 70 * GIB


def test_a_busy_card_gives_less_and_a_full_one_nothing_beyond_what_is_held():
    assert memory_budget(free=10 * GIB, in_use=MODEL, share=0.85) < memory_budget(free=50 * GIB, in_use=MODEL,
                                                                                   share=0.85)
    assert memory_budget(free=0, in_use=MODEL, share=0.85) == MODEL


@pytest.mark.parametrize("share", [0.0, -0.1, 1.01, 2.0])
def test_a_share_outside_0_to_1_is_refused(share):
    with pytest.raises(ValueError, match="memory_share must be in"):
        check_share(share)
    with pytest.raises(ValueError, match="memory_share must be in"):
        memory_budget(free=GIB, in_use=0, share=share)


def test_plan_counts_the_rows_that_fit_after_the_workspace():
    sizing = plan(card_total=80 * GIB, free=int(59.1 * GIB), in_use=MODEL, share=0.85, cap=None,
                  workspace=10 * GIB, slot_bytes=SLOT)
    assert sizing.fit == (sizing.budget - MODEL - 10 * GIB) // SLOT
    assert 120 <= sizing.fit < 128  # the 125 slots of the H100 runs under a 70 GiB budget
    larger = plan(card_total=141 * GIB, free=int(119.8 * GIB), in_use=MODEL, share=0.85, cap=None,
                  workspace=10 * GIB, slot_bytes=SLOT)
    assert larger.fit > 250
    report = larger.as_dict()
    assert report["fit"] == larger.fit and report["share"] == 0.85 and report["cap_gib"] is None
    assert report["budget_gib"] == pytest.approx(larger.budget / GIB, abs=1e-3)


def test_plan_never_counts_negative_rows_and_refuses_an_empty_slot():
    tight = plan(card_total=80 * GIB, free=2 * GIB, in_use=MODEL, share=0.85, cap=None, workspace=10 * GIB,
                 slot_bytes=SLOT)
    assert tight.fit == 0
    with pytest.raises(ValueError, match="slot_bytes"):
        plan(card_total=GIB, free=GIB, in_use=0, share=0.5, cap=None, workspace=0, slot_bytes=0)

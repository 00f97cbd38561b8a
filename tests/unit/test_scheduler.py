"""The fast engine's scheduler, without a model or torch: admission into free slots, the
prefill token cap, finishing at EOS or the budget, images released with their last row, drain
accounting, reports, and chunks that never cut an image's rows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lavender_checks.engines.fast.scheduler import Row, Scheduler, pack_groups
from lavender_checks.engines.fast.stats import FastGenStats

EOS = 2


def rows(*specs) -> list[Row]:
    """Rows from (prompt length, budget, image) triples, keyed r0, r1, ..."""
    return [Row(position=i, key=f"r{i}", ids=[5] * length, image_pos=0, image=image, max_new=budget)
            for i, (length, budget, image) in enumerate(specs)]


def scheduler(waiting, slots=4, admit_fraction=0.5, max_prefill_tokens=1000):
    return Scheduler(waiting, slots, admit_fraction=admit_fraction, max_prefill_tokens=max_prefill_tokens,
                     eos_ids=[EOS], stats=FastGenStats())


def test_the_first_admission_fills_the_free_slots_lowest_first():
    s = scheduler(rows(*[(3, 5, "a")] * 6), slots=4)
    assert s.should_admit()
    admitted, slots = s.admit()
    assert [r.key for r in admitted] == ["r0", "r1", "r2", "r3"] and slots == [0, 1, 2, 3]
    assert s.waiting_rows == 2 and s.free == []


def test_the_prefill_token_cap_limits_an_admission_but_never_to_nothing():
    # rows are left-padded to the longest: 3 rows of 40 tokens = 120 > 100
    s = scheduler(rows((40, 5, "a"), (40, 5, "a"), (40, 5, "a")), slots=4, max_prefill_tokens=100)
    admitted, _ = s.admit()
    assert len(admitted) == 2
    alone = scheduler(rows((500, 5, "a")), max_prefill_tokens=100)
    assert len(alone.admit()[0]) == 1  # a row longer than the cap still goes, alone


def test_rows_finish_at_eos_or_their_budget_and_free_their_slot():
    s = scheduler(rows((3, 3, "a"), (3, 5, "a")), slots=2)
    admitted, slots = s.admit()
    assert s.started(admitted, slots, [7, 7]) == ["a"]  # no waiting row needs image "a" now
    assert s.positions == [3, 3]
    assert s.begin_step() == 4
    s.stepped([8, EOS])  # r1 stops at EOS (kept), r0 goes on
    assert s.finished == {"r1": [7, EOS]} and s.free == [1] and s.positions == [4, 0]
    s.begin_step()
    s.stepped([9, 0])  # r0 reaches its budget of 3
    assert s.finished["r0"] == [7, 8, 9] and s.done
    assert s.stats.new_tokens == 5 and s.stats.decode_steps == 2 and s.stats.slot_steps == 3


def test_a_first_token_that_ends_a_row_finishes_it_at_once():
    s = scheduler(rows((3, 1, "a"), (3, 9, "b")), slots=2)
    admitted, slots = s.admit()
    s.started(admitted, slots, [7, EOS])
    assert s.finished == {"r0": [7], "r1": [EOS]} and s.done and s.free == [0, 1]


def test_admission_waits_for_enough_free_slots_unless_nothing_runs_or_all_fit():
    s = scheduler(rows(*[(3, 9, "a")] * 8), slots=4, admit_fraction=0.5)  # admit at 2 free slots
    s.started(*s.admit(), [7] * 4)
    s.begin_step()
    s.stepped([EOS, 8, 8, 8])
    assert s.free == [0] and not s.should_admit()  # 1 free of 4: decode on
    s.begin_step()
    s.stepped([0, EOS, 8, 8])
    assert s.should_admit()
    admitted, slots = s.admit()
    assert [r.key for r in admitted] == ["r4", "r5"] and slots == [0, 1]
    s.started(admitted, slots, [7, 7])
    s.begin_step()
    s.stepped([8, 8, EOS, 8])
    assert s.waiting_rows == 2 and len(s.free) == 1
    assert not s.should_admit()  # two wait, one slot free, below the fraction
    s.begin_step()
    s.stepped([8, 8, 0, EOS])
    assert s.should_admit() and len(s.admit()[0]) == 2


def test_drain_steps_are_counted_from_the_last_admission():
    s = scheduler(rows((3, 3, "a"), (3, 4, "a"), (3, 2, "b")), slots=2)
    s.started(*s.admit(), [7, 7])
    assert not s.draining
    s.begin_step()
    s.stepped([8, 8])
    assert s.stats.drain_steps == 0
    s.begin_step()
    s.stepped([8, 8])  # r0 done (budget 3): a slot for r2
    s.started(*s.admit(), [7])
    assert s.draining and s.stats.drain_rows == 0
    s.begin_step()  # the first drain step: two rows in the batch
    s.stepped([8, 8])
    assert s.stats.drain_rows == 2 and s.stats.drain_steps == 1
    assert s.done and s.stats.decode_steps == 3


def test_an_image_is_released_with_its_last_admitted_row():
    s = scheduler(rows((3, 5, "a"), (3, 5, "b"), (3, 5, "b")), slots=2)
    admitted, slots = s.admit()
    assert s.started(admitted, slots, [7, 7]) == ["a"]  # "b" still has a waiting row
    s.begin_step()
    s.stepped([EOS, 8])
    admitted, slots = s.admit()
    assert s.started(admitted, slots, [7]) == ["b"]


def test_unreported_rows_are_handed_out_once():
    s = scheduler(rows((3, 1, "a"), (3, 1, "a")), slots=2)
    s.started(*s.admit(), [7, 8])
    assert s.unreported() == {"r0": [7], "r1": [8]}
    assert s.unreported() == {}
    assert s.finished == {"r0": [7], "r1": [8]}


def test_a_scheduler_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        scheduler(rows((3, 1, "a")), slots=0)


def test_chunks_never_cut_a_group_and_keep_first_appearance_order():
    items = ["a1", "b1", "a2", "c1", "b2", "a3", "d1"]
    chunks = pack_groups(items, lambda item: item[0], 4)
    assert chunks == [["a1", "a2", "a3"], ["b1", "b2", "c1", "d1"]]
    assert pack_groups(["a1", "a2", "a3", "b1"], lambda item: item[0], 2) == [["a1", "a2", "a3"], ["b1"]]
    assert pack_groups([], lambda item: item, 3) == []


def test_the_scheduler_imports_no_torch():
    code = ("import sys; import lavender_checks.engines.fast.scheduler, lavender_checks.engines.fast, "
            "lavender_checks.engines; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""Which rows the fast engine runs, and where: plain Python over row states, no tensors.

Rows wait in the order they were given (grouped by image), run in one of a fixed number of
decode slots, and finish at EOS or at their token budget, freeing their slot. Waiting rows
are admitted (prefilled) into free slots when enough of them are free (``admit_fraction``),
when nothing runs, or when every waiting row fits; an admission takes the lowest free slots
and stops at the prefill token cap (rows are left-padded to the longest one). Once the last
row is admitted the batch only drains: those steps are counted apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lavender_checks.engines.fast.stats import FastGenStats


@dataclass
class Row:
    """One request, tokenized."""

    position: int  # in the request list
    key: Any
    ids: list[int]
    image_pos: int  # index of <|image|> in ids: tokens from here on see the image
    image: str  # the image's group: "key:" + the request's image_key, or a digest of its pixels
    max_new: int
    out: list[int] = field(default_factory=list)  # generated so far


class Scheduler:
    """Waiting, running and finished rows of one ``generate`` call over ``slots`` slots.

    ``stats`` receives the decode accounting (steps, slot steps, drain, new tokens).
    """

    def __init__(self, rows: Sequence[Row], slots: int, *, admit_fraction: float, max_prefill_tokens: int,
                 eos_ids: Iterable[int], stats: FastGenStats | None = None):
        if slots < 1:
            raise ValueError(f"the scheduler needs at least one slot, got {slots}")
        self.waiting = list(rows)
        self.cursor = 0  # waiting[:cursor] have been admitted
        self.running: dict[int, Row] = {}  # slot -> row, in admission order
        self.free = list(range(slots))
        self.positions = [0] * slots  # per slot: where its next token goes in the cache
        self.finished: dict[Any, list[int]] = {}
        self._unreported: dict[Any, list[int]] = {}
        self.slots = slots
        self.admit_min = max(1, math.ceil(admit_fraction * slots))
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = frozenset(eos_ids)
        self.stats = stats if stats is not None else FastGenStats()
        self._uses: dict[str, int] = {}  # image -> rows not yet admitted
        for row in self.waiting:
            self._uses[row.image] = self._uses.get(row.image, 0) + 1
        self._drained = False

    # -- state ---------------------------------------------------------------------------

    @property
    def waiting_rows(self) -> int:
        return len(self.waiting) - self.cursor

    @property
    def done(self) -> bool:
        return not self.waiting_rows and not self.running

    @property
    def draining(self) -> bool:
        """Every row admitted: the decode steps from here on only empty the batch."""
        return not self.waiting_rows

    def should_admit(self) -> bool:
        """Prefill now rather than decode another step?"""
        waiting = self.waiting_rows
        return bool(waiting) and (len(self.free) >= self.admit_min or not self.running or len(self.free) >= waiting)

    # -- admission -----------------------------------------------------------------------

    def admit(self) -> tuple[list[Row], list[int]]:
        """The next rows to prefill and the slots they go to (the lowest free ones)."""
        self.free.sort()
        take = self._admission(len(self.free))
        rows = self.waiting[self.cursor:self.cursor + take]
        self.cursor += take
        return rows, [self.free.pop(0) for _ in rows]

    def _admission(self, free_slots: int) -> int:
        """How many waiting rows to prefill now: the free slots, within the prefill token cap."""
        take, longest = 0, 0
        while take < free_slots and self.cursor + take < len(self.waiting):
            longest_next = max(longest, len(self.waiting[self.cursor + take].ids))
            if take and longest_next * (take + 1) > self.max_prefill_tokens:
                break
            longest = longest_next
            take += 1
        return take

    def started(self, rows: Sequence[Row], slots: Sequence[int], first_tokens: Sequence[int]) -> list[str]:
        """Record the prefilled rows and their first tokens; returns the images no waiting
        row needs any more (their features can go)."""
        done_with = []
        for row, slot, token in zip(rows, slots, first_tokens):
            row.out = [token]
            self.running[slot] = row
            self.positions[slot] = len(row.ids)
            self._uses[row.image] -= 1
            if self._uses[row.image] == 0:
                done_with.append(row.image)
            if token in self.eos_ids or row.max_new <= 1:
                self._finish(slot)
        return done_with

    # -- decoding ------------------------------------------------------------------------

    def begin_step(self) -> int:
        """Account for a decode step; returns the key length it reads (longest running row)."""
        if self.draining and not self._drained:  # the first drain step
            self._drained = True
            self.stats.drain_rows += len(self.running)
        return max(self.positions[s] for s in self.running) + 1

    def stepped(self, next_tokens: Sequence[int]) -> None:
        """Every running slot got its next token (``next_tokens`` is indexed by slot)."""
        self.stats.decode_steps += 1
        self.stats.slot_steps += len(self.running)
        if self.draining:
            self.stats.drain_steps += 1
        for slot in list(self.running):
            row = self.running[slot]
            token = next_tokens[slot]
            row.out.append(token)
            self.positions[slot] += 1
            if token in self.eos_ids or len(row.out) >= row.max_new:
                self._finish(slot)

    def _finish(self, slot: int) -> None:
        row = self.running.pop(slot)
        self.finished[row.key] = row.out
        self._unreported[row.key] = row.out
        self.stats.new_tokens += len(row.out)
        self.positions[slot] = 0
        self.free.append(slot)

    def unreported(self) -> dict[Any, list[int]]:
        """Rows finished since the last call."""
        out = dict(self._unreported)
        self._unreported.clear()
        return out


def pack_groups(items: Iterable[Any], group_of, chunk_rows: int) -> list[list[Any]]:
    """``items`` grouped by ``group_of(item)`` and packed into chunks of at most ``chunk_rows``.

    Groups come in the order of their first item, items within a group in their order. A
    chunk is never cut inside a group (a group larger than ``chunk_rows`` is a chunk of its
    own), so the rows of one image are always handed to the fast engine together and their
    vision features are computed once.
    """
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    chunks: list[list[Any]] = []
    for group in groups.values():
        if chunks and len(chunks[-1]) + len(group) <= chunk_rows:
            chunks[-1].extend(group)
        else:
            chunks.append(list(group))
    return chunks

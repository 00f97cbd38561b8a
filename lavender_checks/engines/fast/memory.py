"""How much GPU memory the fast engine's caches may take: pure arithmetic over byte counts.

The caches are sized when the engine first needs them (and again when they grow): to what
this process already holds (the model) plus ``memory_share`` of what the card has free then,
optionally capped by ``memory_budget_gib``, less the workspace kept for vision and prefill
activations. So a larger card (an H200's 141 GB) gets more slots and a smaller card or a
card shared with another process fewer, without a figure made for one card.
"""

from __future__ import annotations

from dataclasses import dataclass

from lavender_checks.engines.fast.config import GIB

# The CUDA context's own allocations outside torch's allocator (cuBLAS workspaces, graphs'
# bookkeeping): never handed to the caches, whatever the share.
CONTEXT_RESERVE = GIB // 2


@dataclass(frozen=True)
class MemoryPlan:
    """The figures one sizing of the caches used (bytes), for logs and reports."""

    card_total: int  # the card's memory
    free: int  # free on the card when the caches were sized
    in_use: int  # held by this process then (the model, its buffers)
    share: float
    cap: int | None  # memory_budget_gib in bytes, or None
    budget: int  # the peak the caches are sized for: in_use + share x free, capped
    workspace: int  # kept for activations inside the budget
    slot_bytes: int  # one decode row's caches
    fit: int  # rows whose caches fit: (budget - in_use - workspace) // slot_bytes

    def as_dict(self) -> dict:
        gib = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
        return {"card_total_gib": gib(self.card_total), "free_gib": gib(self.free), "in_use_gib": gib(self.in_use),
                "share": self.share, "cap_gib": gib(self.cap), "budget_gib": gib(self.budget),
                "workspace_gib": gib(self.workspace), "slot_gib": gib(self.slot_bytes), "fit": self.fit}


def check_share(share: float) -> float:
    """``share`` if it is in (0, 1]; a ValueError naming it otherwise."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"memory_share must be in (0, 1], got {share}")
    return share


def memory_budget(*, free: int, in_use: int, share: float, cap: int | None = None) -> int:
    """The peak (bytes) the caches are sized for: what this process holds plus ``share`` of
    the card's free memory (less the CUDA context's reserve), at most ``cap``."""
    check_share(share)
    budget = in_use + int(share * max(0, free - CONTEXT_RESERVE))
    return budget if cap is None else min(budget, cap)


def plan(*, card_total: int, free: int, in_use: int, share: float, cap: int | None, workspace: int,
         slot_bytes: int) -> MemoryPlan:
    """The budget and how many decode rows' caches fit in it (0 or more; the caller decides
    what too few means)."""
    if slot_bytes <= 0:
        raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
    budget = memory_budget(free=free, in_use=in_use, share=share, cap=cap)
    room = budget - in_use - workspace
    fit = max(0, room // slot_bytes)
    return MemoryPlan(card_total=card_total, free=free, in_use=in_use, share=share, cap=cap, budget=budget,
                      workspace=workspace, slot_bytes=slot_bytes, fit=int(fit))

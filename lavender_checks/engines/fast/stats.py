"""What one fast-engine call did (the speed benchmark reports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_COUNTS = ("rows", "new_tokens", "images", "rows_sharing_image", "decode_steps", "drain_steps", "drain_rows",
           "slot_steps", "prefill_calls", "prefill_tokens", "graph_captures")


@dataclass
class FastGenStats:
    """Counts and seconds of one ``generate`` call."""

    rows: int = 0
    new_tokens: int = 0
    images: int = 0  # distinct images run through the vision tower
    rows_sharing_image: int = 0  # rows that reused another row's image features
    decode_steps: int = 0
    drain_steps: int = 0  # decode steps after the last row was admitted (the batch only empties)
    drain_rows: int = 0  # rows in the batch when the drain began
    slot_steps: int = 0  # sum over decode steps of the rows in the batch
    slots: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0  # padded
    graph_captures: int = 0
    graphs: str = "off"
    cache_len: int = 0  # self-attention positions of the decode caches
    invariant: bool = False  # the batch-invariant mode ran (config.invariant)
    # "drain" is the part of "decode" spent in drain steps: once per call, whatever its size
    seconds: dict[str, float] = field(default_factory=lambda: {
        "total": 0.0, "prep_wait": 0.0, "vision": 0.0, "prefill": 0.0, "decode": 0.0, "drain": 0.0,
        "capture": 0.0})

    def add(self, other: "FastGenStats") -> None:
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.slots = max(self.slots, other.slots)
        self.cache_len = max(self.cache_len, other.cache_len)
        self.graphs = other.graphs
        self.invariant = other.invariant
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v

    @property
    def occupancy(self) -> float | None:
        """Mean fraction of the slots that held a row during decode steps."""
        if not self.decode_steps or not self.slots:
            return None
        return self.slot_steps / (self.decode_steps * self.slots)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "new_tokens": self.new_tokens, "images": self.images,
            "rows_sharing_image": self.rows_sharing_image, "decode_steps": self.decode_steps,
            "drain_steps": self.drain_steps, "drain_rows": self.drain_rows,
            "slots": self.slots, "occupancy": self.occupancy, "prefill_calls": self.prefill_calls,
            "prefill_tokens": self.prefill_tokens, "graph_captures": self.graph_captures,
            "graphs": self.graphs, "cache_len": self.cache_len, "invariant": self.invariant,
            "seconds": dict(self.seconds),
        }

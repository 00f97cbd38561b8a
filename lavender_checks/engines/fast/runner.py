"""The fast engine's tensor work: static caches, vision, prefill, the decode step, CUDA graphs.

The decode step (every layer, LoRA included) is captured as a CUDA graph per variant and per
key-length bucket, over a static self-attention cache and a static cross-attention cache that
this module owns (transformers' static cache does not fit Mllama's cross-attention). Attention
reads only the bucket's prefix of the cache, so short rows do not pay for the longest
possible row. In the batch-invariant mode (``invariant.py``) the shapes are fixed instead:
``decode_rows`` rows over the whole cache each step, prefill in calls of ``prefill_rows``
rows of one padded length. Without CUDA the same code runs eagerly.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from lavender_checks.engines.fast import invariant, memory, mllama
from lavender_checks.engines.fast.config import GIB, FastGenConfig
from lavender_checks.engines.fast.rules import GreedyRules
from lavender_checks.engines.fast.scheduler import Row
from lavender_checks.engines.fast.stats import FastGenStats

log = logging.getLogger(__name__)


class ModelRunner:
    """Buffers and forward passes of one model for the fast engine; kept between calls."""

    def __init__(self, parts: mllama.MllamaParts, *, device, dtype, config: FastGenConfig, rules: GreedyRules,
                 pad_id: int):
        import torch

        self._torch = torch
        self.parts = parts
        self.device = device
        self.dtype = dtype
        self.config = config
        self.rules = rules
        self.pad_id = pad_id
        self._eos_index = torch.tensor(sorted(frozenset(rules.eos_ids)), dtype=torch.long, device=device)
        self.use_graphs = config.cuda_graphs and device.type == "cuda"
        self.graph_error: str | None = None
        self._graphs: dict[tuple[str, int], Any] = {}
        self._graph_pool = None
        self.slots = 0  # rows decoded at once (admitted into free slots)
        self.rows = 0  # rows of the decode buffers (invariant mode: decode_rows, else slots)
        self.cache_len = 0
        self._invariant_buffers: bool | None = None
        self.memory_plan: memory.MemoryPlan | None = None  # the last sizing of the caches (CUDA)

    # -- buffers -----------------------------------------------------------------------

    def slot_bytes(self, cache_len: int) -> int:
        """GPU bytes one slot's caches take at ``cache_len`` self-attention positions."""
        p = self.parts
        elem = self._torch.finfo(self.dtype).bits // 8
        per_pos = 2 * p.kv_heads * p.head_dim * elem
        return per_pos * (len(p.self_index) * cache_len + len(p.cross_index) * p.vision_tokens)

    def ensure_buffers(self, need: int) -> None:
        """Caches for rows of up to ``need`` positions. Throughput mode: grown, never shrunk.
        Invariant mode: exactly ``invariant.cache_length(need)`` positions, shrunk too, since
        the cache length is part of every decoded row's shapes (the engine runs rows of one
        cache length together)."""
        torch, p, cfg = self._torch, self.parts, self.config
        if cfg.invariant:
            if cfg.decode_rows < 1:
                raise ValueError(f"decode_rows must be at least 1, got {cfg.decode_rows}")
            block = cfg.decode_key_block
            if block is not None and (block < 1 or cfg.min_cache_len % block):
                raise ValueError(f"decode_key_block must be a positive divisor of min_cache_len "
                                 f"({cfg.min_cache_len}), got {block}")
            cache_len = invariant.cache_length(need, cfg.min_cache_len)
        else:
            cache_len = max(cfg.min_bucket, cfg.min_cache_len, _round_up(need, 64))
        same_mode = cfg.invariant == self._invariant_buffers and (not cfg.invariant or self.rows == cfg.decode_rows)
        fits = cache_len == self.cache_len if cfg.invariant else cache_len <= self.cache_len
        if self.slots and fits and same_mode:
            if cfg.invariant:  # the slot count only limits admission: the buffers stay decode_rows
                self.slots = min(cfg.max_slots, self.rows)
            return
        if not cfg.invariant:
            cache_len = max(cache_len, self.cache_len)
        # Free the old caches and the graphs that point into them before sizing the new ones.
        # The graphs' memory pool goes with them: capturing into a pool whose graphs are all
        # gone trips an allocator assertion (torch 2.11), so new graphs get a new pool.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._graph_pool = None
        for name in ("_self_k", "_self_v", "_cross_k", "_cross_v"):
            setattr(self, name, None)
        if cfg.invariant:
            rows = cfg.decode_rows
            self._slots_that_fit(cache_len, at_least=rows)
            slots = min(cfg.max_slots, rows)
        else:
            slots = rows = self._slots_that_fit(cache_len)
        shape_self = (rows, p.kv_heads, cache_len, p.head_dim)
        shape_cross = (rows, p.kv_heads, p.vision_tokens, p.head_dim)
        make = lambda shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self._self_k = [make(shape_self) for _ in p.self_index]
        self._self_v = [make(shape_self) for _ in p.self_index]
        self._cross_k = [make(shape_cross) for _ in p.cross_index]
        self._cross_v = [make(shape_cross) for _ in p.cross_index]
        self._tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._next = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._suppress = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self._decay = torch.zeros(rows, dtype=torch.float32, device=self.device)
        # Every slot sees the first tile until a row moves in, so no attention row is all-masked.
        self._tile_ok = torch.zeros(rows, p.vision_tokens, dtype=torch.bool, device=self.device)
        self._tile_ok[:, : p.num_patches] = True
        self._key_arange = torch.arange(cache_len, device=self.device)
        self._slot_arange = torch.arange(rows, device=self.device)
        self.slots, self.rows, self.cache_len = slots, rows, cache_len
        self._invariant_buffers = cfg.invariant

    def release(self) -> None:
        """Free the caches and captured graphs (the next call allocates them again)."""
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._graph_pool = None
        for name in ("_self_k", "_self_v", "_cross_k", "_cross_v"):
            setattr(self, name, None)
        self.slots = self.rows = self.cache_len = 0
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def _slots_that_fit(self, cache_len: int, at_least: int = 1) -> int:
        """Slots whose caches fit the memory budget (``max_slots`` at most; ``memory.plan``);
        an error when fewer than ``at_least`` fit (the invariant mode needs ``decode_rows``)."""
        torch, cfg = self._torch, self.config
        slots = cfg.max_slots
        if self.device.type != "cuda":
            return slots
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        workspace = cfg.invariant_workspace_gib if cfg.invariant else cfg.workspace_gib
        cap = None if cfg.memory_budget_gib is None else int(cfg.memory_budget_gib * GIB)
        sizing = memory.plan(card_total=total, free=free, in_use=torch.cuda.memory_allocated(self.device),
                             share=cfg.memory_share, cap=cap, workspace=int(workspace * GIB),
                             slot_bytes=self.slot_bytes(cache_len))
        self.memory_plan = sizing
        if sizing.fit < at_least:
            room = (sizing.budget - sizing.in_use - sizing.workspace) / GIB
            raise RuntimeError(
                f"the fast path needs {sizing.slot_bytes / GIB:.2f} GiB per slot, "
                + (f"{at_least} slots (decode_rows, invariant mode) " if at_least > 1 else "")
                + f"and {workspace} GiB of workspace; only {room:.2f} GiB are left under a "
                f"{sizing.budget / GIB:.1f} GiB budget (memory_share {cfg.memory_share} of "
                f"{free / GIB:.1f} GiB free beside {sizing.in_use / GIB:.1f} GiB in use"
                + (f", at most {cfg.memory_budget_gib} GiB" if cap is not None else "") + ")"
                + ("; lower decode_rows or raise memory_share" if at_least > 1 else ""))
        if sizing.fit < slots:
            log.info("fast path: %d slots fit the %.1f GiB budget (asked for %d)", sizing.fit,
                     sizing.budget / GIB, slots)
            slots = sizing.fit
        return slots

    def bucket(self, length: int) -> int:
        """Keys the decode step reads: a bucket at least ``length`` long (one graph per bucket);
        in invariant mode the whole cache, whatever the other rows' lengths, or with
        ``decode_key_block`` whole blocks (whose attention ignores trailing masked blocks)."""
        if self.config.invariant:
            block = self.config.decode_key_block
            return self.cache_len if block is None else min(_round_up(length, block), self.cache_len)
        step = self.config.min_bucket
        if self.config.bucket_growth == "linear":
            return min(_round_up(length, step), self.cache_len)
        bucket = step
        while bucket < length:
            bucket *= 2
        return min(bucket, self.cache_len)

    def sync(self) -> None:
        """With ``phase_timing``: wait for the GPU, so that phase times are exact."""
        if self.config.phase_timing and self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    # -- vision ------------------------------------------------------------------------

    def image_features(self, encoded: list):
        """Per image: (keys, values) of every cross-attention layer, each (kv_heads, T, d)."""
        return mllama.image_features(self.parts, encoded, self.device, self.config.vision_attention)

    # -- logits ------------------------------------------------------------------------

    def _greedy_choice(self, hidden, suppress, decay):
        """Next tokens from the last hidden states, through greedy generate's logits rules."""
        torch = self._torch
        scores = mllama.scores(self.parts.lm_head, hidden)
        if self.rules.suppresses or self.rules.decays:
            eos = self._eos_index
            picked = scores[:, eos]
            if self.rules.suppresses:
                picked = torch.where(suppress[:, None], float("-inf"), picked)
            if self.rules.decays:
                penalty = picked.abs() * decay[:, None]
                penalty = penalty.masked_fill(~torch.isfinite(picked), 0.0)
                picked = picked + penalty
            scores[:, eos] = picked
        return scores.argmax(-1)

    # -- prefill -----------------------------------------------------------------------

    def prefill_invariant(self, batch: list[Row], targets: list[int], image_kv, image_meta,
                          stats: FastGenStats) -> list[int]:
        """Prefill with shapes that depend on each row alone: rows grouped by their padded
        length (their own length rounded up to ``prefill_bucket``), in calls of exactly
        ``prefill_rows`` rows, the last call of a group filled up with copies of its first row
        (which compute but write nothing)."""
        cfg = self.config
        if cfg.prefill_rows <= 1:
            return [self.prefill([row], [slot], image_kv, image_meta, stats)[0] for row, slot in zip(batch, targets)]
        if cfg.prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be at least 1, got {cfg.prefill_bucket}")
        groups: dict[int, list[tuple[Row, int]]] = {}
        for row, slot in zip(batch, targets):
            groups.setdefault(_round_up(len(row.ids), cfg.prefill_bucket), []).append((row, slot))
        first: dict[int, int] = {}
        for length, members in groups.items():
            for start in range(0, len(members), cfg.prefill_rows):
                part = members[start:start + cfg.prefill_rows]
                padded = part + [part[0]] * (cfg.prefill_rows - len(part))
                tokens = self.prefill([r for r, _ in padded], [s for _, s in padded], image_kv, image_meta,
                                      stats, seq=length, real_rows=len(part))
                first.update((slot, token) for (_, slot), token in zip(part, tokens))
        return [first[slot] for slot in targets]

    def prefill(self, batch: list[Row], targets: list[int], image_kv, image_meta, stats: FastGenStats,
                seq: int | None = None, real_rows: int | None = None) -> list[int]:
        """Run the prompts of ``batch`` (left-padded to ``seq``, default the longest), fill
        their slots, return first tokens. Rows from ``real_rows`` on are filler: computed, but
        they write into no cache or slot."""
        torch, p = self._torch, self.parts
        dev = self.device
        n = len(batch)
        real_rows = n if real_rows is None else real_rows
        seq = seq or max(len(r.ids) for r in batch)
        stats.prefill_calls += 1
        stats.prefill_tokens += n * seq
        ids = torch.full((n, seq), self.pad_id, dtype=torch.long)
        valid = torch.zeros(n, seq, dtype=torch.bool)
        image_pos = torch.zeros(n, dtype=torch.long)
        tiles = torch.zeros(n, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, seq - len(row.ids):] = torch.tensor(row.ids)
            valid[i, seq - len(row.ids):] = True
            image_pos[i] = seq - len(row.ids) + row.image_pos
            tiles[i] = image_meta[row.image].num_tiles
        ids, valid = ids.to(dev), valid.to(dev)
        image_pos, tiles = image_pos.to(dev), tiles.to(dev)
        slots = torch.tensor(targets, dtype=torch.long, device=dev)

        # Cross-attention keys and values of the new rows go into their slots; the prefill reads
        # them from there (a view when the slots are consecutive, else a gather per layer).
        for j in range(len(p.cross_index)):
            for slot, row in zip(targets[:real_rows], batch[:real_rows]):
                self._cross_k[j][slot] = image_kv[row.image][0][j]
                self._cross_v[j][slot] = image_kv[row.image][1][j]
        consecutive = targets == list(range(targets[0], targets[0] + n))

        def cross_kv(j):
            if consecutive:
                return (self._cross_k[j][targets[0]:targets[0] + n],
                        self._cross_v[j][targets[0]:targets[0] + n])
            return self._cross_k[j][slots], self._cross_v[j][slots]
        vision_index = torch.arange(p.vision_tokens, device=dev)
        tile_ok = (vision_index // p.num_patches)[None, :] < tiles[:, None]  # (n, T)
        self._tile_ok[slots[:real_rows]] = tile_ok[:real_rows]

        positions = torch.arange(seq, device=dev)
        sees = positions[None, :] >= image_pos[:, None]  # (n, S): at or after <|image|>
        # Mllama: a token that sees no tile attends to every vision token (the mask row is
        # zeroed, not -inf) and its cross-attention MLP output is zeroed. Kept deliberately.
        cross_mask = torch.where(sees[:, :, None], tile_ok[:, None, :], True)[:, None]
        row_mask = sees.to(self.dtype)[..., None]

        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = positions[None, :] <= positions[:, None]  # (S, S): key <= query
        eye = torch.eye(seq, dtype=torch.bool, device=dev)
        # Padding queries see themselves only, so no attention row is empty.
        self_mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]

        # Where the real prompt tokens go in the slot caches: slot row, position 0..len-1.
        real = valid[:real_rows].nonzero(as_tuple=False)
        src_row, src_pos = real[:, 0], real[:, 1]
        dst_slot = slots[src_row]
        dst_pos = src_pos - (seq - valid.sum(-1))[src_row]

        tm = p.text_model
        h = tm.embed_tokens(ids)
        cos, sin = tm.rotary_emb(h, position_ids)
        for index, layer in enumerate(tm.layers):
            if index in p.cross_index:
                j = p.cross_index[index]
                h = mllama.cross_layer(p, layer, h, *cross_kv(j), cross_mask, row_mask)
                continue
            j = p.self_index[index]

            def attend(k, v, j=j):
                self._self_k[j][dst_slot, :, dst_pos] = k[src_row, :, src_pos]
                self._self_v[j][dst_slot, :, dst_pos] = v[src_row, :, src_pos]
                return k, v, self_mask

            h = mllama.self_layer(p, layer, h, cos, sin, attend)
        h = tm.norm(h[:, -1:])
        suppress = torch.tensor([self.rules.suppress_eos(len(r.ids), 0) for r in batch], device=dev)
        decay = torch.tensor([self.rules.decay_multiplier(0) for _ in batch], dtype=torch.float32, device=dev)
        first = self._greedy_choice(h[:, -1], suppress, decay)[:real_rows]
        self._tokens[slots[:real_rows]] = first
        return first.tolist()

    # -- decode ------------------------------------------------------------------------

    def set_step_inputs(self, positions: list[int], running: dict[int, Row]) -> None:
        """The host's per-slot positions, and the length rules of the running rows."""
        torch, rules = self._torch, self.rules
        idle = [0] * (self.rows - len(positions))  # invariant mode: rows beyond the slots ride along
        self._positions.copy_(torch.tensor(list(positions) + idle, dtype=torch.long))
        if rules.suppresses or rules.decays:
            suppress, decay = [False] * self.rows, [0.0] * self.rows
            for slot, row in running.items():
                suppress[slot] = rules.suppress_eos(len(row.ids), len(row.out))
                decay[slot] = rules.decay_multiplier(len(row.out))
            self._suppress.copy_(torch.tensor(suppress, dtype=torch.bool))
            self._decay.copy_(torch.tensor(decay, dtype=torch.float32))

    def next_tokens(self) -> list[int]:
        """The tokens the last step chose (per slot); they are the next step's input."""
        chosen = self._next[:self.slots].tolist()
        self._tokens.copy_(self._next)
        return chosen

    def decode_step(self, length: int) -> None:
        """One token for every slot, reading and writing only the static buffers."""
        p = self.parts
        tm = p.text_model
        positions = self._positions
        h = tm.embed_tokens(self._tokens[:, None])
        cos, sin = tm.rotary_emb(h, positions[:, None])
        key_ok = (self._key_arange[:length][None, :] <= positions[:, None])[:, None, None, :]
        cross_ok = self._tile_ok[:, None, None, :]
        slot_index = self._slot_arange
        block = self.config.decode_key_block if self.config.invariant else None
        attention = None if block is None else functools.partial(mllama.attend_keys_blocked, block=block)
        for index, layer in enumerate(tm.layers):
            if index in p.cross_index:
                j = p.cross_index[index]
                # Generated tokens always follow <|image|>: the MLP row mask is 1 (omitted).
                h = mllama.cross_layer(p, layer, h, self._cross_k[j], self._cross_v[j], cross_ok, None)
                continue
            j = p.self_index[index]

            def attend(k, v, j=j):
                cache_k, cache_v = self._self_k[j], self._self_v[j]
                cache_k[slot_index, :, positions] = k[:, :, 0]
                cache_v[slot_index, :, positions] = v[:, :, 0]
                return cache_k[:, :, :length], cache_v[:, :, :length], key_ok

            h = mllama.self_layer(p, layer, h, cos, sin, attend, attention)
        h = tm.norm(h)
        self._next.copy_(self._greedy_choice(h[:, -1], self._suppress, self._decay))

    def decode(self, variant: str, length: int, stats: FastGenStats) -> None:
        """``decode_step`` as a replayed CUDA graph when graphs are on (captured on first use)."""
        if self.use_graphs:
            graph = self._graphs.get((variant, length))
            if graph is None:
                t0 = time.perf_counter()
                try:
                    graph = self._capture(length)
                except Exception as exc:  # fall back to eager decoding, and say so
                    self.use_graphs = False
                    self.graph_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("CUDA graph capture failed (%s); decoding eagerly", self.graph_error)
                    self._torch.cuda.synchronize(self.device)
                else:
                    self._graphs[(variant, length)] = graph
                    stats.graph_captures += 1
                stats.seconds["capture"] += time.perf_counter() - t0
            if graph is not None:
                graph.replay()
                return
        self.decode_step(length)

    def _capture(self, length: int):
        """Capture the decode step. The warm-up steps repeat the coming step exactly (same
        inputs, same cache writes), so capturing in the middle of a generation is harmless."""
        torch = self._torch
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.decode_step(length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self.decode_step(length)
        return graph

    @property
    def graphs(self) -> str:
        """"on", "off" or "failed: why", for the stats."""
        return "on" if self.use_graphs else (f"failed: {self.graph_error}" if self.graph_error else "off")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple

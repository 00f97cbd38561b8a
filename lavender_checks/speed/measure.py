"""The measured paths: VLMEvalKit's one-sample loop, plain batched ``generate``, the fast
engine (in the runner's chunks), the suite's batched engine; the card's ceilings; and how
many sequences of each path equal one-sample ``generate``'s."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lavender_checks.speed.subject import (
    FORCE_NEVER_EOS,
    Subject,
    peak_gib,
    reset_peak,
    sync,
)
from lavender_checks.speed.workload import RequestMaker, Workload, sample_rows


def measure_card(device: Any) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matrix rate, measured as METHOD.md says."""
    import torch

    info = {"name": torch.cuda.get_device_name(device)}
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(8):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(stop) / 1000)
    info["bandwidth_bytes_per_s"] = 2 * src.numel() * 2 / sorted(times[2:])[len(times[2:]) // 2]
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(8):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        stop.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(stop) / 1000)
    info["matmul_flops_per_s"] = 2 * 8192**3 / sorted(times[2:])[len(times[2:]) // 2]
    del a, b
    torch.cuda.empty_cache()
    return info


def run_one_sample(subject: Subject, requests: list, variant: str) -> dict[str, dict]:
    """VLMEvalKit's loop: per row, open the image, call the processor, ``generate`` alone.

    Per row: total seconds, seconds to the first token (prefill, preprocessing included) and
    the new token ids.
    """
    import copy

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                sync(subject.device)
                self.at = time.perf_counter()
            return scores

    out = {}
    with torch.inference_mode(), subject.variant_context(variant):
        for request in requests:
            sync(subject.device)
            t0 = time.perf_counter()
            image = request.images[0]() if callable(request.images[0]) else request.images[0]
            inputs = subject.processor(images=[[image]], text=[request.text], return_tensors="pt")
            inputs = inputs.to(subject.device)
            config = copy.deepcopy(subject.generation_config)
            config.max_new_tokens = request.max_new_tokens
            if config.min_new_tokens == FORCE_NEVER_EOS:
                config.min_new_tokens = request.max_new_tokens
            marker = FirstToken()
            output = subject.model.generate(**inputs, generation_config=config,
                                            logits_processor=LogitsProcessorList([marker]),
                                            output_scores=True, return_dict_in_generate=True)
            sync(subject.device)
            t1 = time.perf_counter()
            ids = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            # Top-1 minus top-2 score of every step: a near tie is where bf16 noise can flip greedy.
            margins = [float(top[0] - top[1]) for top in
                       (step[0].float().topk(2).values for step in output.scores)]
            out[request.key] = {"seconds": t1 - t0, "prefill_seconds": (marker.at or t1) - t0,
                                "ids": ids, "margins": margins}
    return out


def run_hf_batched(subject: Subject, requests: list, variant: str, batch_size: int = 8) -> dict[str, list[int]]:
    """Plain batched ``generate`` (left padding, rows grouped by token budget), the way the
    suite's generate batches: its drift from one-sample ``generate`` is the noise floor that
    batching alone brings in bf16."""
    import copy

    import torch

    groups: dict[int, list] = {}
    for request in requests:
        groups.setdefault(request.max_new_tokens, []).append(request)
    out: dict[str, list[int]] = {}
    with torch.inference_mode(), subject.variant_context(variant):
        for budget, group in sorted(groups.items()):
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                images = [[r.images[0]() if callable(r.images[0]) else r.images[0]] for r in batch]
                inputs = subject.processor(images=images, text=[r.text for r in batch], padding=True,
                                           return_tensors="pt").to(subject.device)
                config = copy.deepcopy(subject.generation_config)
                config.max_new_tokens = budget
                if config.min_new_tokens == FORCE_NEVER_EOS:
                    config.min_new_tokens = budget
                output = subject.model.generate(**inputs, generation_config=config)
                for request, row in zip(batch, output[:, inputs["input_ids"].shape[1]:].tolist()):
                    out[request.key] = row
    return out


def run_fast(engine: Any, requests: list, variant: str, chunk_rows: int) -> dict:
    """The fast runner over ``requests`` in the runner's chunks (grouped by image, never cut
    inside one: ``pack_groups``); ids, seconds, stats and the number of chunks."""
    from lavender_checks.engines.fast.scheduler import pack_groups
    from lavender_checks.engines.fast.stats import FastGenStats

    stats = FastGenStats()
    ids: dict[str, list[int]] = {}
    chunks = pack_groups(requests, lambda r: r.image_key, chunk_rows)
    sync(engine.device)
    t0 = time.perf_counter()
    for chunk in chunks:
        ids.update(engine.generate_ids(chunk, variant))
        stats.add(engine.last_stats)
    sync(engine.device)
    return {"seconds": time.perf_counter() - t0, "ids": ids, "stats": stats, "chunks": len(chunks)}


def run_warmup(engine: Any, made: dict, variants: list[str], rows: int, chunk_rows: int) -> dict:
    """The first ``rows`` rows of every benchmark and variant through the fast runner, outputs
    capped at 16 tokens, untimed in the projection: the first call of a shape pays for kernel
    selection and allocator growth, which a scaled run would otherwise multiply by its scale.
    The graph captures it makes are one-off costs and go into the projection."""
    import dataclasses

    out = {"rows_per_run": rows, "seconds": 0.0, "capture_seconds": 0.0}
    if rows <= 0:
        return out
    sync(engine.device)
    t0 = time.perf_counter()
    for requests, _ in made.values():
        head = [dataclasses.replace(r, max_new_tokens=min(16, r.max_new_tokens)) for r in requests[:rows]]
        for variant in variants:
            result = run_fast(engine, head, variant, chunk_rows)
            out["capture_seconds"] += result["stats"].seconds.get("capture", 0.0)
    sync(engine.device)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_plain_section(subject: Subject, workload: Workload, maker: RequestMaker, args, cap) -> dict:
    """The suite's batched generate on a few rows per benchmark (the first variant)."""
    from lavender_checks.engines.batched import generate as suite_generate

    variant = workload.variants[0]
    section: dict[str, Any] = {"variant": variant, "per_benchmark": {}}
    reset_peak(subject.device)
    for load in workload.benchmarks:
        rows = sample_rows(load, workload.seed, args.scale)[: args.plain_rows]
        requests, _ = maker.requests(rows, cap=cap)
        loaded = [type(r)(key=r.key, text=r.text, images=[r.images[0]()], max_new_tokens=r.max_new_tokens)
                  for r in requests]
        sync(subject.device)
        t0 = time.perf_counter()
        predictions = suite_generate(subject.pair, loaded, variant, batch_size=8, progress=False)
        sync(subject.device)
        section["per_benchmark"][load.name] = {"rows": len(loaded), "seconds": time.perf_counter() - t0,
                                               "predictions": len(predictions)}
    section["peak_gib"] = peak_gib(subject.device)
    return section


def equivalence_section(compared: dict[str, dict], tie_margin: float) -> dict:
    """How many sequences of the fast runner (and of plain batched generate) equal one-sample
    ``generate``'s, token for token, and where the others first differ.

    With random weights the top two scores are often nearly equal, and any change of kernel
    (a batch of another size) can flip such a near tie in bf16. So for every first difference
    the one-sample run's margin (top-1 minus top-2 score) at that step is reported, and a
    second count takes as agreeing the sequences whose first difference falls on a step with
    a margin below ``tie_margin``. A bug shows as differences at large margins.
    """
    out: dict[str, Any] = {"sequences": len(compared), "tie_margin": tie_margin,
                           "note": "greedy new tokens compared whole against one-sample generate, "
                                   "same rows and capped lengths"}
    for path in ("fast", "fast_hf_vision", "hf_batched"):
        rows = {k: v for k, v in compared.items() if path in v}
        if not rows:
            continue
        same = sum(v[path] == v["one_sample"] for v in rows.values())
        differing = {}
        for key, v in rows.items():
            if v[path] == v["one_sample"]:
                continue
            at = _first_difference(v["one_sample"], v[path])
            margins = v.get("margins") or []
            differing[key] = {"step": at, "margin": margins[at] if at is not None and at < len(margins) else None}
        near_tie = sum(1 for d in differing.values() if d["margin"] is not None and d["margin"] < tie_margin)
        out[path] = {
            "identical": same, "fraction": same / len(rows) if rows else None,
            "identical_or_near_tie": (same + near_tie) / len(rows) if rows else None,
            "first_token_differs": sum(1 for d in differing.values() if d["step"] == 0),
            "first_differences": dict(sorted(differing.items())[:48]),
        }
    all_margins = sorted(m for v in compared.values() for m in (v.get("margins") or []))
    out["one_sample_margin_quantiles"] = ({q: all_margins[int(q * (len(all_margins) - 1))]
                                          for q in (0.05, 0.25, 0.5)} if all_margins else None)
    both = [v for v in compared.values() if "fast" in v and "hf_batched" in v]
    out["fast_vs_hf_batched"] = {
        "identical": sum(v["fast"] == v["hf_batched"] for v in both),
        "fraction": sum(v["fast"] == v["hf_batched"] for v in both) / len(both) if both else None,
    }
    split = [v for v in compared.values() if "fast" in v and "fast_hf_vision" in v]
    if split:
        out["fast_vs_fast_hf_vision"] = {"identical": sum(v["fast"] == v["fast_hf_vision"] for v in split),
                                         "sequences": len(split)}
    out["fraction"] = out["fast"]["fraction"]
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure_fast(engine: Any, workload: Workload, scaled: dict, totals: dict, share: dict, maker: RequestMaker,
                 args, cap: int | None, fast_section: dict, notes: list, save, *, launched: float | None = None,
                 meet: Any = None, tokens_path: str | None = None) -> dict:
    """The ``fast`` pass: a warm-up, then every benchmark and variant through ``engine`` in
    runner-sized chunks, projected to the full gate; fills and returns ``fast_section``
    (``save()`` is called as it grows).

    ``fast_section["split"]``: the process's time from ``launched`` (epoch seconds; default
    the start of this pass) in consecutive parts (``time_split``); ``meet`` is called after
    the timed pass (the barrier of a sharded run: its wait is the split's last part).
    ``tokens_path``: where every row's token ids go (``write_tokens``)."""
    import math
    import sys

    from lavender_checks.engines.fast.config import DEFAULT_CHUNK_ROWS
    from lavender_checks.engines.fast.stats import FastGenStats
    from lavender_checks.speed.project import project_fast

    chunk_rows = args.chunk_rows or DEFAULT_CHUNK_ROWS
    reset_peak(engine.device)
    fast_section.update({"per_run": {}, "chunk_rows": chunk_rows, "invariant": engine.config.invariant})
    total = FastGenStats()
    made = {name: maker.requests(rows, cap=cap) for name, rows in scaled.items()}
    clock = {"launched": launched if launched is not None else time.time(), "ready": time.time()}
    token_ids: dict[str, dict[str, list[int]]] = {}
    fast_section["warmup"] = run_warmup(engine, made, workload.variants, args.warmup_rows, chunk_rows)
    clock["warm"] = time.time()
    save()
    # Benchmark by benchmark, both variants each: a run cut short still projects whole benchmarks.
    for load in workload.benchmarks:
        for variant in workload.variants:
            rows = scaled[load.name]
            if not rows:  # a shard of a tiny scaled benchmark can be empty: its share is 0
                continue
            requests, lengths = made[load.name]
            result = run_fast(engine, requests, variant, chunk_rows)
            stats = result["stats"]
            total.add(stats)
            tokens = sum(len(v) for v in result["ids"].values())
            token_ids[f"{variant}/{load.name}"] = result["ids"]
            expected_images = len({r.image_id for r in rows})
            if stats.images != expected_images:
                notes.append(
                    f"{variant}/{load.name}: the fast path encoded {stats.images} images for "
                    f"{expected_images} distinct image ids: the projection of this run is not valid")
            full_rows = totals[load.name]["rows"] * share[load.name]
            fast_section["per_run"][f"{variant}/{load.name}"] = {
                "rows": len(rows), "full_rows": full_rows,
                "chunks": result["chunks"], "full_chunks": max(1, math.ceil(full_rows / chunk_rows)),
                "images": stats.images, "distinct_image_ids": expected_images,
                "seconds": result["seconds"], "capture_seconds": stats.seconds.get("capture", 0.0),
                "decode_seconds": stats.seconds.get("decode", 0.0),
                "drain_seconds": stats.seconds.get("drain", 0.0), "drain_rows": stats.drain_rows,
                "slots": stats.slots,
                "new_tokens": tokens, "prompt_tokens": sum(lengths.values()),
                "prompt_tokens_drawn": sum(r.prompt_tokens for r in rows),
                "stats": stats.as_dict(),
            }
            print(f"fast {variant}/{load.name}: {len(rows)} rows, {tokens} new tokens in "
                  f"{result['seconds']:.1f} s", file=sys.stderr)
            save()
    clock["timed"] = time.time()
    if meet is not None:
        meet()
    clock["met"] = time.time()
    fast_section["split"] = time_split(clock)
    fast_section["peak_gib"] = peak_gib(engine.device)
    sizing = getattr(getattr(engine, "runner", None), "memory_plan", None)
    fast_section["memory"] = sizing.as_dict() if sizing is not None else None  # the caches' sizing (CUDA)
    fast_section["stats"] = total.as_dict()
    if tokens_path:
        fast_section["tokens_file"] = str(write_tokens(Path(tokens_path), token_ids))
    fast_section["projection"] = project_fast(fast_section["per_run"], fast_section["warmup"])
    save()
    return fast_section


def time_split(clock: dict[str, float]) -> dict[str, Any]:
    """The process's time, launch to barrier, in consecutive parts: start-up (interpreter,
    imports, joining the others, model build, requests), warm-up, the timed pass and the wait
    at the barrier; ``total`` is their sum. ``clock``: epoch seconds of each boundary."""
    parts = (("startup", "launched", "ready"), ("warmup", "ready", "warm"), ("timed", "warm", "timed"),
             ("barrier", "timed", "met"))
    split: dict[str, Any] = {name: clock[end] - clock[start] for name, start, end in parts}
    split["total"] = clock["met"] - clock["launched"]
    split["clock"] = dict(clock)
    return split


def write_tokens(path: Path, token_ids: dict[str, dict[str, list[int]]]) -> Path:
    """One JSON line per row: {"run": "<variant>/<benchmark>", "key": ..., "ids": [...]}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for run, ids in token_ids.items():
            for key, row in ids.items():
                fh.write(json.dumps({"run": run, "key": key, "ids": list(row)}) + "\n")
    return path

"""From measurements to the full gate: the model's costs, the card's limit for the workload,
the projections of the one-sample loop and of the fast engine, and the headline figures."""

from __future__ import annotations

import math
from typing import Any

from lavender_checks.speed.workload import Workload


def model_costs(model: Any) -> dict:
    """Bytes read per decode step (text decoder + lm_head, LoRA included) and FLOPs per image
    (vision tower over all tile slots, projector, cross-attention keys/values)."""
    from lavender_checks.engines.fast.mllama import unwrap

    mllama = unwrap(model)
    text = mllama.model.language_model
    step_bytes = sum(p.numel() * p.element_size() for n, p in text.named_parameters()
                     if not n.startswith("embed_tokens"))
    step_bytes += sum(p.numel() * p.element_size() for p in mllama.lm_head.parameters())
    vc = mllama.config.vision_config
    tc = mllama.config.get_text_config()
    patches = (vc.image_size // vc.patch_size) ** 2 + 1
    tokens = vc.max_num_tiles * (patches + (8 - patches % 8) % 8)  # padded to a multiple of 8
    h, inter = vc.hidden_size, vc.intermediate_size
    layers = vc.num_hidden_layers + vc.num_global_layers
    tower = layers * (2 * tokens * (4 * h * h + 2 * h * inter) + 4 * tokens * tokens * h)
    tower += 2 * vc.max_num_tiles * (patches - 1) * vc.num_channels * vc.patch_size**2 * h
    vision_tokens = vc.max_num_tiles * patches
    projector = 2 * vision_tokens * vc.vision_output_dim * tc.hidden_size
    kv_dim = tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads)
    cross_kv = len(tc.cross_attention_layers) * 2 * 2 * vision_tokens * tc.hidden_size * kv_dim
    text_params = sum(p.numel() for n, p in text.named_parameters() if not n.startswith("embed_tokens"))
    cross_kv_bytes_per_row = (len(tc.cross_attention_layers) * 2 * vision_tokens * kv_dim
                              * mllama.lm_head.weight.element_size())
    return {
        "decode_step_weight_bytes": step_bytes,
        "vision_tower_flops_per_image": tower,
        "image_flops_per_image": tower + projector + cross_kv,
        "prefill_flops_per_token": 2 * text_params,
        "cross_kv_bytes_per_row": cross_kv_bytes_per_row,
    }


def card_limit(totals: dict, costs: dict, card: dict, slots: int, variants: int,
               vision_per_variant: bool) -> dict:
    """The card's limit for the whole gate: decode steps at ``slots`` rows each, reading the
    weights once per step at copy bandwidth, plus the image-side FLOPs at matrix rate. A
    fuller floor adds the text prefill FLOPs and the cross-attention keys/values per step."""
    bw, peak = card["bandwidth_bytes_per_s"], card["matmul_flops_per_s"]
    steps = variants * sum(math.ceil(t["new_tokens"] / slots) for t in totals.values())
    images = sum(t["images"] for t in totals.values()) * (variants if vision_per_variant else 1)
    decode_s = steps * costs["decode_step_weight_bytes"] / bw
    image_s = images * costs["image_flops_per_image"] / peak
    prefill_s = variants * sum(t["prompt_tokens"] for t in totals.values()) * costs["prefill_flops_per_token"] / peak
    cross_s = variants * sum(t["new_tokens"] for t in totals.values()) * costs["cross_kv_bytes_per_row"] / bw
    return {
        "decode_steps": steps, "images": images, "decode_seconds": decode_s, "image_seconds": image_s,
        "limit_seconds": decode_s + image_s,
        "fuller_floor_seconds": decode_s + image_s + prefill_s + cross_s,
        "prefill_seconds": prefill_s, "cross_kv_read_seconds": cross_s,
    }


def project_one_sample(per_bench: dict, totals: dict, variants: int) -> dict:
    """The one-sample loop on the whole workload: rows x prefill + new tokens x per-token decode,
    both measured per benchmark on the subset."""
    seconds = 0.0
    detail = {}
    for name, acc in per_bench.items():
        if not acc["rows"]:
            continue
        prefill = acc["prefill"] / acc["rows"]
        per_token = acc["decode"] / acc["decode_tokens"] if acc["decode_tokens"] else None
        full = totals[name]
        est = full["rows"] * prefill + (full["new_tokens"] - full["rows"]) * (per_token or 0.0)
        detail[name] = {"prefill_seconds_per_row": prefill, "decode_seconds_per_token": per_token,
                        "seconds_per_variant": est}
        seconds += variants * est
    rows = variants * sum(t["rows"] for t in totals.values())
    tokens = variants * sum(t["new_tokens"] for t in totals.values())
    return {"seconds": seconds, "rows": rows, "new_tokens": tokens,
            "samples_per_s": rows / seconds if seconds else None,
            "new_tokens_per_s": tokens / seconds if seconds else None,
            "per_benchmark": detail,
            "method": "extrapolated from the subset: per benchmark, measured prefill seconds per row "
                      "x full rows + measured decode seconds per token x full new tokens"}


def project_decode(run: dict) -> tuple[float, str]:
    """One benchmark/variant's decode seconds at full size, and how they were projected.

    A call's batch fills, runs steadily (rows leave, waiting rows take their slots), then
    drains: after the last admission it only empties. The drain lasts about as long whatever
    the call's size, and the rows in it are about one batch, so at full size: the steady
    decode seconds x full steady rows / ran steady rows, plus the drain once per call. That
    needs a steady phase of at least one batch of rows in the run; a smaller run is scaled by
    rows whole, drain included (which errs slow), and says so.
    """
    decode = run["decode_seconds"] - run["capture_seconds"]
    drain, drain_rows = run["drain_seconds"], run["drain_rows"]
    chunks, full_chunks = run.get("chunks", 1), run.get("full_chunks", 1)
    steady_rows = run["rows"] - drain_rows
    if steady_rows < max(1, run["slots"]):
        return decode * run["full_rows"] / run["rows"], "row-scaled (steady phase shorter than one batch)"
    full_steady_rows = run["full_rows"] - drain_rows * full_chunks / chunks
    return ((decode - drain) * full_steady_rows / steady_rows + drain * full_chunks / chunks,
            "steady phase scaled by rows, drain once per call")


def project_fast(per_run: dict, warmup: dict | None = None) -> dict:
    """The fast runner on the whole workload, per benchmark and variant: vision, prefill and
    host work (everything but decode) scaled by full/ran rows, decode by ``project_decode``;
    plus the one-off graph captures (the warm-up's included). Runs without a decode split
    (older reports) are scaled by rows whole."""
    per_row = decode = 0.0
    methods = {}
    for name, r in per_run.items():
        if "decode_seconds" not in r:
            per_row += (r["seconds"] - r["capture_seconds"]) * r["full_rows"] / r["rows"]
            methods[name] = "row-scaled"
            continue
        per_row += (r["seconds"] - r["decode_seconds"]) * r["full_rows"] / r["rows"]
        seconds, methods[name] = project_decode(r)
        decode += seconds
    capture = sum(r["capture_seconds"] for r in per_run.values()) + (warmup or {}).get("capture_seconds", 0.0)
    rows = sum(r["full_rows"] for r in per_run.values())
    tokens = sum(r["new_tokens"] * r["full_rows"] / r["rows"] for r in per_run.values())
    seconds = per_row + decode + capture
    measured_seconds = sum(r["seconds"] for r in per_run.values())
    measured_rows = sum(r["rows"] for r in per_run.values())
    measured_tokens = sum(r["new_tokens"] for r in per_run.values())
    return {"seconds": seconds, "per_row_seconds": per_row, "decode_seconds": decode, "capture_seconds": capture,
            "decode_methods": methods, "rows": rows, "new_tokens": tokens,
            "samples_per_s": rows / seconds if seconds else None,
            "new_tokens_per_s": tokens / seconds if seconds else None,
            "measured": {"seconds": measured_seconds, "rows": measured_rows, "new_tokens": measured_tokens,
                         "samples_per_s": measured_rows / measured_seconds if measured_seconds else None,
                         "new_tokens_per_s": measured_tokens / measured_seconds if measured_seconds else None},
            "method": "measured on the scaled workload; per benchmark and variant, everything but decode x full "
                      "rows / ran rows, decode as project_decode says (decode_methods), graph captures once"}


def figures(report: dict, workload: Workload, costs: dict, engine: Any) -> dict:
    """The headline numbers, each next to its target; a figure not measured is None."""
    targets = workload.targets
    out: dict[str, Any] = {"device": report.get("device")}
    a = report.get("a", {}).get("projection")
    fast = report.get("fast", {}).get("projection")
    out["a_projected_minutes"] = a["seconds"] / 60 if a else None
    out["fast_projected_minutes"] = fast["seconds"] / 60 if fast else None
    out["a_samples_per_s"] = a["samples_per_s"] if a else None
    out["a_new_tokens_per_s"] = a["new_tokens_per_s"] if a else None
    out["fast_samples_per_s"] = fast["samples_per_s"] if fast else None
    out["fast_new_tokens_per_s"] = fast["new_tokens_per_s"] if fast else None
    out["speedup"] = a["seconds"] / fast["seconds"] if a and fast and fast["seconds"] else None
    peaks = [report.get(p, {}).get("peak_gib") for p in ("a", "fast", "plain")]
    peaks = [p for p in peaks if p is not None]
    out["peak_gib"] = max(peaks) if peaks else None
    eq = report.get("equivalence")
    out["equivalence"] = eq["fraction"] if eq else None
    card = report.get("card")
    if card and fast:
        slots = report["fast"]["stats"]["slots"] or engine.config.max_slots
        limit = card_limit(report["workload_totals"], costs, card, slots, len(workload.variants),
                           vision_per_variant=True)
        out["card_limit"] = limit
        out["limit_ratio"] = fast["seconds"] / limit["limit_seconds"]
        out["fraction_of_limit"] = limit["limit_seconds"] / fast["seconds"]
    else:
        limit = None
        out["card_limit"] = None
        out["limit_ratio"] = None
        out["fraction_of_limit"] = None
    out["breakdown"] = time_breakdown(report["fast"], limit) if fast else None
    checks = {
        "gate_minutes": (out["fast_projected_minutes"], "<=", targets["gate_minutes"]),
        "speedup": (out["speedup"], ">=", targets["speedup"]),
        "limit_ratio": (out["limit_ratio"], "<=", targets["limit_ratio"]),
        "peak_gib": (out["peak_gib"], "<=", targets["peak_gib"]),
        "equivalence": (out["equivalence"], ">=", targets["equivalence"]),
    }
    out["targets"] = {name: {"value": value, "target": f"{op} {goal}",
                             "met": None if value is None else (value <= goal if op == "<=" else value >= goal)}
                      for name, (value, op, goal) in checks.items()}
    return out


def time_breakdown(fast_section: dict, limit: dict | None) -> dict:
    """Where the projected full gate goes, phase by phase, each next to its floor on this card
    (None without a card): what limits the time, in the report itself."""
    projection = fast_section["projection"]
    phases = {"vision": 0.0, "prefill": 0.0, "prep_wait": 0.0}
    for run in fast_section["per_run"].values():
        for phase in phases:
            phases[phase] += run["stats"]["seconds"].get(phase, 0.0) * run["full_rows"] / run["rows"]
    phases["decode"] = projection.get("decode_seconds", 0.0)
    phases["other"] = projection["seconds"] - sum(phases.values())  # host work, graph captures
    floors = ({"vision": limit["image_seconds"], "prefill": limit["prefill_seconds"],
               "decode": limit["decode_seconds"] + limit["cross_kv_read_seconds"]} if limit else {})
    total = projection["seconds"]
    return {phase: {"seconds": seconds, "share": seconds / total if total else None,
                    "floor_seconds": floors.get(phase),
                    "over_floor": seconds / floors[phase] if floors.get(phase) else None}
            for phase, seconds in phases.items()}

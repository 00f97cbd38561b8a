"""``lavender-checks bench-series``: a checkpoint series in one process against separate runs.

On the full-size architecture with random weights (``synthetic/fullsize.py``) and N random
Lavender-shaped adapters (default 3; ``workload.toml`` [adapter]), over a scaled copy of the
speed workload (``workload.toml``), through the fast engine in one process on one GPU:

* ``beside`` (what ``run --lora A --lora B ...`` does): the base built once, every adapter
  added beside it (peft's named adapters), the base generated once, then each adapter;
* ``in_turn``: the same base, each adapter added when its turn comes and deleted after it
  (the alternative to loading them beside; the same generation);
* ``separate``: N runs as ``run --lora X`` makes them, one after the other, each building
  the base with one adapter and generating base and adapter; ``separate_shared_store`` is the
  same less the base generation of runs 2..N, which a shared prediction store reuses.

Each adapter's (and the base's) greedy tokens are compared between ``beside`` and its
separate run. Building is random initialisation on the device: a real run reads the weights
from disk first, which is not timed here (each separate run pays it again). Writes
``reports/bench/bench-series-<time>.json`` (``--out``) and prints the figures; ``--tiny-cpu``
runs the harness on the tiny model on CPU (a test: its timings say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS
from lavender_checks.errors import error_line
from lavender_checks.speed.measure import run_fast
from lavender_checks.speed.subject import peak_gib, reset_peak, sync
from lavender_checks.speed.workload import RequestMaker, WorkloadError, load_workload, sample_rows

BASE = "base"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", type=int, default=3, help="adapters in the series (default 3)")
    parser.add_argument("--workload", default=None, help="workload TOML (default: the package's workload.toml)")
    parser.add_argument("--scale", type=float, default=0.02,
                        help="fraction of every benchmark's rows and images (default 0.02: both ways in a "
                             "few minutes on an H100)")
    parser.add_argument("--max-rows", type=int, default=None, help="at most this many rows per benchmark")
    parser.add_argument("--max-output-tokens", type=int, default=None,
                        help="cap every drawn output length (changes the workload, and says so)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per fast-engine call (default: its own)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--tiny-cpu", action="store_true",
                        help="the tiny model on CPU instead (a test of the harness; timings meaningless)")
    parser.add_argument("--device", default="cuda", help="torch device of the full-size model (default cuda)")
    parser.add_argument("--out", default=None, help="JSON report (default reports/bench/bench-series-<time>.json)")


def main(args: argparse.Namespace) -> int:
    import torch

    if args.adapters < 1:
        print(error_line("bench-series", f"--adapters must be at least 1, got {args.adapters}"), file=sys.stderr)
        return 2
    if not 0 < args.scale <= 1:
        print(error_line("bench-series", f"--scale must be in (0, 1], got {args.scale}"), file=sys.stderr)
        return 2
    if not args.tiny_cpu and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(error_line("bench-series", "CUDA is required (this torch sees no CUDA device); "
                                         "use --tiny-cpu to run the harness on the tiny model on CPU"), file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.tiny_cpu:
        torch.set_num_threads(1)
    try:
        report = run_series_bench(args)
    except WorkloadError as exc:
        print(error_line("bench-series", exc), file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(summary_text(report))
    return 0


# ----------------------------------------------------------------------------- the model


class _Builder:
    """Builds the base model (timed) and adds random adapters to it, full-size or tiny."""

    def __init__(self, args, workload):
        self.args = args
        if args.tiny_cpu:
            from lavender_checks.synthetic.tiny import LORA, LORA_B_STD

            self.lora, self.b_std = dict(LORA), LORA_B_STD
        else:
            adapter = workload.adapter
            self.lora = {"r": adapter["r"], "lora_alpha": adapter["lora_alpha"],
                         "target_modules": list(adapter["target_modules"]), "lora_dropout": 0.0}
            self.b_std = 0.02

    def base(self):
        """(a ``ModelPair`` without adapter, seconds to build it)."""
        t0 = time.perf_counter()
        if self.args.tiny_cpu:
            from lavender_checks.model import load_pair
            from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

            pair = load_pair(ensure_tiny_checkpoints().base, None, device="cpu", dtype=self.args.dtype or "float32")
        else:
            from lavender_checks.synthetic.fullsize import fullsize_pair

            pair = fullsize_pair(self.args.device, self.args.dtype, seed=self.args.seed, with_adapter=False)
        pair.processor.tokenizer.padding_side = "left"
        sync(pair.device)
        return pair, time.perf_counter() - t0

    def add(self, model, position: int, name: str):
        """``model`` with random adapter ``position`` added as ``name`` (the same weights for the
        same position, whatever else is loaded)."""
        from lavender_checks.synthetic.tiny import add_random_lora

        return add_random_lora(model, self.lora, self.args.seed + 1 + position, self.b_std, name)


def _series_pair(pair, names: list[str]):
    """The pair as a ``model.SeriesPair`` whose variants are ``base`` and ``names`` (adapters
    already on ``pair.model`` under those names)."""
    from lavender_checks.model import ModelPair, SeriesAdapter, SeriesPair

    series = SeriesPair(**{f: getattr(pair, f) for f in ModelPair.__dataclass_fields__})
    for name in names:
        series.adapters[name] = SeriesAdapter(name=name, path=Path("random"), fingerprint=f"random-{name}",
                                              peft_name=name)
    return series


def _engine(pair, args):
    from lavender_checks.engines.fast.config import FastGenConfig
    from lavender_checks.engines.fast.engine import FastGenerator
    from lavender_checks.engines.request import greedy_settings
    from lavender_checks.speed.subject import FORCE_NEVER_EOS

    config = greedy_settings(pair.base_model.generation_config, pair.processor.tokenizer).generation_config
    config.min_new_tokens = FORCE_NEVER_EOS  # every row its drawn length (random weights)
    return FastGenerator(pair.model, pair.processor, variant_context=pair.variant, generation_config=config,
                         config=FastGenConfig(phase_timing=True))


def _free() -> None:
    """Collect what the caller dropped (the model, an engine's caches) before the next build."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the paths


def run_series_bench(args) -> dict:
    import torch

    workload = load_workload(args.workload)
    started = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.out) if args.out else REPORTS / "bench" / f"bench-series-{started}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [f"adapter{i}" for i in range(args.adapters)]
    report: dict[str, Any] = {"started": started, "adapters": args.adapters, "scale": args.scale,
                              "workload": str(workload.path), "notes": []}
    if args.tiny_cpu:
        report["notes"].append("tiny model on CPU: a test of the harness; its timings say nothing about "
                               "the full-size model on a GPU")
    if args.max_output_tokens is not None:
        report["notes"].append(f"every output length capped at {args.max_output_tokens}: not the stated workload")
    report["notes"].append("build = random initialisation on the device (after one untimed build); a real "
                           "run also starts a process and reads the weights from disk, once per run")
    builder = _Builder(args, workload)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    # Untimed: a first build pays one-off costs (imports, kernels) that the runs below, which
    # share this process, would otherwise not share alike.
    warm, report["warmup_build_s"] = builder.base()
    del warm
    _free()
    # beside: one base, every adapter added to it, the base generated once
    pair, build_s = builder.base()
    report["device"] = torch.cuda.get_device_name(pair.device) if pair.device.type == "cuda" else "cpu"
    report["dtype"] = str(pair.dtype).removeprefix("torch.")
    maker = RequestMaker(pair.processor, seed=workload.seed)
    requests = []
    for load in workload.benchmarks:
        rows = sample_rows(load, workload.seed, args.scale)[: args.max_rows]
        requests += maker.requests(rows, cap=args.max_output_tokens)[0]
    report["rows"] = len(requests)
    report["new_tokens_per_variant"] = sum(r.max_new_tokens for r in requests)
    chunk = args.chunk_rows or 10 ** 9
    reset_peak(pair.device)
    t0 = time.perf_counter()
    model = pair.model
    for position, name in enumerate(names):
        model = builder.add(model, position, name)
    pair.model = model
    series = _series_pair(pair, names)
    adapters_s = time.perf_counter() - t0
    engine = _engine(series, args)
    tokens: dict[str, dict[str, dict]] = {"beside": {}, "separate": {}}
    beside = {"build_s": build_s, "adapters_s": adapters_s, "generate_s": {}}
    for variant in [BASE, *names]:
        result = run_fast(engine, requests, variant, chunk)
        beside["generate_s"][variant] = result["seconds"]
        tokens["beside"][variant] = result["ids"]
    beside["total_s"] = build_s + adapters_s + sum(beside["generate_s"].values())
    beside["peak_gib"] = peak_gib(pair.device)
    report["beside"] = beside
    save()

    # in turn: the same base, each adapter added for its turn (beside the last one for a
    # moment) and the last one deleted, one engine throughout as in the series
    model = series.model.unload()  # the base without any LoRA layer
    del engine, series
    _free()
    turn = {"adapter_s": {}, "generate_s": {}}
    engine = None
    for position, name in enumerate(names):
        t0 = time.perf_counter()
        model = builder.add(model, position, name)
        model.set_adapter(name, inference_mode=True)
        if position:
            model.delete_adapter(names[position - 1])
        turn["adapter_s"][name] = time.perf_counter() - t0
        pair.model = model
        turn_pair = _series_pair(pair, [name])
        if engine is None:
            engine = _engine(turn_pair, args)
        engine.variant_context = turn_pair.variant
        result = run_fast(engine, requests, name, chunk)
        turn["generate_s"][name] = result["seconds"]
    turn["adapters_and_generation_s"] = sum(turn["adapter_s"].values()) + sum(turn["generate_s"].values())
    beside["adapters_and_generation_s"] = adapters_s + sum(beside["generate_s"][n] for n in names)
    report["in_turn"] = turn
    del engine, turn_pair, model, pair
    _free()
    save()

    # separate runs: each builds its base with one adapter and generates base and adapter
    separate = {"runs": []}
    for position, name in enumerate(names):
        run_pair, build_s = builder.base()
        t0 = time.perf_counter()
        run_pair.model = builder.add(run_pair.model, position, name)
        run_pair = _series_pair(run_pair, [name])
        adapter_s = time.perf_counter() - t0
        engine = _engine(run_pair, args)
        run = {"build_s": build_s, "adapter_s": adapter_s, "generate_s": {}}
        for variant in (BASE, name):
            result = run_fast(engine, requests, variant, chunk)
            run["generate_s"][variant] = result["seconds"]
            tokens["separate"].setdefault(variant, {})
            tokens["separate"][variant][position] = result["ids"]
        run["total_s"] = build_s + adapter_s + sum(run["generate_s"].values())
        separate["runs"].append(run)
        del engine, run_pair
        _free()
        save()
    separate["total_s"] = sum(run["total_s"] for run in separate["runs"])
    separate["shared_store_total_s"] = separate["total_s"] - sum(run["generate_s"][BASE]
                                                                 for run in separate["runs"][1:])
    report["separate"] = separate
    report["same_tokens"] = _same_tokens(tokens, names)
    report["figures"] = {
        "beside_total_s": beside["total_s"], "separate_total_s": separate["total_s"],
        "separate_shared_store_total_s": separate["shared_store_total_s"],
        "speedup_vs_separate": separate["total_s"] / beside["total_s"],
        "speedup_vs_shared_store": separate["shared_store_total_s"] / beside["total_s"],
        "beside_adapters_and_generation_s": beside["adapters_and_generation_s"],
        "in_turn_adapters_and_generation_s": turn["adapters_and_generation_s"],
        "faster_of_beside_and_in_turn": ("beside" if beside["adapters_and_generation_s"]
                                         <= turn["adapters_and_generation_s"] else "in_turn"),
    }
    report["report_path"] = str(out)
    save()
    return report


def _same_tokens(tokens: dict, names: list[str]) -> dict[str, dict[str, int]]:
    """Per variant, the rows whose greedy tokens in the one-process series equal the separate
    run's (the base: every separate run's)."""
    out = {}
    for variant in [BASE, *names]:
        beside = tokens["beside"][variant]
        for position, ids in tokens["separate"].get(variant, {}).items():
            label = variant if variant != BASE else f"base (run {position})"
            out[label] = {"same": sum(beside[key] == ids.get(key) for key in beside), "rows": len(beside)}
    return out


def summary_text(report: dict) -> str:
    f, beside, separate = report["figures"], report["beside"], report["separate"]
    lines = [f"bench-series: {report['adapters']} adapters, {report['rows']} rows per variant (scale "
             f"{report['scale']}), {report['device']}, {report['dtype']}"]
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append(f"one process, adapters beside one base: build {beside['build_s']:.1f} s, adapters "
                 f"{beside['adapters_s']:.1f} s, generate "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in beside["generate_s"].items())
                 + f"; total {beside['total_s']:.1f} s"
                 + (f", peak {beside['peak_gib']:.1f} GiB" if beside.get("peak_gib") else ""))
    lines.append("separate runs: " + ", ".join(f"run {i}: {run['total_s']:.1f} s" for i, run in
                                                 enumerate(separate["runs"]))
                 + f"; total {separate['total_s']:.1f} s, {separate['shared_store_total_s']:.1f} s with a "
                   "shared store (base generated once)")
    lines.append(f"series in one process: {f['speedup_vs_separate']:.2f}x faster than separate runs, "
                 f"{f['speedup_vs_shared_store']:.2f}x than separate runs on a shared store")
    lines.append(f"adapters and their generation: beside {f['beside_adapters_and_generation_s']:.1f} s, "
                 f"in turn {f['in_turn_adapters_and_generation_s']:.1f} s -> "
                 f"{f['faster_of_beside_and_in_turn']} is faster")
    same = report["same_tokens"]
    lines.append("same greedy tokens as the separate runs: "
                 + ", ".join(f"{k} {v['same']}/{v['rows']}" for k, v in same.items()))
    lines.append(f"report: {report['report_path']}")
    return "\n".join(lines)


__all__ = ["add_arguments", "main", "run_series_bench", "summary_text"]

"""``lavender-checks bench``: the speed benchmark on the full-size architecture.

Builds Llama-3.2-11B-Vision's architecture with random weights and a random LoRA shaped like
the Lavender authors' default (``workload.toml`` [adapter]; a real ``adapter_config.json``
overrides it), then runs the stated workload (``workload.toml``: the four benchmarks' rows,
images, tiles, prompt and output lengths) through, in one process on one GPU:

* ``a``: a one-sample loop like VLMEvalKit's (``processor`` + ``model.generate`` per row),
  on a stratified subset with output lengths capped, extrapolated to the whole workload from
  its measured per-row prefill time and per-token decode time;
* ``fast``: the fast runner (``lavender_checks.engines.fast.engine``) on a scaled copy of the workload
  (every benchmark and variant, rows in runner-sized chunks), projected to the full gate;
* ``plain`` (optional): the suite's batched ``generate`` on a few rows, for reference.

The ``a`` subset doubles as the correctness sample: the fast runner generates the same rows
and the report counts the sequences whose greedy tokens equal one-sample ``generate``'s.

Random weights never stop by themselves, so output lengths are forced: EOS is switched off in
the generation config and every row generates exactly its drawn number of tokens.

Writes ``reports/bench/bench-<time>.json`` (``--out``) and prints a summary. Without CUDA it
exits with an error unless ``--tiny-cpu`` runs the whole harness on the tiny model on CPU (for
tests; its timings mean nothing). Speed targets are printed next to the figures, never
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS
from lavender_checks.errors import error_line
from lavender_checks.speed.measure import (
    equivalence_section,
    measure_card,
    measure_fast,
    run_hf_batched,
    run_one_sample,
    run_plain_section,
)
from lavender_checks.speed.project import (
    figures,
    model_costs,
    project_one_sample,
)
from lavender_checks.speed.subject import (
    build_fullsize_subject,
    build_tiny_subject,
    peak_gib,
    reset_peak,
)
from lavender_checks.speed.workload import (
    RequestMaker,
    Workload,
    WorkloadError,
    load_workload,
    sample_rows,
    shard_rows,
    workload_totals,
)

# Epoch seconds at which a launcher started this process (bench-gpus sets it; torchrun passes
# it on to its ranks): the start of the time split.
LAUNCHED_AT_ENV = "LAVENDER_BENCH_LAUNCHED_AT"


def add_workload_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The workload and the fast path's knobs; returns their actions (``bench-gpus`` hands
    these options on to every process)."""
    added: list[argparse.Action] = []

    def add(*flags, **options) -> None:
        added.append(parser.add_argument(*flags, **options))

    add("--workload", default=None, help="workload TOML (default: the package's workload.toml)")
    add("--scale", type=float, default=0.2,
                        help="fraction of every benchmark's rows and images the fast path runs (default 0.2: "
                             "the smallest at which every benchmark's steady phase is longer than one batch "
                             "of 125 slots; a smaller run projects its decode more coarsely, and says so)")
    add("--slots", type=int, default=None, help="decode batch of the fast path (default: FastGenConfig)")
    add("--memory-share", type=float, default=None,
        help="share of the card's free GPU memory (after the model) the fast path sizes its caches "
             "and workspace for (default: FastGenConfig's 0.85: ~70 GiB on an 80 GB card)")
    add("--memory-budget-gib", type=float, default=None,
        help="at most this peak GPU memory for the fast path's sizing (default: no cap beyond the share)")
    add("--chunk-rows", type=int, default=None,
                        help="rows per fast-runner call, grouped by image as the runner hands them "
                             "(default: the fast engine's, a whole benchmark)")
    add("--warmup-rows", type=int, default=32,
                        help="rows per benchmark and variant run through the fast runner, untimed, before "
                             "its timed pass (first-use costs of kernels and allocations; 0: none)")
    add("--vision-batch", type=int, default=None, help="images per vision-tower call")
    add("--no-graphs", action="store_true", help="decode without CUDA graphs")
    add("--vision-attention", choices=("transformers", "split"), default=None,
                        help="vision-tower attention of the fast path (default: FastGenConfig)")
    add("--buckets", choices=("double", "linear"), default=None,
                        help="key-length buckets of the decode step (default: FastGenConfig)")
    add("--admit-fraction", type=float, default=None,
                        help="prefill waiting rows once this fraction of the slots is free (default: FastGenConfig)")
    add("--max-output-tokens", type=int, default=None,
                        help="cap every drawn output length (quick runs; changes the workload, and says so)")
    add("--adapter-config", default=None,
                        help="a real adapter_config.json whose r, lora_alpha and target_modules the random adapter takes")
    add("--attn", default="sdpa", help="attention implementation of the model (default sdpa)")
    add("--seed", type=int, default=0, help="seed of the random weights")
    add("--decode-key-block", type=int, default=None,
        help="invariant mode: decode attention over blocks of this many keys, reading key-length buckets "
             "of whole blocks instead of the whole cache (FastGenConfig.decode_key_block; default off)")
    add("--throughput-mode", action="store_true",
        help="the fast path without batch invariance (FastGenConfig.invariant=False)")
    return added


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--paths", default="a,fast",
                        help="comma-separated paths to run: a (one-sample loop), fast, plain, repro "
                             "(batch invariance: speed/repro.py), rounds (after fast: the same rows in "
                             "--stop-early's rounds, speed/rounds.py) (default a,fast)")
    parser.add_argument("--repro-rows", type=int, default=52,
                        help="repro: rows per benchmark (default 52: 208 rows, each in both variants)")
    parser.add_argument("--repro-max-new", type=int, default=32,
                        help="repro: cap of every row's drawn output length (default 32)")
    parser.add_argument("--no-repro-throughput", dest="repro_throughput", action="store_false",
                        help="repro: skip the throughput mode's spread")
    parser.add_argument("--no-repro-projection", dest="repro_projection", action="store_false",
                        help="repro: skip the projected full gate of both modes")
    parser.add_argument("--a-rows", type=int, default=6,
                        help="rows per benchmark and variant for the one-sample loop and the correctness sample")
    parser.add_argument("--a-max-new-tokens", type=int, default=16,
                        help="output cap for the one-sample loop's rows (its per-token cost is extrapolated)")
    parser.add_argument("--plain-rows", type=int, default=8, help="rows per benchmark for the plain path")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                        help="run shard I of N of every benchmark's scaled rows on the fast path (whole "
                             "images, as the gate shards under pytest-xdist); `bench-gpus` starts one per GPU")
    parser.add_argument("--barrier", default=None, metavar="DIR",
                        help="with --shard i/n: after the timed pass, wait in the file barrier in DIR until "
                             "every shard's process is done, as pytest -n N workers do (`bench-gpus`)")
    parser.add_argument("--torchrun", action="store_true",
                        help="under torchrun: shard RANK of WORLD_SIZE on the GPU of LOCAL_RANK, the ranks "
                             "meeting in a gloo group after the timed pass, as the gate's ranks do; --out "
                             "and --tokens get -rank<RANK> before their suffix (`bench-gpus`)")
    parser.add_argument("--tokens", default=None, metavar="JSONL",
                        help="write the fast path's token ids of every row (one JSON line each: run, key, "
                             "ids) to this file, for comparing shards with one GPU (`bench-gpus`)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights and compute of the full-size model (default bfloat16 on CUDA). float32 "
                             "(TF32 off) makes the correctness sample immune to bf16 near ties; its "
                             "timings are not the gate's")
    parser.add_argument("--tie-margin", type=float, default=0.1,
                        help="score margin below which a first difference counts as a near tie (report only)")
    parser.add_argument("--no-force-lengths", dest="force_lengths", action="store_false",
                        help="keep EOS on (outputs may end early; lengths no longer follow the workload)")
    parser.add_argument("--tiny-cpu", action="store_true",
                        help="run the whole harness on the tiny model on CPU (a test of the harness; timings mean nothing)")
    parser.add_argument("--device", default="cuda",
                        help="device of the full-size model (default cuda; cpu only makes sense for a scaled-down config)")
    parser.add_argument("--out", default=None, help="JSON report path (default reports/bench/bench-<time>.json)")


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shard is i/n, e.g. 0/2, not {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def main(args: argparse.Namespace) -> int:
    # Where the process's time starts: the launcher's clock (bench-gpus sets it before it
    # starts a process or torchrun), else this process's start.
    launched = float(os.environ.get(LAUNCHED_AT_ENV) or process_started())
    torchrun = getattr(args, "torchrun", False)
    if torchrun:
        from lavender_checks.run import distributed

        if not distributed.launched():
            print(error_line("bench", "--torchrun needs torchrun's environment "
                                      f"({', '.join(distributed.TORCHRUN_ENV)})"), file=sys.stderr)
            return 2
        if args.shard is not None or args.barrier:
            print(error_line("bench", "--torchrun takes its shard from torchrun (no --shard, no --barrier)"),
                  file=sys.stderr)
            return 2
        if not args.tiny_cpu:
            distributed.pin_local_gpu(distributed.visible_gpus())  # before CUDA starts
    if args.barrier and args.shard is None:
        print(error_line("bench", "--barrier needs --shard i/n"), file=sys.stderr)
        return 2
    import torch

    if not args.tiny_cpu and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(error_line("bench", "CUDA is required (this torch sees no CUDA device); "
                                  "use --tiny-cpu to run the harness on the tiny model on CPU"), file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - {"a", "fast", "plain", "repro", "rounds"})
    if unknown or not paths:
        print(error_line("bench", f"unknown path(s) {unknown or paths}; choose from a, fast, plain, repro, rounds"),
              file=sys.stderr)
        return 2
    if not 0 < args.scale <= 1:
        print(error_line("bench", f"--scale must be in (0, 1], got {args.scale}"), file=sys.stderr)
        return 2
    if (args.shard is not None or torchrun) and paths != ["fast"]:
        print(error_line("bench", "--shard and --torchrun run the fast path only (add --paths fast)"), file=sys.stderr)
        return 2
    if args.memory_share is not None and not 0 < args.memory_share <= 1:
        print(error_line("bench", f"--memory-share must be in (0, 1], got {args.memory_share}"), file=sys.stderr)
        return 2
    from lavender_checks.engines.fast.config import FastGenConfig

    cache_len = FastGenConfig.min_cache_len
    if args.decode_key_block is not None and (args.decode_key_block < 1 or cache_len % args.decode_key_block):
        print(error_line("bench", f"--decode-key-block must divide the decode cache's {cache_len} positions "
                                  f"(min_cache_len), got {args.decode_key_block}"), file=sys.stderr)
        return 2
    if args.chunk_rows is not None and args.chunk_rows < 1:
        print(error_line("bench", f"--chunk-rows must be at least 1, got {args.chunk_rows}"), file=sys.stderr)
        return 2
    # The ranks (or shard processes) meet before any work, as the gate's do.
    meet = None
    working = contextlib.ExitStack()
    if torchrun:
        group = distributed.Group()
        args.shard = (group.rank, group.world_size)
        default_out = str(REPORTS / "bench" / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json")
        args.out, args.tokens = (_rank_path(p, group.rank) for p in (args.out or default_out, args.tokens))

        def meet() -> None:
            group.agree("bench: timed pass done")
    elif args.barrier:
        from lavender_checks.run.shards import ShardBarrier

        barrier = ShardBarrier(args.barrier, args.shard[1], owner=f"bench pid {os.getpid()}")
        if not barrier.claim(args.shard[0]):
            print(error_line("bench", f"shard {args.shard[0]} of the barrier {args.barrier} is taken "
                                      f"by {barrier.owner_of(args.shard[0])}"), file=sys.stderr)
            return 2
        # Working on the shard (a heartbeat, as a gate worker) until its timed pass ends.
        working.enter_context(barrier.working(args.shard[0]))

        def meet() -> None:
            working.close()  # the shard is done
            barrier.wait()
    threads = torch.get_num_threads()
    if args.tiny_cpu:
        torch.set_num_threads(1)  # the tiny model's ops are too small to split across threads
    try:
        workload = load_workload(args.workload)
        report = run_bench(workload, args, paths, launched=launched, meet=meet)
    except BaseException as exc:
        with contextlib.suppress(BaseException):  # the barrier records the failure, then re-raises it
            working.__exit__(type(exc), exc, exc.__traceback__)
        if isinstance(exc, WorkloadError):
            print(error_line("bench", exc), file=sys.stderr)
            return 2
        raise
    finally:
        torch.set_num_threads(threads)
    print(summary_text(report))
    return 0


def process_started() -> float:
    """Epoch seconds at which this process started (Linux: from /proc, to 10 ms), else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _rank_path(path: str | None, rank: int) -> str | None:
    """``dir/name.json`` -> ``dir/name-rank<rank>.json``: one file per torchrun rank."""
    if path is None:
        return None
    p = Path(path)
    return str(p.with_name(f"{p.stem}-rank{rank}{p.suffix}"))


def run_bench(workload: Workload, args, paths: list[str], launched: float | None = None,
              meet: Any = None) -> dict:
    """Run the chosen paths and return the report (also written to ``--out`` as it grows).

    ``launched``: when the process was started (epoch seconds), the start of the fast path's
    time split; ``meet``: called after the fast path's timed pass, the barrier of a sharded
    run (its wait is the split's last part)."""
    import torch

    from lavender_checks.engines.fast.config import FastGenConfig
    from lavender_checks.engines.fast.engine import FastGenerator

    started = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.out) if args.out else REPORTS / "bench" / f"bench-{started}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": started, "workload": str(workload.path), "scale": args.scale, "paths": paths,
        "shard": list(args.shard) if args.shard else None,
        "targets": workload.targets, "versions": _versions(),
        "notes": [],
    }

    def save() -> None:
        out.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")

    cap = args.max_output_tokens
    if cap is not None:
        report["notes"].append(f"every output length capped at {cap}: not the stated workload")
    if not args.force_lengths:
        report["notes"].append("EOS left on: outputs may end before their drawn length")
    if args.tiny_cpu:
        report["notes"].append("tiny model on CPU: a test of the harness; its timings and targets say "
                               "nothing about the full-size model on a GPU")
    subject = build_tiny_subject(workload, args) if args.tiny_cpu else build_fullsize_subject(workload, args)
    mllama_config = subject.model.get_base_model().config if hasattr(subject.model, "get_base_model") else subject.model.config
    report["device"] = (torch.cuda.get_device_name(subject.device) if subject.device.type == "cuda" else "cpu")
    report["model"] = dict(subject.description, attn_implementation=getattr(mllama_config, "_attn_implementation", None))
    report["dtype"] = str(subject.model.dtype if hasattr(subject.model, "dtype") else "").replace("torch.", "")
    if report["dtype"] == "float32" and not args.tiny_cpu:
        report["notes"].append("float32 weights and compute: the correctness sample is the point of this run; "
                               "its timings are not the gate's (bfloat16)")
    costs = model_costs(subject.model)
    report["costs"] = costs
    if subject.device.type == "cuda" and args.shard is None:
        report["card"] = measure_card(subject.device)
    save()

    totals = workload_totals(workload)
    if cap is not None:
        for load in workload.benchmarks:
            totals[load.name]["new_tokens"] = sum(min(cap, r.output_tokens)
                                                  for r in sample_rows(load, workload.seed, 1.0))
    report["workload_totals"] = totals
    maker = RequestMaker(subject.processor, seed=workload.seed)

    cfg = FastGenConfig()
    overrides = {}
    if args.slots:
        overrides["max_slots"] = args.slots
    if args.vision_batch:
        overrides["vision_batch"] = args.vision_batch
    if getattr(args, "memory_budget_gib", None):
        overrides["memory_budget_gib"] = args.memory_budget_gib
    if getattr(args, "memory_share", None):
        overrides["memory_share"] = args.memory_share
    if args.no_graphs:
        overrides["cuda_graphs"] = False
    if args.vision_attention:
        overrides["vision_attention"] = args.vision_attention
    if args.buckets:
        overrides["bucket_growth"] = args.buckets
    if args.admit_fraction:
        overrides["admit_fraction"] = args.admit_fraction
    if getattr(args, "throughput_mode", False):
        overrides["invariant"] = False
    if getattr(args, "decode_key_block", None):
        overrides["decode_key_block"] = args.decode_key_block
    cfg = FastGenConfig(**{**asdict(cfg), **overrides, "phase_timing": True})
    engine = FastGenerator(subject.model, subject.processor, variant_context=subject.variant_context,
                           generation_config=subject.generation_config, config=cfg)
    report["fast_config"] = asdict(cfg)
    save()

    # The correctness sample and the one-sample loop's subset: the first a_rows rows of every
    # benchmark (at the run's scale), with output lengths capped. Requests are made once, before
    # any timing (making a text of a given token length takes a few tokenizer calls); image
    # loaders inside them run in the timed part.
    scaled = {load.name: sample_rows(load, workload.seed, args.scale) for load in workload.benchmarks}
    # The share of the full gate this process stands for (1 unless sharded).
    share = {name: 1.0 for name in scaled}
    if args.shard is not None:
        for name, rows in scaled.items():
            mine = shard_rows(rows, args.shard)
            share[name] = len(mine) / len(rows)
            scaled[name] = mine
    if "a" in paths:
        a_cap = min(args.a_max_new_tokens, cap or args.a_max_new_tokens)
        a_requests = {name: maker.requests(rows[: args.a_rows], cap=a_cap)[0] for name, rows in scaled.items()}
        a_section: dict[str, Any] = {"rows": {}, "max_new_tokens_cap": a_cap}
        compared: dict[str, dict] = {}
        per_bench: dict[str, dict] = {}
        first = next(iter(a_requests.values()))[:1]
        run_one_sample(subject, first, workload.variants[0])  # warm-up, not timed
        reset_peak(subject.device)
        for variant in workload.variants:
            for name, requests in a_requests.items():
                timed = run_one_sample(subject, requests, variant)
                for key, value in timed.items():
                    a_section["rows"][f"{variant}/{key}"] = {k: v for k, v in value.items()
                                                             if k not in ("ids", "margins")}
                acc = per_bench.setdefault(name, {"rows": 0, "prefill": 0.0, "decode": 0.0, "decode_tokens": 0,
                                                  "seconds": 0.0, "new_tokens": 0})
                for value in timed.values():
                    acc["rows"] += 1
                    acc["seconds"] += value["seconds"]
                    acc["prefill"] += value["prefill_seconds"]
                    acc["decode"] += value["seconds"] - value["prefill_seconds"]
                    acc["decode_tokens"] += max(0, len(value["ids"]) - 1)
                    acc["new_tokens"] += len(value["ids"])
                for key, value in timed.items():
                    compared[f"{variant}/{key}"] = {"one_sample": value["ids"], "margins": value["margins"]}
        a_section["peak_gib"] = peak_gib(subject.device)
        a_section["per_benchmark"] = per_bench
        a_section["projection"] = project_one_sample(per_bench, totals, len(workload.variants))
        report["a"] = a_section
        save()
        # The same rows through the fast runner (all benchmarks of a variant in one call, as in
        # a run) and through plain batched generate.
        # With the split vision attention, the fast path runs once more with transformers' own
        # vision attention: a difference between the two points at the vision tower.
        fast_paths = {"fast": engine.config}
        if engine.config.vision_attention != "transformers":
            fast_paths["fast_hf_vision"] = FastGenConfig(**{**asdict(engine.config), "vision_attention": "transformers"})
        for variant in workload.variants:
            everything = [r for requests in a_requests.values() for r in requests]
            for path, path_config in fast_paths.items():
                engine.config = path_config
                fast = engine.generate_ids(everything, variant)
                for request in everything:
                    compared[f"{variant}/{request.key}"][path] = fast[request.key]
            engine.config = fast_paths["fast"]
            batched = run_hf_batched(subject, everything, variant)
            for request in everything:
                compared[f"{variant}/{request.key}"]["hf_batched"] = batched[request.key]
        report["equivalence"] = equivalence_section(compared, args.tie_margin)
        save()

    if "fast" in paths:
        report["fast"] = {}  # saved as it grows
        fast_section = measure_fast(engine, workload, scaled, totals, share, maker, args, cap, report["fast"],
                                    report["notes"], save, launched=launched, meet=meet, tokens_path=args.tokens)
        # What this process spent on the gate's work, start-up included (what a pytest-xdist
        # worker spends): building the model, the warm-up and the timed pass.
        fast_section["process_gate_seconds"] = (subject.description.get("build_seconds", 0.0)
                                                + fast_section["warmup"]["seconds"]
                                                + fast_section["projection"]["measured"]["seconds"])
        save()

    if "rounds" in paths:
        from lavender_checks.engines.fast.config import DEFAULT_CHUNK_ROWS
        from lavender_checks.speed.rounds import measure_rounds

        if "fast" not in report:
            report["notes"].append("rounds: needs the fast path in the same process (--paths fast,rounds); not run")
        else:
            report["rounds"] = measure_rounds(engine, workload, scaled, maker, cap, args.chunk_rows or DEFAULT_CHUNK_ROWS,
                                              report["fast"], seed=args.seed)
            save()

    if "repro" in paths:
        from lavender_checks.speed.repro import run_repro_path

        report["repro"] = {}  # saved as it grows
        run_repro_path(subject, workload, scaled, totals, share, maker, args, cap, cfg, engine,
                       report["repro"], report["notes"], save)

    if "plain" in paths:
        report["plain"] = run_plain_section(subject, workload, maker, args, cap)
        save()

    report["figures"] = figures(report, workload, costs, engine)
    save()
    report["report_path"] = str(out)
    save()
    return report


def summary_text(report: dict) -> str:
    f = report["figures"]

    def fmt(value, spec=".2f"):
        return "not measured" if value is None else format(value, spec)

    lines = [f"lavender-checks bench on {f['device']} (report: {report.get('report_path')})"]
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  one-sample loop (a): {fmt(f['a_samples_per_s'], '.3f')} samples/s, "
                 f"{fmt(f['a_new_tokens_per_s'], '.1f')} new tokens/s, full gate {fmt(f['a_projected_minutes'], '.1f')} min "
                 "(extrapolated from a subset)")
    lines.append(f"  fast runner (b):     {fmt(f['fast_samples_per_s'], '.2f')} samples/s, "
                 f"{fmt(f['fast_new_tokens_per_s'], '.0f')} new tokens/s, full gate {fmt(f['fast_projected_minutes'], '.1f')} min "
                 f"(projected from scale {report['scale']})")
    for phase, part in (f.get("breakdown") or {}).items():
        floor = (f", {part['over_floor']:.1f}x its floor of {part['floor_seconds']:.0f} s"
                 if part["over_floor"] else "")
        lines.append(f"    {phase:9s} {part['seconds']:8.0f} s of the projected gate ({part['share']:.0%}){floor}")
    for name, check in f["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
        lines.append(f"  {name:13s} {fmt(check['value'], '.3f'):>14s}  target {check['target']:>8s}  {met}")
    repro = report.get("repro")
    if repro and repro.get("invariant"):
        inv = repro["invariant"]
        lines.append(f"  repro: {inv['rows']} rows x {len(inv['variants'])} variants; sequences identical to "
                     "the rows run alone:")
        for name, c in inv["configurations"].items():
            lines.append(f"    {name:34s} {c['identical']}/{c['sequences']}")
        for name, c in (repro.get("throughput_mode") or {}).get("configurations", {}).items():
            lines.append(f"    throughput mode, {name:17s} {c['identical']}/{c['sequences']} (vs its default run)")
        minutes = repro.get("projected_gate_minutes")
        if minutes:
            lines.append(f"    projected full gate: invariant {minutes['invariant']:.1f} min, throughput mode "
                         f"{minutes['throughput']:.1f} min ({repro['invariant_cost']:+.1%})")
    rounds = report.get("rounds")
    if rounds:
        share = rounds["overhead_share"]
        lines.append(f"  --stop-early rounds, a run that goes to the end: {rounds['seconds']:.1f} s in {rounds['calls']} calls "
                     f"against {rounds['fast_seconds']:.1f} s in {rounds['fast_calls']} (drains {rounds['drain_seconds']:.1f} s "
                     f"against {rounds['fast_drain_seconds']:.1f} s): {rounds['extra_seconds']:+.1f} s = "
                     f"{fmt(None if share is None else 100 * share, '+.1f')} % of the projected full gate (target <= 5 %)")
    return "\n".join(lines)


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="lavender-checks bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

"""The gate's torchrun path on GPUs, end to end, with the full-size architecture (CUDA).

Run under torchrun, one rank per GPU:

    torchrun --nproc-per-node 1 scripts/torchrun_gpu_check.py --out reports/torchrun-gpu-check

Every rank pins the GPU of its LOCAL_RANK, joins the gloo group the gate uses, checks an
NCCL all-reduce on its GPU, builds Llama-3.2-11B-Vision with random weights and a random
Lavender-shaped LoRA (``synthetic.fullsize.fullsize_pair``, bf16) and runs the gate's own
collection (``collect_results`` with ``TorchrunShards``, the fast engine) on the mini
benchmarks: shard RANK of WORLD_SIZE generated per rank, rows gathered or shared, rank 0
scoring the union. Output lengths are capped by a profile written next to the results
(``--new-tokens``; random weights never stop by themselves, so every row generates about
that many tokens). A second pass over the same store must generate nothing (resume).
Rank 0 prints the figures and writes them to ``<out>/figures.json``. The verdicts of random
weights mean nothing and are not computed.

``--tiny-cpu`` runs the same path with the tiny pair on CPU (a check of the script itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/torchrun-gpu-check"))
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of every benchmark")
    parser.add_argument("--limit", type=int, default=None, help="the gate's --limit (default: every mini row)")
    parser.add_argument("--store-sharing", choices=("auto", "shared", "gather"), default="auto")
    parser.add_argument("--dist-timeout", type=float, default=1800.0)
    parser.add_argument("--tiny-cpu", action="store_true", help="the tiny pair on CPU: checks the script")
    args = parser.parse_args()

    missing = [m for m in ("openpyxl", "xlsxwriter", "rapidfuzz") if importlib.util.find_spec(m) is None]
    if missing:  # the scoring half of the run needs them; the GPU machine lacks them
        raise SystemExit(f"missing {', '.join(missing)}: install the wheels first, e.g. "
                         "pip install --no-deps --target /tmp/whl .whl/*.whl and PYTHONPATH=$PWD:/tmp/whl")
    from lavender_checks.profiles import PROFILES_DIR
    from lavender_checks.run import distributed, pipeline
    from lavender_checks.run.collect import collect_results
    from lavender_checks.run.config import RunConfig
    from lavender_checks.run.pair import load_model_pair

    if not distributed.launched():
        raise SystemExit("run it under torchrun: torchrun --nproc-per-node 1 scripts/torchrun_gpu_check.py")
    args.out.mkdir(parents=True, exist_ok=True)
    profile = args.out / "profile.toml"
    text = (PROFILES_DIR / "seed-report.toml").read_text()
    text = re.sub(r"(?m)^name = .*$", 'name = "torchrun-gpu-check"', text)
    text = re.sub(r"(?m)^max_new_tokens = \d+", f"max_new_tokens = {args.new_tokens}", text)
    profile.write_text(text)
    config = RunConfig(device="cpu" if args.tiny_cpu else "cuda", profile=str(profile),
                                store=args.out / "store", limit=args.limit)

    # Pins this rank's GPU (before CUDA starts) and joins the gloo group.
    shards = pipeline.torchrun_shards(config, args.store_sharing, args.dist_timeout)
    group = shards.group
    import torch
    import torch.distributed as dist

    figures: dict = {"world_size": group.world_size, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "new_tokens_cap": args.new_tokens,
                     "gloo": "barriers, broadcasts and gathers of the run"}
    if not args.tiny_cpu:
        if not torch.cuda.is_available():
            raise SystemExit("torchrun_gpu_check.py needs CUDA (or --tiny-cpu)")
        device = torch.device("cuda")  # the one GPU this rank sees
        figures["device"] = torch.cuda.get_device_name(device)
        nccl = dist.new_group(backend="nccl")
        ones = torch.ones(1 << 20, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(ones, group=nccl)
        torch.cuda.synchronize()
        figures["nccl_all_reduce"] = {"ok": bool((ones == group.world_size).all().item()),
                                      "seconds": round(time.perf_counter() - t0, 4), "floats": ones.numel()}

    started = time.perf_counter()
    if args.tiny_cpu:
        pair = load_model_pair(RunConfig(device="cpu"))
    else:
        from lavender_checks.synthetic.fullsize import fullsize_pair

        pair = fullsize_pair(device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - started

    passes = []
    for name in ("first", "resume"):
        t0 = time.perf_counter()
        run = collect_results(config, pair=pair, shard=(shards.own, shards.count),
                                       wait_for_shards=shards, writer=shards.writer, progress=False)
        seconds = time.perf_counter() - t0
        passes.append({"pass": name, "seconds": round(seconds, 2),
                       "generated_by_rank": list(shards.generated_by_rank or []),
                       "rows_gathered_to_rank0": shards.rows["gathered"]})
        if run is not None:
            rows = {b: len(v["base"]) + len(v["lavender"]) for b, v in run.predictions.items()}
            passes[-1]["rows_scored"] = sum(rows.values())
            passes[-1]["timing"] = run.metadata["timing"]
    mine = {"rank": group.rank, "host": group.me.host, "gpu": group.me.gpu, "build_s": round(build_s, 2),
            "peak_gib": None if args.tiny_cpu else round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    ranks = group.gather(mine, "figures")
    if group.rank != 0:
        return 0
    first = passes[0]
    generated = sum(first["generated_by_rank"])
    figures.update(store_sharing=shards.sharing, ranks=ranks, passes=passes,
                   rows_generated=generated, rows_per_s=round(generated / first["seconds"], 2),
                   resume_generated=sum(passes[1]["generated_by_rank"]))
    if not args.tiny_cpu:  # random weights never stop early: every row makes the cap
        figures["new_tokens_per_s_about"] = round(generated * args.new_tokens / first["seconds"], 1)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    ok = figures["resume_generated"] == 0 and figures.get("nccl_all_reduce", {"ok": True})["ok"]
    print(f"torchrun gpu check: {'OK' if ok else 'FAILED'}: world {group.world_size}, "
          f"{generated} rows in {first['seconds']} s ({figures['rows_per_s']} rows/s), "
          f"resume generated {figures['resume_generated']}; figures in {args.out / 'figures.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

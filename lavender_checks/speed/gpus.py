"""``lavender-checks bench-gpus``: how the fast path scales from one GPU to N.

The gate under pytest-xdist runs one worker per GPU; each worker loads its own model pair,
generates its shard of every benchmark (whole images, ``data.subset``) and the union is
scored. This command measures that on the full-size architecture with random weights: it
starts ``lavender-checks bench --paths fast --shard i/n`` once per GPU, each process seeing
only its GPU through ``CUDA_VISIBLE_DEVICES`` (as ``conftest.py`` pins xdist workers), and
compares with the same command as one process on one GPU (``--shard 0/1``), run first on
GPU 0 or read from ``--baseline``.

Per process it takes the seconds a gate worker spends (model build, warm-up, the timed
pass) and the full-gate projection of its share. The gate on N GPUs takes as long as its
slowest worker, so the speed-up is the one-GPU figure over the largest of the N. Writes
``reports/bench/gpus-<time>.json`` (``--out``) and prints a summary; the target (1.8x on two
GPUs) is printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS

TARGET_SPEEDUP_2_GPUS = 1.8  # issue target for two GPUs; N GPUs are judged against 0.9 N


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender_checks.speed.bench import add_workload_arguments

    parser.add_argument("--gpus", type=int, default=2, help="GPUs to spread the workload over (default 2)")
    parser.add_argument("--baseline", default=None,
                        help="a `bench --paths fast` report of the same workload on one GPU, instead of running it")
    parser.add_argument("--out", default=None, help="JSON report path (default reports/bench/gpus-<time>.json)")
    parser.add_argument("--tiny-cpu", action="store_true",
                        help="processes run the tiny model on CPU instead of GPUs (a test of the harness; "
                             "timings mean nothing)")
    add_workload_arguments(parser)  # handed on to every `bench` process


def main(args: argparse.Namespace) -> int:
    import torch

    if not args.tiny_cpu and (not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus):
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"lavender-checks bench-gpus: needs {args.gpus} CUDA devices, this machine shows {seen}",
              file=sys.stderr)
        return 2
    if args.gpus < 2:
        print("lavender-checks bench-gpus: --gpus must be at least 2", file=sys.stderr)
        return 2
    started = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.out) if args.out else REPORTS / "bench" / f"gpus-{started}.json"
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.baseline:
            baseline = _read_report(Path(args.baseline))
            _check_same_workload(baseline, args)
            one = {"report": str(args.baseline), "wall_seconds": None, "gpu": "from --baseline"}
        else:
            one = run_processes(args, 1, work)[0]
            baseline = _read_report(Path(one["report"]))
        shards = run_processes(args, args.gpus, work)
        report = summarise(baseline, one, [(_read_report(Path(s["report"])), s) for s in shards], args)
    except BenchProcessError as exc:
        print(f"lavender-checks bench-gpus: {exc}", file=sys.stderr)
        return 1
    report["started"] = started
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary_text(report, out))
    return 0


class BenchProcessError(RuntimeError):
    """A `bench` process failed or wrote no report."""


def _child_argv(args: argparse.Namespace, shard: tuple[int, int], report: Path) -> list[str]:
    """A `bench` process's command line: every workload option (``add_workload_arguments``)
    as given here, and the shard."""
    from lavender_checks.speed.bench import add_workload_arguments

    argv = [sys.executable, "-m", "lavender_checks.cli", "bench", "--paths", "fast",
            "--shard", f"{shard[0]}/{shard[1]}", "--out", str(report)]
    for action in add_workload_arguments(argparse.ArgumentParser(add_help=False)):
        value = getattr(args, action.dest, None)
        if action.nargs == 0:  # a flag
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    if args.tiny_cpu:
        argv.append("--tiny-cpu")
    return argv


def run_processes(args: argparse.Namespace, count: int, work: Path) -> list[dict[str, Any]]:
    """Start ``count`` bench processes at once, process i on GPU i alone; wait for all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(count)]
    running = []
    for i in range(count):
        report = work / f"shard-{i}-of-{count}.json"
        log = work / f"shard-{i}-of-{count}.log"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[i], PYTHONUNBUFFERED="1")
        handle = log.open("w")
        t0 = time.perf_counter()
        proc = subprocess.Popen(_child_argv(args, (i, count), report), env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
        running.append((proc, t0, report, log, handle, gpus[i]))
    done = []
    for proc, t0, report, log, handle, gpu in running:
        code = proc.wait()
        wall = time.perf_counter() - t0
        handle.close()
        if code != 0 or not report.exists():
            tail = log.read_text()[-2000:]
            raise BenchProcessError(f"shard process on GPU {gpu} exited with {code}; its log ({log}) ends:\n{tail}")
        done.append({"report": str(report), "log": str(log), "wall_seconds": wall, "gpu": gpu})
    return done


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchProcessError(f"{path}: not a readable bench report ({exc})") from None
    if "fast" not in report or "projection" not in report.get("fast", {}):
        raise BenchProcessError(f"{path}: has no finished fast-path section")
    return report


def _check_same_workload(baseline: dict, args: argparse.Namespace) -> None:
    if abs(float(baseline.get("scale", -1)) - args.scale) > 1e-12:
        raise BenchProcessError(f"--baseline ran scale {baseline.get('scale')}, this run scale {args.scale}")
    if baseline.get("shard") not in (None, [0, 1]):
        raise BenchProcessError(f"--baseline is shard {baseline.get('shard')}, not a one-GPU run")


def _gate_seconds(report: dict) -> dict[str, float]:
    fast = report["fast"]
    startup = report["model"].get("build_seconds", 0.0) + fast["warmup"]["seconds"]
    return {"startup": startup, "measured": startup + fast["projection"]["measured"]["seconds"],
            "projected": startup + fast["projection"]["seconds"]}


def summarise(baseline: dict, one: dict, shards: list[tuple[dict, dict]], args) -> dict:
    one_gpu = _gate_seconds(baseline)
    per_shard = []
    for report, process in shards:
        seconds = _gate_seconds(report)
        per_shard.append({"gpu": process["gpu"], "wall_seconds": process["wall_seconds"],
                          "rows": report["fast"]["projection"]["measured"]["rows"],
                          "images": report["fast"]["stats"]["images"],
                          "peak_gib": report["fast"].get("peak_gib"), **seconds, "report": process["report"]})
    n = len(shards)
    slowest = {key: max(s[key] for s in per_shard) for key in ("measured", "projected")}
    speedup = {key: one_gpu[key] / slowest[key] for key in ("measured", "projected")}
    target = TARGET_SPEEDUP_2_GPUS if n == 2 else 0.9 * n
    devices = sorted({r.get("device") for r, _ in shards} | {baseline.get("device")})
    return {
        "gpus": n, "devices": devices, "scale": args.scale,
        "one_gpu": {**one_gpu, "wall_seconds": one.get("wall_seconds"), "report": one.get("report"),
                    "rows": baseline["fast"]["projection"]["measured"]["rows"],
                    "images": baseline["fast"]["stats"]["images"]},
        "shards": per_shard,
        "speedup": speedup,
        "target": {"speedup": f">= {target}", "met": speedup["projected"] >= target},
        "full_gate_minutes": {"one_gpu": one_gpu["projected"] / 60, f"{n}_gpus": slowest["projected"] / 60},
        "method": ("per process: model build + warm-up + the fast path's timed pass (measured at the run's "
                   "scale) or its full-gate projection; the gate on N GPUs is its slowest process. Python "
                   "start-up and imports (the same per process) are not counted; wall_seconds include them."),
    }


def summary_text(report: dict, path: Path) -> str:
    n = report["gpus"]
    lines = [f"lavender-checks bench-gpus on {', '.join(d for d in report['devices'] if d)} (report: {path})"]
    one = report["one_gpu"]
    lines.append(f"  1 GPU:  {one['measured']:.1f} s measured at scale {report['scale']}, "
                 f"full gate {one['projected'] / 60:.1f} min projected")
    for i, shard in enumerate(report["shards"]):
        lines.append(f"  GPU {shard['gpu']} (shard {i}/{n}): {shard['rows']:.0f} rows, {shard['measured']:.1f} s measured, "
                     f"full-gate share {shard['projected'] / 60:.1f} min")
    met = "met" if report["target"]["met"] else "NOT met"
    lines.append(f"  speed-up on {n} GPUs: {report['speedup']['measured']:.2f}x measured, "
                 f"{report['speedup']['projected']:.2f}x for the full gate (target {report['target']['speedup']}: {met})")
    return "\n".join(lines)

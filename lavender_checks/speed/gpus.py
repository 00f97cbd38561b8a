"""``lavender-checks bench-gpus``: how the fast path scales from one GPU to N.

The gate spreads over the GPUs of a host in two ways, and this command measures both on the
full-size architecture with random weights, against the same workload on one GPU of the same
machine (run first on its first GPU, or read from ``--baseline``):

* ``xdist`` (``pytest -n N``): N processes of ``lavender-checks bench --paths fast --shard
  i/N``, each seeing only its GPU through ``CUDA_VISIBLE_DEVICES`` (as the pytest plugin pins
  xdist workers), meeting after their timed pass at the gate's file barrier
  (``run.shards.ShardBarrier``);
* ``torchrun`` (``torchrun --nproc-per-node N``): ``lavender-checks bench --paths fast
  --torchrun`` under torchrun: each rank pins the GPU of its LOCAL_RANK, joins the gloo
  group the gate's ranks use (``run.distributed.Group``) and meets the others there after
  its timed pass.

Every process takes shard i of N of every benchmark as the gate splits it (whole images).
Per launch it reports the wall time, the projected full gate, the scaling efficiency
(speed-up / N; the gate on N GPUs takes as long as its slowest process), the slowest
process's time split into start-up, warm-up, timed pass and the wait at the barrier, and
whether the token ids of every row, joined from the shards, equal the one-GPU run's. The
targets (``gpus.toml``) are printed as met / NOT met from these figures, never asserted.
Writes ``reports/bench/gpus-<time>.json`` (``--out``; the processes' reports, logs and token
files go to the folder of the same name) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS
from lavender_checks.errors import error_line

LAUNCHERS = ("xdist", "torchrun")
TARGETS_FILE = Path(__file__).with_name("gpus.toml")
MAX_LISTED = 20  # differing, missing or duplicated rows named in a report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender_checks.speed.bench import add_workload_arguments

    parser.add_argument("--gpus", type=int, default=2, help="GPUs to spread the workload over (default 2)")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS),
                        help="comma-separated: xdist (one process per GPU, as pytest -n N), torchrun "
                             "(torchrun --nproc-per-node N) (default both)")
    parser.add_argument("--baseline", default=None,
                        help="a `bench --paths fast --shard 0/1 --tokens ...` report of the same workload on "
                             "one GPU (such as <out>/one-gpu.json of an earlier bench-gpus), instead of running it")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="handed on to every bench process (default bfloat16)")
    parser.add_argument("--out", default=None, help="JSON report path (default reports/bench/gpus-<time>.json)")
    parser.add_argument("--tiny-cpu", action="store_true",
                        help="processes run the tiny model on CPU instead of GPUs (a test of the harness; "
                             "timings mean nothing)")
    add_workload_arguments(parser)  # handed on to every `bench` process


def main(args: argparse.Namespace) -> int:
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    unknown = sorted(set(launchers) - set(LAUNCHERS))
    if unknown or not launchers:
        print(error_line("bench-gpus", f"--launchers {args.launchers!r}: choose from {', '.join(LAUNCHERS)}"),
              file=sys.stderr)
        return 2
    if args.gpus < 2:
        print(error_line("bench-gpus", "--gpus must be at least 2"), file=sys.stderr)
        return 2
    try:
        targets = load_targets()
    except BenchProcessError as exc:
        print(error_line("bench-gpus", exc), file=sys.stderr)
        return 2
    if not args.tiny_cpu:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            print(error_line("bench-gpus", f"needs {args.gpus} CUDA devices, this machine shows {seen}"),
                  file=sys.stderr)
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
        one_tokens = _tokens_of(baseline)
        launches = {}
        for launcher in launchers:
            processes = run_processes(args, args.gpus, work) if launcher == "xdist" else run_torchrun(args, args.gpus, work)
            launches[launcher] = [(report, process, _tokens_of(report))
                                  for report, process in ((_read_report(Path(p["report"])), p) for p in processes)]
        report = summarise(baseline, one, launches, args, targets, one_tokens)
    except BenchProcessError as exc:
        print(error_line("bench-gpus", exc), file=sys.stderr)
        return 1
    report["started"] = started
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary_text(report, out))
    return 0


class BenchProcessError(RuntimeError):
    """A `bench` process failed, wrote no report or an unreadable one."""


def load_targets(path: Path = TARGETS_FILE) -> dict:
    """``gpus.toml``: {"efficiency": {N: x}, "full_gate_minutes": {N: m}, "identical_predictions": f}."""
    try:
        raw = tomllib.loads(path.read_text())
        out = {table: {int(n): float(v) for n, v in raw[table].items()}
               for table in ("efficiency", "full_gate_minutes")}
        out["identical_predictions"] = float(raw["identical_predictions"]["fraction"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BenchProcessError(f"{path}: not a readable targets file ({type(exc).__name__}: {exc})") from None
    return out


# ----------------------------------------------------------------------------- processes


def _child_argv(args: argparse.Namespace, shard: tuple[int, int] | None, report: Path, tokens: Path,
                barrier: Path | None = None) -> list[str]:
    """A `bench` command line: every workload option (``add_workload_arguments``) as given
    here, ``--dtype``, then the shard (``None``: ``--torchrun``, which takes it from torchrun)."""
    from lavender_checks.speed.bench import add_workload_arguments

    argv = ["bench", "--paths", "fast", "--out", str(report), "--tokens", str(tokens)]
    argv += ["--torchrun"] if shard is None else ["--shard", f"{shard[0]}/{shard[1]}"]
    if barrier is not None:
        argv += ["--barrier", str(barrier)]
    for action in add_workload_arguments(argparse.ArgumentParser(add_help=False)):
        value = getattr(args, action.dest, None)
        if action.nargs == 0:  # a flag
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    if getattr(args, "dtype", None):
        argv += ["--dtype", args.dtype]
    if args.tiny_cpu:
        argv.append("--tiny-cpu")
    return argv


def _gpus(count: int) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(count)]
    return gpus[:count]


def _launch_env(**extra: str) -> dict[str, str]:
    from lavender_checks.speed.bench import LAUNCHED_AT_ENV

    return dict(os.environ, PYTHONUNBUFFERED="1", **extra, **{LAUNCHED_AT_ENV: repr(time.time())})


def run_processes(args: argparse.Namespace, count: int, work: Path) -> list[dict[str, Any]]:
    """``count`` bench processes at once, process i on GPU i alone, meeting at a file
    barrier (one process: the one-GPU run, ``one-gpu.json``); waits for all."""
    gpus = _gpus(count)
    folder = work / ("one-gpu" if count == 1 else f"xdist-{count}")
    folder.mkdir(parents=True, exist_ok=True)
    barrier = folder / "barrier" if count > 1 else None
    running = []
    for i in range(count):
        name = "one-gpu" if count == 1 else f"shard-{i}-of-{count}"
        report = (work if count == 1 else folder) / f"{name}.json"
        log = folder / f"{name}.log"
        argv = [sys.executable, "-m", "lavender_checks.cli",
                *_child_argv(args, (i, count), report, folder / f"{name}.tokens.jsonl", barrier)]
        handle = log.open("w")
        env = _launch_env(CUDA_VISIBLE_DEVICES=gpus[i])
        t0 = time.time()
        proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
        running.append((proc, t0, report, log, handle, gpus[i]))
    done = []
    for proc, t0, report, log, handle, gpu in running:
        code = proc.wait()
        wall = time.time() - t0
        handle.close()
        if code != 0 or not report.exists():
            tail = log.read_text()[-2000:]
            raise BenchProcessError(f"shard process on GPU {gpu} exited with {code}; its log ({log}) ends:\n{tail}")
        done.append({"report": str(report), "log": str(log), "wall_seconds": wall, "gpu": gpu})
    if barrier is not None:
        shutil.rmtree(barrier, ignore_errors=True)
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: argparse.Namespace, count: int, work: Path) -> list[dict[str, Any]]:
    """``torchrun --nproc-per-node count`` of ``bench --torchrun`` on this host's first
    ``count`` GPUs; one entry per rank (the launch's wall time on each)."""
    folder = work / f"torchrun-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "torchrun.log"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(count),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
            "-m", "lavender_checks.cli",
            *_child_argv(args, None, folder / "bench.json", folder / "tokens.jsonl")]
    env = _launch_env(CUDA_VISIBLE_DEVICES=",".join(_gpus(count)))
    with log.open("w") as handle:
        t0 = time.time()
        code = subprocess.run(argv, check=False, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        wall = time.time() - t0
    reports = [folder / f"bench-rank{rank}.json" for rank in range(count)]
    if code != 0 or not all(r.exists() for r in reports):
        raise BenchProcessError(f"torchrun --nproc-per-node {count} exited with {code}; its log ({log}) ends:\n"
                                f"{log.read_text()[-3000:]}")
    return [{"report": str(r), "log": str(log), "wall_seconds": wall, "gpu": f"LOCAL_RANK {rank}"}
            for rank, r in enumerate(reports)]


# ----------------------------------------------------------------------------- reading


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
    invariant = baseline.get("fast", {}).get("invariant")
    if invariant is not None and invariant == bool(getattr(args, "throughput_mode", False)):
        mode = "batch-invariant" if invariant else "throughput"
        raise BenchProcessError(f"--baseline ran the fast engine's {mode} mode, this run the other "
                                "(--throughput-mode)")


def read_tokens(path: Path) -> dict[tuple[str, str], list[int]]:
    """A ``bench --tokens`` file: {(run, row key): token ids}."""
    out: dict[tuple[str, str], list[int]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BenchProcessError(f"{path}: cannot read the token ids ({exc})") from None
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            key, ids = (str(row["run"]), str(row["key"])), [int(i) for i in row["ids"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchProcessError(f"{path}, line {number}: not a token row ({type(exc).__name__}: {exc})") from None
        if key in out:
            raise BenchProcessError(f"{path}, line {number}: row {key[0]} {key[1]} given twice")
        out[key] = ids
    return out


def _tokens_of(report: dict) -> dict[tuple[str, str], list[int]] | None:
    path = report["fast"].get("tokens_file")
    return read_tokens(Path(path)) if path else None


# ----------------------------------------------------------------------------- figures


def compare_tokens(one: dict[tuple[str, str], list[int]] | None,
                   shards: list[dict[tuple[str, str], list[int]] | None]) -> dict:
    """The reproducibility check: the shards' rows joined (each row from exactly one shard)
    against the one-GPU run's, token for token."""
    if one is None or any(s is None for s in shards):
        return {"measured": False, "reason": "a report without token ids (--tokens): the one-GPU run "
                                             "or a shard ran without them"}
    owner: dict[tuple[str, str], int] = {}
    duplicated = []
    for i, rows in enumerate(shards):
        for row in rows:
            if row in owner:
                duplicated.append({"run": row[0], "key": row[1], "shards": [owner[row], i]})
            else:
                owner[row] = i
    missing = [{"run": run, "key": key} for run, key in one if (run, key) not in owner]
    extra = [{"run": run, "key": key, "shard": i} for (run, key), i in owner.items() if (run, key) not in one]
    differing = []
    identical = 0
    for row, ids in one.items():
        if row not in owner:
            continue
        theirs = shards[owner[row]][row]
        if theirs == ids:
            identical += 1
        else:
            step = next((k for k, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
            differing.append({"run": row[0], "key": row[1], "shard": owner[row], "first_differing_token": step})
    return {"measured": True, "rows": len(one), "identical": identical,
            "fraction": identical / len(one) if one else None,
            "differing": len(differing), "missing": len(missing), "duplicated": len(duplicated),
            "extra": len(extra), "first_differences": differing[:MAX_LISTED],
            "missing_rows": missing[:MAX_LISTED], "duplicated_rows": duplicated[:MAX_LISTED],
            "extra_rows": extra[:MAX_LISTED]}


def _split(report: dict) -> dict[str, float]:
    """A process's time split (``bench``'s ``fast.split``); an older report without one: its
    model build as start-up, no barrier."""
    fast = report["fast"]
    if "split" in fast:
        return {k: fast["split"][k] for k in ("startup", "warmup", "timed", "barrier", "total")}
    split = {"startup": report["model"].get("build_seconds", 0.0), "warmup": fast["warmup"]["seconds"],
             "timed": fast["projection"]["measured"]["seconds"], "barrier": 0.0}
    split["total"] = sum(split.values())
    return split


def _gate_seconds(report: dict) -> dict[str, Any]:
    """``measured``: launch to barrier passed; ``projected``: the same with the timed pass
    projected to the full gate's share (the wait at the barrier is not projected)."""
    split = _split(report)
    projected = split["startup"] + split["warmup"] + report["fast"]["projection"]["seconds"]
    return {"split": split, "measured": split["total"], "projected": projected}


def _verdict(value: float | None, op: str, goal: float | None) -> dict:
    if goal is None:
        return {"value": value, "target": None, "met": None}
    met = None if value is None else (value >= goal if op == ">=" else value <= goal)
    return {"value": value, "target": f"{op} {goal:g}", "met": met}


def summarise(baseline: dict, one: dict, launches: dict[str, list[tuple[dict, dict, Any]]], args,
              targets: dict, one_tokens: dict | None) -> dict:
    """The report: the one-GPU run, then per launcher its processes ((report, process,
    tokens) each, in shard order), speed-up, efficiency, the slowest process's split,
    the reproducibility check and the targets."""
    one_gpu = _gate_seconds(baseline)
    devices = {baseline.get("device")}
    out: dict[str, Any] = {
        "gpus": args.gpus, "scale": args.scale,
        "one_gpu": {**one_gpu, "wall_seconds": one.get("wall_seconds"), "report": one.get("report"),
                    "rows": baseline["fast"]["projection"]["measured"]["rows"],
                    "images": baseline["fast"]["stats"]["images"],
                    "full_gate_minutes": one_gpu["projected"] / 60},
        "launchers": {},
        "method": ("per process: launch (the launcher's clock) to the barrier passed, split into start-up "
                   "(interpreter, imports, joining the others, model build, requests), warm-up, the fast "
                   "path's timed pass and the wait at the barrier; projected: start-up + warm-up + the "
                   "timed pass projected to the process's share of the full gate. The gate on N GPUs "
                   "takes as long as its slowest process; efficiency = speed-up / N. Identical "
                   "predictions: every row's token ids, joined from the shards, equal to the one-GPU "
                   "run's."),
    }
    for launcher, processes in launches.items():
        n = len(processes)
        ranks = []
        for i, (report, process, _) in enumerate(processes):
            devices.add(report.get("device"))
            seconds = _gate_seconds(report)
            row_scaled = [run for run, method in report["fast"]["projection"].get("decode_methods", {}).items()
                          if str(method).startswith("row-scaled")]
            ranks.append({"shard": i, "gpu": process.get("gpu"), "process_wall_seconds": process.get("wall_seconds"),
                          "rows": report["fast"]["projection"]["measured"]["rows"],
                          "images": report["fast"]["stats"]["images"], "peak_gib": report["fast"].get("peak_gib"),
                          **seconds, "row_scaled_runs": row_scaled, "report": process.get("report")})
        # The slowest is the last to reach the barrier; the others' waits are its lateness.
        slowest = max(ranks, key=lambda r: r["measured"] - r["split"]["barrier"])
        gate = {"measured": slowest["measured"], "projected": max(r["projected"] for r in ranks)}
        speedup = {k: one_gpu[k] / gate[k] for k in gate}
        efficiency = {k: v / n for k, v in speedup.items()}
        walls = [r["process_wall_seconds"] for r in ranks if r["process_wall_seconds"] is not None]
        reproducibility = compare_tokens(one_tokens, [tokens for _, _, tokens in processes])
        identical = reproducibility.get("fraction") if reproducibility["measured"] else None
        if reproducibility["measured"] and (reproducibility["extra"] or reproducibility["duplicated"]):
            identical = 0.0  # rows the one-GPU run has not, or twice: not the same predictions
        out["launchers"][launcher] = {
            "gpus": n, "wall_seconds": max(walls) if walls else None,
            "gate_seconds": gate, "speedup": speedup, "efficiency": efficiency,
            "full_gate_minutes": gate["projected"] / 60,
            "slowest": {"shard": slowest["shard"], "gpu": slowest["gpu"], "split": slowest["split"]},
            "every_decode_projection_steady": not any(r["row_scaled_runs"] for r in ranks),
            "ranks": ranks,
            "reproducibility": reproducibility,
            "targets": {
                "efficiency": _verdict(efficiency["projected"], ">=", targets["efficiency"].get(n)),
                "full_gate_minutes": _verdict(gate["projected"] / 60, "<=", targets["full_gate_minutes"].get(n)),
                "identical_predictions": _verdict(identical, ">=", targets["identical_predictions"]),
            },
        }
    out["devices"] = sorted(d for d in devices if d)
    return out


def summary_text(report: dict, path: Path) -> str:
    lines = [f"lavender-checks bench-gpus on {', '.join(report['devices'])} (report: {path})"]
    one = report["one_gpu"]
    lines.append(f"  1 GPU: {one['measured']:.1f} s at scale {report['scale']} (launch to end of the timed pass), "
                 f"full gate {one['projected'] / 60:.1f} min projected")
    for launcher, part in report["launchers"].items():
        n = part["gpus"]
        split = part["slowest"]["split"]
        wall = "" if part["wall_seconds"] is None else f", wall {part['wall_seconds']:.1f} s"
        lines.append(f"  {launcher} on {n} GPUs{wall}: slowest shard {part['slowest']['shard']} took "
                     f"{split['total']:.1f} s = start-up {split['startup']:.1f} + warm-up {split['warmup']:.1f} "
                     f"+ timed {split['timed']:.1f} + barrier {split['barrier']:.1f}")
        lines.append(f"    speed-up {part['speedup']['measured']:.2f}x measured, {part['speedup']['projected']:.2f}x "
                     f"full gate (efficiency {part['efficiency']['measured']:.2f} / {part['efficiency']['projected']:.2f}); "
                     f"full gate {part['full_gate_minutes']:.1f} min projected"
                     + ("" if part["every_decode_projection_steady"] else
                        "; some shards' decode projected row-scaled (steady phase shorter than a batch)"))
        rep = part["reproducibility"]
        if rep["measured"]:
            lines.append(f"    identical predictions: {rep['identical']} of {rep['rows']} rows "
                         f"({rep['differing']} differ, {rep['missing']} missing, {rep['duplicated']} in two shards, "
                         f"{rep['extra']} not in the one-GPU run)")
        else:
            lines.append(f"    identical predictions: not measured ({rep['reason']})")
        for name, check in part["targets"].items():
            met = {True: "met", False: "NOT met", None: "not measured" if check["target"] else "no target"}[check["met"]]
            value = "-" if check["value"] is None else f"{check['value']:.3f}"
            lines.append(f"    {name:22s} {value:>8s}  target {check['target'] or '-':>8s}  {met}")
    return "\n".join(lines)

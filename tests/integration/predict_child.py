"""Runs of ``predict_run`` on the tiny model in processes that a test can kill, for
tests/integration/test_resume_after_kill.py.

    python -m tests.integration.predict_child --profile P --benchmark NAME --lmu-root DIR --limit N --batch-size K

The process imports torch and loads the tiny pair once, prints ``ready``, then reads
commands on stdin, one a line:

* ``run STORE RESULT [I/N]``: fork a child process that predicts (only shard I of N of the
  rows, split as the gate splits them, when given) into the store folder STORE and
  writes ``{"reused", "generated", "recomputed", "predictions"}`` as JSON to RESULT; prints
  ``pid N`` at once and ``exit N CODE`` when the child ends (CODE as ``subprocess`` gives it:
  ``-9`` when SIGKILLed; 130 after Ctrl-C/SIGINT, as the ``lavender-checks`` command exits);
* ``quit``.

Forking a loaded process makes every run a real process (killed for real, starting from what
is on disk) without paying for importing torch and loading the model each time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predict_child")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--lmu-root", required=True)
    parser.add_argument("--limit", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--variant", default="lavender")
    parser.add_argument("--engine", default="generate")
    parser.add_argument("--slots", type=int, default=None, help="the fast engine's decode batch")
    parser.add_argument("--dtype", default=None, help="the tiny pair's dtype (default float32)")
    args = parser.parse_args(argv)

    import torch

    # One thread: no OpenMP pool exists when forking, and every run computes in the same order.
    torch.set_num_threads(1)

    from lavender_checks.data import load_benchmark, subset
    from lavender_checks.model import load_pair
    from lavender_checks.profiles import load_profile
    from lavender_checks.run.predict import predict_run
    from lavender_checks.run.store import PredictionStore
    from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

    tiny = ensure_tiny_checkpoints()
    pair = load_pair(tiny.base, tiny.adapter, device="cpu", dtype=args.dtype)
    from lavender_checks.engines import make_engine
    from lavender_checks.engines.fast.config import FastGenConfig

    engine = make_engine(args.engine, pair, batch_size=args.batch_size,
                         fast_config=FastGenConfig(max_slots=args.slots) if args.slots else None)
    profile = load_profile(args.profile)
    frame = subset(load_benchmark(args.benchmark, args.lmu_root), args.benchmark, limit=args.limit)

    def run(store: str, result: str, shard: str | None = None) -> int:
        rows = frame
        if shard is not None:
            index, count = (int(part) for part in shard.split("/"))
            rows = subset(frame, args.benchmark, shard=(index, count))
        try:
            outcome = predict_run(pair, engine, args.benchmark, rows, profile, args.variant,
                                  PredictionStore(store), lmu_root=args.lmu_root, progress=False)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        with open(result, "w", encoding="utf-8") as fh:
            json.dump({"reused": outcome.reused, "generated": outcome.generated,
                       "recomputed": outcome.recomputed,
                       "predictions": [[k, v] for k, v in outcome.predictions.items()]}, fh)
        return 0

    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command == ["quit"]:
            return 0
        if len(command) not in (3, 4) or command[0] != "run":
            print(f"unknown command {line!r}", file=sys.stderr, flush=True)
            return 2
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run, then leave without the parent's exit handlers
            code = 1
            try:
                code = run(*command[1:])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of a torchrun launch that meets the others through ``distributed.Group`` alone (no
model, no data), for tests/integration/test_torchrun.py.

usage: torchrun ... -m tests.integration.torchrun_child SCENARIO TIMEOUT_S
  error: rank 1 arrives at the barrier with an error; every other rank must stop with it
  hang:  rank 1 stays alive and silent; every other rank must stop after TIMEOUT_S
  absent: rank 1 ends before it joins; every other rank must stop after TIMEOUT_S
Prints ``FAILURE <seconds> <message>`` and exits 3 when the rank stops, ``PASSED`` otherwise.
"""

from __future__ import annotations

import sys
import time

from lavender_checks.run import distributed


def main(scenario: str, timeout_s: float) -> int:
    if scenario == "absent" and distributed.RankInfo.from_env().rank == 1:
        return 0
    started = time.time()
    try:
        group = distributed.Group(timeout_s)
    except distributed.RankFailure as exc:
        print(f"FAILURE {time.time() - started:.1f} {exc}", flush=True)
        return 3
    if scenario == "hang" and group.rank == 1:
        time.sleep(600)  # alive, holding its connections, never arriving
    error = ValueError("disk full") if scenario == "error" and group.rank == 1 else None
    started = time.time()
    try:
        group.agree("shard generated", error)
    except distributed.RankFailure as exc:
        print(f"FAILURE {time.time() - started:.1f} {exc}", flush=True)
        return 3
    print("PASSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))

"""One rank of a torchrun launch that meets the others through ``distributed.Group`` alone (no
model, no data), for tests/integration/test_torchrun.py.

usage: torchrun ... -m tests.integration.torchrun_child SCENARIO TIMEOUT_S [STORE]
  error: rank 1 arrives at the barrier with an error; every other rank must stop with it
  hang:  rank 1 stays alive and silent; every other rank must stop after TIMEOUT_S
  absent: rank 1 ends before it joins; every other rank must stop after TIMEOUT_S
Prints ``FAILURE <seconds> <message>`` and exits 3 when the rank stops, ``PASSED`` otherwise.
  locks: the ranks share one key of the store folder STORE (``TorchrunShards.share``, no
  generation), rank 0 reaching the store late; rank 1 then ends, and rank 0, still using the
  key, checks that another run is refused it (``FAILURE`` when the lock went with rank 1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lavender_checks.run import distributed


def shared_key_locks(timeout_s: float, root: Path) -> int:
    import threading

    from lavender_checks.run.store import LOCK_FILE, PredictionStore, StoreKey, StoreLockedError

    key = StoreKey("base", None, "MME", "md5", "seed-report", "fp")
    group = distributed.Group(timeout_s)
    shards = distributed.TorchrunShards(group, root, "shared")
    store = PredictionStore(root, run_id=shards.run_id)
    done = root / ".rank1-done"
    stop, taken = threading.Event(), []

    def another_run() -> None:
        """Once the launch holds the key, another run tries to take it, again and again."""
        while not (root / key.relative_dir() / LOCK_FILE).exists() and not stop.is_set():
            time.sleep(0.01)
        while not stop.is_set():
            try:
                PredictionStore(root, run_id="another run").log(key)
            except StoreLockedError:
                time.sleep(0.02)
                continue
            taken.append(time.time())
            return

    if group.rank == 0:
        # Rank 0 reaches the store after the others, each time.
        opened = store.log
        store.log = lambda *args, **options: (time.sleep(1.0), opened(*args, **options))[1]
        other = threading.Thread(target=another_run, daemon=True)
        other.start()
    try:
        with store:
            shards.share(lambda index, count: None, lambda index, count: [(key, [])], store)
            if group.rank == 0:  # rank 0 still uses the key (it would score now) after rank 1 ended
                deadline = time.time() + 60
                while not done.exists() and time.time() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
                stop.set()
                other.join()
                if taken:
                    print("FAILURE 0 another run took the key while rank 0 was still using it", flush=True)
                    return 3
    except StoreLockedError as exc:
        print(f"FAILURE 0 {exc}", flush=True)
        return 3
    if group.rank != 0:
        done.write_text("rank 1 released its locks")
    # Both ranks leave together: a rank whose process ends while its peer still talks to the
    # group can be aborted by gloo on a busy machine.
    group.agree("scenario done")
    import torch.distributed as dist

    dist.destroy_process_group()  # before the interpreter ends: gloo's threads stop cleanly
    print("PASSED", flush=True)
    return 0


def main(scenario: str, timeout_s: float, store: str | None = None) -> int:
    if scenario == "locks":
        return shared_key_locks(timeout_s, Path(store))
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
    sys.exit(main(*sys.argv[1:2], float(sys.argv[2]), *sys.argv[3:]))

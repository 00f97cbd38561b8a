"""One ``lavender-checks run`` on the built-in tiny pair, for
tests/integration/test_lock_order.py.

usage: python -m tests.integration.lock_order_child STORE REPORTS [KEYS_KNOWN GO]

With KEYS_KNOWN and GO, the run is the one started first and slow to read its data, as a run
on real benchmarks is (seconds to minutes of TSV): it writes the file KEYS_KNOWN once it has
read its pair's identity, the last thing its store keys need, and its benchmark data is read
only once the file GO exists. Exits with the command's status.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(store: str, reports: str, keys_known: str | None = None, go: str | None = None) -> int:
    from lavender_checks import cli

    if keys_known is not None:
        from lavender_checks import data
        from lavender_checks.run import collect

        read_identity, read_benchmark = collect.pair_identity, data.load_benchmark

        def identity_then_say_so(*args, **options):
            identity = read_identity(*args, **options)
            Path(keys_known).write_text("identity read")
            return identity

        def slow_benchmark(*args, **options):
            deadline = time.time() + 120
            while not Path(go).exists() and time.time() < deadline:
                time.sleep(0.05)
            return read_benchmark(*args, **options)

        collect.pair_identity, data.load_benchmark = identity_then_say_so, slow_benchmark
    return cli.main(["run", "--quiet", "--store", store, "--reports", reports,
                     "--benchmark", "MME", "--limit", "2"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

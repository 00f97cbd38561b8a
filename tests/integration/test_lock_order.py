"""Two runs on one store started close together: the one started first gets the store, even
when it is slower to read its data, because a run takes its store keys' locks before it reads
any benchmark data or loads any weights (run/collect.py). Real processes, the tiny pair."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lavender_checks import REPO_ROOT

pytestmark = pytest.mark.slow


def _start(*args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.integration.lock_order_child", *map(str, args)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_run_started_first_gets_the_store_even_if_it_reads_its_data_last(tmp_path):
    store, keys_known, go = tmp_path / "store", tmp_path / "first-knows-its-keys", tmp_path / "go"
    first = _start(store, tmp_path / "reports-1", keys_known, go)
    try:
        deadline = time.time() + 180
        while not keys_known.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        # The first run goes on to its data (slowly); the second starts now and reads fast.
        second = _start(store, tmp_path / "reports-2")
        out2, err2 = second.communicate(timeout=300)
        assert second.returncode == 2, out2 + err2
        assert err2.startswith("lavender-checks run: error: "), err2
        assert f"another run is using these predictions: pid {first.pid}" in err2, err2
        assert first.poll() is None  # still on its way: holding the store, not refused
    finally:
        first.kill()  # what it would generate after this proves nothing more
        first.communicate()

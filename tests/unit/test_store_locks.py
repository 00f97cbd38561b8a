"""Taking over a store key's lock left by a process that is gone, with two takers at once:
exactly one gets it, the other is refused naming it (run/store.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from lavender_checks.run import store as store_module
from lavender_checks.run.store import LOCK_FILE, PredictionStore, StoreKey, StoreLockedError

KEY = StoreKey("base", None, "MME", "md5", "seed-report", "fp")


def stale_lock(root):
    """A lock of this host whose process has ended."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = root / KEY.relative_dir() / LOCK_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run": "killed", "pid": int(gone.stdout), "host": socket.gethostname()}))
    return path


def race_second_taker(monkeypatch, take):
    """When the first taker judges the stale lock, ``take`` runs in a thread, and gets a second
    to finish before the first one goes on: the race a takeover must survive. Returns what
    ``take`` did ("took" or "refused": its message), once the returned join() is called."""
    real_alive = store_module._alive
    outcome: dict = {}
    threads: list[threading.Thread] = []

    def second():
        try:
            take()
            outcome["took"] = True
        except StoreLockedError as exc:
            outcome["refused"] = str(exc)

    def judged_while_the_other_takes(holder):
        if not threads:
            threads.append(threading.Thread(target=second))
            threads[0].start()
            threads[0].join(timeout=1.0)
        return real_alive(holder)

    monkeypatch.setattr(store_module, "_alive", judged_while_the_other_takes)

    def join():
        threads[0].join(timeout=10)
        assert not threads[0].is_alive(), "the second taker never finished"
        return outcome

    return join


def test_two_runs_taking_over_one_stale_lock(tmp_path, monkeypatch):
    path = stale_lock(tmp_path)
    first, second = PredictionStore(tmp_path, run_id="run-one"), PredictionStore(tmp_path, run_id="run-two")
    join = race_second_taker(monkeypatch, lambda: second.log(KEY))
    first.log(KEY)
    outcome = join()
    assert json.loads(path.read_text())["run"] == "run-one"
    assert "took" not in outcome, "both runs took the lock"
    assert f"another run is using these predictions: pid {os.getpid()}" in outcome["refused"]
    first.release()
    assert not path.exists()


def test_clearing_a_stale_lock_keeps_the_lock_another_run_took_meanwhile(tmp_path, monkeypatch):
    """A torchrun rank clears the stale locks of its host while another run takes one over:
    the clearing removes the stale lock only, never the new one."""
    path = stale_lock(tmp_path)
    clearing, taking = PredictionStore(tmp_path, run_id="torchrun:new"), PredictionStore(tmp_path, run_id="run-two")
    join = race_second_taker(monkeypatch, lambda: taking.log(KEY))
    assert clearing.clear_stale_lock(KEY)
    assert join() == {"took": True}
    assert json.loads(path.read_text())["run"] == "run-two", "the lock another run took was removed"
    with pytest.raises(StoreLockedError):
        PredictionStore(tmp_path, run_id="run-three").lock(KEY)
    taking.release()
    assert not path.exists()

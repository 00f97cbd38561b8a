"""Real processes, really killed: a run of the tiny model through ``predict_run`` is
SIGKILLed twice and interrupted with SIGINT (Ctrl-C) once, each time in the middle of
generating; a rerun then completes it. Every prediction must be stored exactly once and
equal what an uninterrupted run produces. Both engines: batched generate (batches of 2) and
the fast engine (2 slots, rows stored as they finish).

Each run is its own process, forked by tests/integration/predict_child.py after it has loaded the tiny
model, so the test pays for importing torch once.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lavender_checks import FIXTURES, REPO_ROOT
from lavender_checks.profiles import PROFILES_DIR
from lavender_checks.run.store import PredictionStore, StoreKey

pytestmark = pytest.mark.slow

BENCHMARK = "DocVQA_VAL"
ROWS = 24
BATCH_SIZE = 2
MAX_NEW_TOKENS = 8  # short generations keep the whole test within seconds
STEP = 2 * BATCH_SIZE  # each interrupted process must store at least this many rows itself
TIMEOUT = 120.0


class Runner:
    """The predict_child process; its stdout lines arrive through a queue."""

    def __init__(self, args: list[str], workdir: Path):
        self.stderr_path = workdir / "predict_child.stderr"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT),
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.predict_child", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_path.open("wb"),
            cwd=REPO_ROOT, env=env, text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, *words: str) -> list[str]:
        """The next stdout line, which must start with ``words``; fails with the stderr."""
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            line = None
        if line is None or line.split()[: len(words)] != list(words):
            self.fail(f"expected {' '.join(words)!r} on stdout, got {line!r}")
        return line.split()

    def start_run(self, store: Path, result: Path, shard: str | None = None) -> int:
        """Fork a run (of shard ``"i/n"`` only, when given) into ``store``; returns its pid."""
        self.proc.stdin.write(f"run {store} {result}" + (f" {shard}" if shard else "") + "\n")
        self.proc.stdin.flush()
        return int(self.expect("pid")[1])

    def exit_code(self, pid: int) -> int:
        return int(self.expect("exit", str(pid))[2])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def fail(self, message: str) -> None:
        self.stop()
        pytest.fail(f"predict_child: {message}\n--- stderr ---\n{self.stderr()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def stored_lines(store: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in store.rglob("*.jsonl"))


def interrupt_when(runner: Runner, pid: int, store: Path, at_least: int, sig: int) -> int:
    """Send ``sig`` to run ``pid`` once the store holds ``at_least`` lines; returns its exit code."""
    deadline = time.monotonic() + TIMEOUT
    while (count := stored_lines(store)) < at_least:
        if not runner.lines.empty():  # "exit ...": the run ended on its own
            runner.fail(f"run {pid} ended with {count} lines stored, before {at_least}: {runner.lines.get()}")
        if time.monotonic() > deadline:
            runner.fail(f"only {count} lines stored after {TIMEOUT}s")
        time.sleep(0.005)
    os.kill(pid, sig)
    return runner.exit_code(pid)


def store_log(store: Path):
    (key_file,) = store.rglob("key.json")
    return PredictionStore(store).log(StoreKey(**json.loads(key_file.read_text())), lock=False)


@dataclass
class Observed:
    total: int = 0
    lines_after: dict[str, int] = field(default_factory=dict)  # run -> lines stored when it ended
    readable_after: dict[str, int] = field(default_factory=dict)  # run -> predictions readable then
    exit_codes: dict[str, int] = field(default_factory=dict)
    stderr: str = ""
    reference: dict = field(default_factory=dict)  # the uninterrupted run's result
    resumed: dict = field(default_factory=dict)  # the final rerun's result
    store: Path | None = None


def kill_test_profile(work: Path) -> Path:
    """The vlmevalkit profile with DocVQA's budget cut to MAX_NEW_TOKENS."""
    profile = work / "kill-test.toml"
    text = (PROFILES_DIR / "vlmevalkit.toml").read_text(encoding="utf-8")
    text = text.replace('name = "vlmevalkit"', 'name = "kill-test"', 1)
    text = text.replace("max_new_tokens = 512", f"max_new_tokens = {MAX_NEW_TOKENS}", 1)  # DocVQA's
    profile.write_text(text, encoding="utf-8")
    return profile


@pytest.fixture(scope="module", params=["generate", "fast"])
def observed(request, tmp_path_factory) -> Observed:
    engine = request.param
    work = tmp_path_factory.mktemp(f"resume-{engine}")
    profile = kill_test_profile(work)
    store = work / "store"
    seen = Observed(total=ROWS, store=store)
    runner = Runner(["--profile", str(profile), "--benchmark", BENCHMARK,
                     "--lmu-root", str(FIXTURES / "lmudata-mini"),
                     "--limit", str(ROWS), "--batch-size", str(BATCH_SIZE), "--engine", engine,
                     "--slots", str(BATCH_SIZE)], work)
    try:
        runner.expect("ready")
        pid = runner.start_run(work / "reference", work / "reference.json")
        seen.exit_codes["reference"] = runner.exit_code(pid)
        if seen.exit_codes["reference"] != 0:
            runner.fail("the uninterrupted run failed")
        seen.reference = json.loads((work / "reference.json").read_text())
        lines = 0
        for name, sig in (("sigkill-1", signal.SIGKILL), ("sigkill-2", signal.SIGKILL),
                          ("sigint", signal.SIGINT)):
            pid = runner.start_run(store, work / f"{name}.json")
            seen.exit_codes[name] = interrupt_when(runner, pid, store, lines + STEP, sig)
            lines = stored_lines(store)
            seen.lines_after[name] = lines
            seen.readable_after[name] = len(store_log(store).existing())
        pid = runner.start_run(store, work / "resumed.json")
        seen.exit_codes["resumed"] = runner.exit_code(pid)
        if seen.exit_codes["resumed"] != 0:
            runner.fail("the rerun failed")
        seen.resumed = json.loads((work / "resumed.json").read_text())
    finally:
        runner.stop()
        seen.stderr = runner.stderr()
    return seen


def test_the_runs_were_really_killed_mid_run(observed):
    assert observed.exit_codes["sigkill-1"] == -signal.SIGKILL
    assert observed.exit_codes["sigkill-2"] == -signal.SIGKILL
    after = [observed.lines_after[n] for n in ("sigkill-1", "sigkill-2", "sigint")]
    assert STEP <= after[0] < after[1] < after[2] < observed.total
    # What a killed run had stored is readable at once (no damaged line, nothing lost).
    assert [observed.readable_after[n] for n in ("sigkill-1", "sigkill-2")] == after[:2]


def test_sigint_exits_130_and_keeps_finished_batches(observed):
    assert observed.exit_codes["sigint"] == 130, observed.stderr
    assert "interrupted" in observed.stderr
    # The batches it finished are on disk and readable.
    assert observed.lines_after["sigint"] >= observed.lines_after["sigkill-2"] + STEP
    assert observed.readable_after["sigint"] == observed.lines_after["sigint"]


def test_rerun_generates_only_what_was_missing(observed):
    resumed = observed.resumed
    assert resumed["reused"] == observed.lines_after["sigint"]
    assert resumed["generated"] == observed.total - observed.lines_after["sigint"]
    assert resumed["recomputed"] == 0


def test_every_prediction_stored_once_and_equal_to_the_uninterrupted_run(observed):
    log = store_log(observed.store)
    records = log.records()
    indices = [record.index for record in records]
    assert len(indices) == len(set(indices)) == observed.total  # no row generated twice
    reference = dict(map(tuple, observed.reference["predictions"]))
    assert observed.reference["generated"] == observed.total
    assert {r.index: r.prediction for r in records} == reference
    assert dict(map(tuple, observed.resumed["predictions"])) == reference
    assert [k for k, _ in observed.resumed["predictions"]] == [k for k, _ in observed.reference["predictions"]]


# ---------------------------------------------------------------------------------------
# Resumed under another shard count: the fast engine's batch invariance at work. The rows a
# resumed run still has to generate are batched with other rows than in an uninterrupted
# run; in bfloat16 that changes predictions unless each row's tokens depend on itself alone.


@dataclass
class Resharded:
    total: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    resumed: dict = field(default_factory=dict)
    store: Path | None = None


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def resharded(request, tmp_path_factory) -> Resharded:
    """An uninterrupted run, then in another store: a whole run killed, shard 0/2 killed,
    shard 1/2 killed, shards 0/4 .. 3/4 run to the end, and a whole run again (which only
    reads the store). Two slots, so rows finish and are stored one by one."""
    dtype = request.param
    work = tmp_path_factory.mktemp(f"reshard-{dtype}")
    store = work / "store"
    seen = Resharded(total=ROWS, store=store)
    runner = Runner(["--profile", str(kill_test_profile(work)), "--benchmark", BENCHMARK,
                     "--lmu-root", str(FIXTURES / "lmudata-mini"), "--limit", str(ROWS),
                     "--batch-size", str(BATCH_SIZE), "--engine", "fast", "--slots", "2",
                     "--dtype", dtype], work)

    def finish(name: str, shard: str | None = None) -> dict:
        result_file = work / (name.replace(" ", "-").replace("/", "of") + ".json")
        pid = runner.start_run(store if name != "reference" else work / "reference", result_file, shard)
        seen.exit_codes[name] = runner.exit_code(pid)
        if seen.exit_codes[name] != 0:
            runner.fail(f"run {name} failed")
        result = json.loads(result_file.read_text())
        seen.generated[name] = result["generated"]
        return result

    try:
        runner.expect("ready")
        seen.reference = finish("reference")
        lines = 0
        for name, shard, more in (("whole", None, STEP), ("shard 0/2", "0/2", 2), ("shard 1/2", "1/2", 2)):
            pid = runner.start_run(store, work / "killed.json", shard)
            seen.exit_codes[name] = interrupt_when(runner, pid, store, lines + more, signal.SIGKILL)
            lines = stored_lines(store)
        for index in range(4):
            finish(f"shard {index}/4", f"{index}/4")
        seen.resumed = finish("resumed")
    finally:
        runner.stop()
    return seen


def test_resumed_under_other_shard_counts_equals_the_uninterrupted_run(resharded):
    assert [resharded.exit_codes[n] for n in ("whole", "shard 0/2", "shard 1/2")] == [-signal.SIGKILL] * 3
    four = sum(resharded.generated[f"shard {i}/4"] for i in range(4))
    assert 0 < four < resharded.total  # the 4-way shards resumed what the kills left
    assert resharded.generated["resumed"] == 0  # everything was in the store
    records = store_log(resharded.store).records()
    assert len(records) == len({r.index for r in records}) == resharded.total  # each row generated once
    reference = dict(map(tuple, resharded.reference["predictions"]))
    assert len(reference) == resharded.total
    assert dict(map(tuple, resharded.resumed["predictions"])) == reference

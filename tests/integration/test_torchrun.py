"""The gate under torchrun, on CPU: two simulated hosts × two processes on 127.0.0.1 (two
torchrun invocations, ``--nnodes 2 --node-rank 0/1``, gloo), the built-in tiny pair on the
mini benchmarks, compared with one process. And one rank killed mid-run: the others stop
with an error naming it, and a relaunch with another world size resumes and ends with the
same predictions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lavender_checks import REPO_ROOT
from lavender_checks.engines import register_engine
from lavender_checks.run.collect import RunResults, collect_results
from lavender_checks.run.config import RunConfig
from lavender_checks.run.judge import judge_run

pytestmark = pytest.mark.slow

TIMEOUT = 300  # one launch, worst case on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch:
    """One torchrun per simulated host; each rank's output in its own log file."""

    def __init__(self, tmp: Path, name: str, nodes: int, per_node: int, entry: list[str],
                 node_args=lambda node: []):
        self.tag = f"{name}-{os.getpid()}-{time.time_ns()}"
        self.logs = tmp / f"logs-{name}"
        # The suite may itself run under pytest-xdist: its variables must not reach the ranks.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env.update(PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", LAVENDER_TEST_TAG=self.tag)
        port = _free_port()
        self.procs = []
        for node in range(nodes):
            out = (tmp / f"torchrun-{name}-node{node}.log").open("wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                 "--node-rank", str(node), "--nproc-per-node", str(per_node),
                 "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0",
                 "--redirects", "3", "--log-dir", str(self.logs / f"node{node}"),
                 *entry, *node_args(node)],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

    def wait(self, node: int | None = None, timeout: float = TIMEOUT) -> list[int]:
        procs = self.procs if node is None else [self.procs[node]]
        try:
            return [p.wait(timeout=timeout) for p in procs]
        except subprocess.TimeoutExpired:
            for p in self.procs:
                p.kill()
            pytest.fail(f"torchrun did not end within {timeout} s:\n{self.output()}")

    def rank_output(self, node: int, local_rank: int) -> str:
        """stdout and stderr of one rank."""
        files = sorted((self.logs / f"node{node}").glob(f"*/attempt_0/{local_rank}/std*.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    def output(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(self.logs.parent.glob("torchrun-*.log")))

    def pid_of_rank(self, rank: int, timeout: float = 120) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in Path("/proc").iterdir():
                try:
                    raw = (proc / "environ").read_bytes()
                except (OSError, ValueError):
                    continue
                env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
                if (env.get(b"LAVENDER_TEST_TAG") == self.tag.encode()
                        and env.get(b"RANK") == str(rank).encode()):
                    return int(proc.name)
            time.sleep(0.05)
        pytest.fail(f"no process of rank {rank}:\n{self.output()}")


class ReadOnlyEngine:
    """The engine "read-only": reading a store, generating anything is an error."""

    name = "read-only"
    batch_invariant = True

    def __init__(self, pair, **_):
        pass

    def plan(self, keys, image_key_of):
        return [list(keys)]

    def generate(self, requests, variant, on_finish=None):
        raise AssertionError(f"{len(requests)} {variant} predictions missing from the store, "
                             f"e.g. {requests[0].key}")

    def describe(self):
        return {"name": self.name}


register_engine(ReadOnlyEngine.name, ReadOnlyEngine)


def _single(tiny_pair, tmp_path: Path, **options) -> RunResults:
    config = RunConfig(store=tmp_path / "single-store", **options)
    return collect_results(config, pair=tiny_pair, progress=False)


def _read_store(tiny_pair, store: Path, **options) -> RunResults:
    config = RunConfig(store=store, engine=ReadOnlyEngine.name, **options)
    return collect_results(config, pair=tiny_pair, progress=False)


def _metrics(run: RunResults) -> dict:
    return {b: {v: dict(r.metrics) for v, r in by.items()} for b, by in run.results.items()}


def _report(reports: Path) -> dict:
    return json.loads((reports / "latest" / "report.json").read_text())


def test_two_hosts_gate_like_one_process(tmp_path, tiny_pair):
    """pytest under torchrun, one store folder seen by both hosts (auto: shared): rank 0 holds
    the predictions, scores and verdicts of one process; the other ranks skip, naming it."""
    options = dict(benchmarks=("DocVQA_VAL", "ChartQA_TEST"))  # two small ones prove the point
    store, reports = tmp_path / "store", tmp_path / "reports"
    launch = Launch(tmp_path, "gate", 2, 2, ["-m", "pytest", "tests/benchmarks", "-q", "-p", "no:cacheprovider",
                                             "--benchmark", "DocVQA_VAL", "--benchmark", "ChartQA_TEST",
                                             "--store", str(store), "--reports", str(reports)])
    single = _single(tiny_pair, tmp_path, **options)
    codes = launch.wait()
    rank0 = launch.rank_output(0, 0)
    assert codes == [0, 0], launch.output() + rank0
    expected = judge_run(single)
    rows = [row for row in expected.reference.rows if row.benchmark in options["benchmarks"]]
    cases = 3 * len(rows) + len(options["benchmarks"])  # gate cases + snapshots
    assert f"{cases} passed" in rank0, rank0
    for node, local in ((0, 1), (1, 0), (1, 1)):
        out = launch.rank_output(node, local)
        assert f"{cases} skipped" in out, out
        assert f"generated shard {2 * node + local} of 4" in out and "rank 0 of 4 (node 0" in out, out

    report = _report(reports)
    assert report["metadata"]["torchrun"]["store_sharing"] == "shared"
    assert sum(report["metadata"]["torchrun"]["generated_by_rank"]) == 2 * (24 + 24)  # each row once
    assert [(v["row_id"], v["quantity"], v["status"], v["measured"]) for v in report["verdicts"]] == [
        (v.row_id, v.quantity, v.status, v.measured) for v in expected.verdicts]
    union = _read_store(tiny_pair, store, **options)
    assert union.predictions == single.predictions
    assert _metrics(union) == _metrics(single)


def _writer_lines(store: Path, rank: int) -> int:
    return sum(len(p.read_text().splitlines()) for p in store.rglob(f"rank{rank}-*.jsonl"))


def test_a_killed_rank_stops_the_others_and_a_relaunch_resumes(tmp_path, tiny_pair):
    """Each host its own store (auto: gather). Rank 3 is SIGKILLed mid-shard: ranks 0 and 1
    stop with an error naming it and its host; a relaunch with two ranks resumes from both
    hosts' stores, generates only what was never stored, and rank 0 ends with the
    predictions and scores of one uninterrupted process."""
    options = dict(benchmarks=("MME",))
    rows = 2 * 56
    stores = [tmp_path / "store-host0", tmp_path / "store-host1"]
    reports = tmp_path / "reports"
    run = ["-m", "lavender_checks.cli", "run", "--quiet", "--benchmark", "MME", "--engine", "generate", "--batch-size", "1",
           "--reports", str(reports)]

    first = Launch(tmp_path, "first", 2, 2, run, lambda node: ["--store", str(stores[node])])
    victim = first.pid_of_rank(3)
    deadline = time.time() + TIMEOUT
    while _writer_lines(stores[1], 3) < 2:
        assert time.time() < deadline and first.procs[1].poll() is None, first.output()
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    stored_by_victim = _writer_lines(stores[1], 3)
    codes = first.wait()
    stopped_after = time.time() - killed_at
    assert codes[0] != 0 and codes[1] != 0, first.output()
    assert stopped_after < 120, f"the other ranks took {stopped_after:.0f} s to stop"
    for local in (0, 1):
        err = first.rank_output(0, local)
        assert f"rank 3 of 4 (node 1, local rank 1, host {socket.gethostname()}, pid {victim})" in err, err
        assert "never arrived" in err and "relaunch" in err, err
    assert not (reports / "latest").exists()  # no report from a broken run
    assert stored_by_victim < rows // 4, "rank 3 finished its shard before it could be killed"
    generated_first = sum(_writer_lines(store, r) for store in stores for r in range(4))

    single = _single(tiny_pair, tmp_path, **options)
    second = Launch(tmp_path, "second", 2, 1, run, lambda node: ["--store", str(stores[node])])
    codes = second.wait()
    # Rank 0 exits 1: the gate's rows of the benchmarks not run are missing, as in one process.
    assert codes[1] == 0 and codes[0] in (0, 1), second.output() + second.rank_output(0, 0)
    report = _report(reports)
    assert [(v["row_id"], v["quantity"], v["status"], v["measured"]) for v in report["verdicts"]] == [
        (v.row_id, v.quantity, v.status, v.measured) for v in judge_run(single).verdicts]
    torchrun = report["metadata"]["torchrun"]
    assert torchrun["store_sharing"] == "gather" and torchrun["world_size"] == 2
    assert torchrun["rows"]["gathered"] > 0  # host 1's rows, rank 3's among them, reached rank 0
    # Nothing stored was generated again, nothing was lost: every row generated exactly once.
    assert generated_first + sum(torchrun["generated_by_rank"]) == rows
    union = _read_store(tiny_pair, stores[0], **options)
    assert union.predictions == single.predictions
    assert _metrics(union) == _metrics(single)


@pytest.mark.parametrize("scenario", ["error", "hang", "absent"])
def test_a_failing_or_hanging_rank_stops_the_others_in_bounded_time(tmp_path, scenario):
    """Rank 1 of 3 arrives with an error (the others stop at once, with its message), hangs
    alive or never joins (the others stop when --dist-timeout has passed), named either way."""
    timeout = 8.0
    launch = Launch(tmp_path, scenario, 1, 3, ["-m", "tests.integration.torchrun_child", scenario, str(timeout)])
    codes = launch.wait(timeout=120)
    assert codes != [0], launch.output()
    for local in (0, 2):
        out = launch.rank_output(0, local)
        lines = [line for line in out.splitlines() if line.startswith("FAILURE")]
        assert lines, out + launch.output()
        waited = float(lines[0].split()[1])
        if scenario == "absent":
            assert "rank 1 of 3 (never started): it never arrived" in out, out
            assert timeout - 1 <= waited < timeout + 30, out
            continue
        assert f"rank 1 of 3 (node 0, local rank 1, host {socket.gethostname()}, pid " in out, out
        if scenario == "error":
            assert "failed: ValueError: disk full" in out and waited < timeout, out
        else:
            assert "never arrived" in out and timeout - 1 <= waited < timeout + 30, out
    if scenario == "error":
        assert "PASSED" in launch.rank_output(0, 1)  # it raises its own error itself


def test_rank0_holds_the_launchs_locks_until_it_is_done(tmp_path):
    """Shared store: the key's lock is rank 0's, whichever rank reaches the store first, so
    it does not go when another rank ends while rank 0 still uses the key."""
    launch = Launch(tmp_path, "locks", 1, 2,
                    ["-m", "tests.integration.torchrun_child", "locks", "60", str(tmp_path / "store")])
    codes = launch.wait(timeout=120)
    zero = launch.rank_output(0, 0)
    assert "PASSED" in zero and codes == [0], zero + launch.output()


def test_an_input_missing_on_one_host_stops_every_rank_before_any_work(tmp_path):
    """Host 1 is given an LMUData folder that does not exist: its rank exits 2 with the
    folder's name, and rank 0 stops at once (exit 3) with that error, naming the rank."""
    missing = tmp_path / "no-lmudata"
    launch = Launch(tmp_path, "inputs", 2, 1,
                    ["-m", "lavender_checks.cli", "run", "--quiet", "--store", str(tmp_path / "store"),
                     "--reports", str(tmp_path / "reports")],
                    lambda node: ["--lmu-data", str(missing)] if node == 1 else [])
    codes = launch.wait(timeout=120)
    assert 0 not in codes, launch.output()  # torchrun exits 1 when a rank fails; the ranks' own:
    for node, status in ((0, 3), (1, 2)):
        log = (tmp_path / f"torchrun-inputs-node{node}.log").read_text()
        assert re.search(rf"exitcode\s*:\s*{status} ", log), log
    assert f"--lmu-data LMUData folder {missing} does not exist" in launch.rank_output(1, 0)
    zero = launch.rank_output(0, 0)
    assert "lavender-checks run: error: rank 0 of 2" in zero, zero
    assert f"rank 1 of 2 (node 1, local rank 0, host {socket.gethostname()}" in zero, zero
    assert f"failed: RunInputError: --lmu-data LMUData folder {missing} does not exist" in zero, zero


def test_stop_early_every_rank_stops_in_the_round_one_process_does(tmp_path, tiny_pair):
    """--stop-early under torchrun, each host its own store (gather): every round's rows reach
    rank 0, which decides for all; the launch stops after the round a single process stops
    after, with the same failure."""
    from tests.integration.test_stop_early import broken_reference

    reference = broken_reference(tmp_path)
    single = _single(tiny_pair, tmp_path, stop_early=True, reference=reference)
    stores = [tmp_path / "store-host0", tmp_path / "store-host1"]
    reports = tmp_path / "reports"
    launch = Launch(tmp_path, "early", 2, 1, ["-m", "lavender_checks.cli", "run", "--quiet", "--stop-early",
                                              "--reference", str(reference), "--reports", str(reports)],
                    lambda node: ["--store", str(stores[node])])
    codes = launch.wait()
    assert codes[0] == 1, launch.output() + launch.rank_output(0, 0)  # the gate failed
    assert "STOPPED EARLY" in launch.rank_output(0, 0)
    early = _report(reports)["early_stop"]
    assert early["stopped"] and early["rows_used"] == single.early_stop.rows_used < early["rows_total"]
    assert early["decided_by"]["row"] == single.early_stop.deciding.row_id
    assert _report(reports)["metadata"]["torchrun"]["store_sharing"] == "gather"
def test_bad_input_on_every_rank_gives_a_short_launcher_summary(tmp_path):
    """Both ranks of one host meet the same bad input: each prints its line and fails, but
    torchrun's summary names one rank, with that line (not a pointer to torch's docs)."""
    missing = tmp_path / "no-lmudata"
    launch = Launch(tmp_path, "summary", 1, 2,
                    ["-m", "lavender_checks.cli", "run", "--quiet", "--store", str(tmp_path / "store"),
                     "--reports", str(tmp_path / "reports"), "--lmu-data", str(missing)])
    assert launch.wait(timeout=120) == [1], launch.output()
    line = f"lavender-checks run: error: --lmu-data LMUData folder {missing} does not exist"
    for local in (0, 1):
        assert line in launch.rank_output(0, local), launch.rank_output(0, local)
    summary = (tmp_path / "torchrun-summary-node0.log").read_text()
    assert f"traceback : {line}" in summary, summary
    assert "<NO_OTHER_FAILURES>" in summary and "To enable traceback" not in summary, summary

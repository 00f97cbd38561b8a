"""pytest options and the session fixtures of the benchmark gate (tests/benchmarks/).

Options: the same as ``lavender-checks run`` (``lavender_checks.run.config.RUN_OPTIONS``):
``--base-model``, ``--lora``, ``--lmu-data``, ``--benchmark``, ``--profile``, ``--reference``,
``--gate``, ``--limit``, ``--fraction``, ``--batch-size``, ``--from-vlmeval``, ``--base-name``,
``--lavender-name``, ``--store``, ``--device``, ``--dtype``, ``--engine``, ``--chunk-rows``,
``--reports``, ``--keep-reports`` and ``--gate-series``. ``--lora`` given more than once, or
naming a folder of ``checkpoint-N/`` adapters, gates a series of checkpoints (``run.series``):
each case id then carries its checkpoint's name. With none, the built-in tiny
pair runs on the mini benchmarks and is gated against its own numbers
(fixtures/reported/tiny-mini.toml).

pytest-xdist (``-n auto`` = one worker per GPU):
* each worker sees one GPU: ``gwN`` gets GPU ``N mod count`` through ``CUDA_VISIBLE_DEVICES``,
  set when this file is imported, before anything can initialise CUDA; the controller
  process never touches CUDA (it does not even load the model);
* no generation is done twice: worker i generates shard i of n of every benchmark into the
  shared prediction store (its own writer file), then waits at a file barrier until every
  shard is stored, then scores the union (``run.collect.collect_results``), so every worker
  holds the same results before any case is judged;
* one worker writes the report (reports/<run-id>/) and the controller prints the verdict
  table in the terminal summary, and removes the barrier folder once every worker is done;
* xdist's default ``--dist load`` is the mode to use: the work is split by the fixture, not by
  how cases are spread (see tests/benchmarks/test_snapshots.py on ``--dist loadgroup``).

A selection (``-k``, ``-m``, node ids) runs only the benchmarks of its selected cases: the
others are neither generated nor reported (``pytest_collection_finish``).
Generation progress (``run.progress``) shows on the terminal while the session fixture runs,
written around pytest's capture: a bar per benchmark and variant on a terminal, one line each
in a CI log, nothing under ``-q -q``; xdist workers write their own lines, ``[gwN] ...``, to
their stderr, which xdist leaves on the terminal (``_progress`` says why).

Bad input stops the session at once, before any model loads: ``pytest.exit`` with the line
and exit status ``lavender-checks run`` gives (``lavender_checks.errors``), instead of one setup
error per case. Options, model folders, LMUData, reference and profile are checked while pytest
configures itself (in the xdist controller: once), and so is ``--device cuda`` on a CPU build
of torch or with no GPU visible (without importing torch), and a ``--store`` or ``--reports``
given that is no writable folder; the default folders when the gate's first fixture is set up.
Under xdist, a worker that meets bad input later (a store key another run holds) hands its line
to the controller, which stops the whole session with it (``_Stopped``, ``pytest_testnodedown``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest

from lavender_checks import REPORTS
from lavender_checks.errors import EXIT_INPUT, EXIT_RANK_FAILED, EXIT_TERMINATED, Terminated, error_line
from lavender_checks.run import distributed, pipeline, series
from lavender_checks.run.collect import RunResults
from lavender_checks.run.config import (
    RunConfig,
    add_run_options,
    check_before_work,
    check_cuda_without_torch,
    check_inputs,
    check_writable_folder,
    config_from_options,
    input_errors,
)
from lavender_checks.run.judge import GateOutcome
from lavender_checks.run.shards import ShardBarrier, remove_stale_barriers

_GATE_SUMMARY = pytest.StashKey[dict]()
_TORCHRUN = pytest.StashKey["distributed.TorchrunShards | None"]()
_BARRIERS = pytest.StashKey[set]()
_WORKER_OUTPUT_KEY = "lavender_gate"
_SNAPSHOT_ACCOUNTS = pytest.StashKey[list]()
_SNAPSHOT_OUTPUT_KEY = "lavender_snapshots"
_SNAPSHOT_DIFF = pytest.StashKey[str]()
_WORKER_BARRIER_KEY = "lavender_barrier"
_SELECTION = pytest.StashKey[dict]()
_WORKER_STOP_KEY = "lavender_stop"


# ----------------------------------------------------------------------------- GPUs and xdist


_gpu_ids = distributed.visible_gpus  # the GPUs this process may use, found without initialising CUDA


def _worker() -> tuple[str, int, int] | None:
    """(worker id, index, worker count) in an xdist worker, else None."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return None
    return worker, int(worker.removeprefix("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _pin_worker() -> None:
    """One GPU per worker, and a fair share of the CPU cores (several torch processes each
    using every core slow each other down many times over). Under torchrun, the GPU of the
    rank's LOCAL_RANK (torchrun itself sets OMP_NUM_THREADS)."""
    if distributed.launched():
        distributed.pin_local_gpu(_gpu_ids())
        return
    worker = _worker()
    if worker is None:
        return
    gpus = _gpu_ids()
    if gpus:  # a machine without GPUs runs every worker on the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[worker[1] % len(gpus)]
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // worker[2]))


# At import, before any test module or plugin can import torch or initialise CUDA here.
_pin_worker()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per GPU; without GPUs, xdist's default (None)."""
    return len(_gpu_ids()) or None


# ----------------------------------------------------------------------------- options


def pytest_addoption(parser):
    group = parser.getgroup("lavender", "lavender-checks benchmark gate")
    add_run_options(group.addoption)


def run_config(config: pytest.Config) -> RunConfig:
    """The RunConfig of the pytest options (pure: no model, no CUDA)."""
    return config_from_options(config.getoption)


def _stop(error: BaseException | str, returncode: int = EXIT_INPUT) -> None:
    """End the session at once with the line and status of ``lavender-checks run``. In an
    xdist worker this ends the worker; ``_Stopped`` hands the line to the controller, which
    ends the whole session with it (``pytest_testnodedown``)."""
    pytest.exit(error_line("run", error), returncode=returncode)


class _Stopped:
    """What a session stopped by ``_stop`` still has to do once pytest has caught the stop.

    * syrupy must not look for unused snapshots: no case ran, so it would take every accepted
      snapshot for unused, delete them under ``--snapshot-update`` and add its own status to
      the stop's (2 | 1 = 3);
    * in an xdist worker, the line and status go where the controller reads them
      (``pytest_testnodedown``). Without that the controller sees a worker that ended with
      status 2 (its keyboard interrupt), takes it for a crash and starts a new worker, which
      stops again: pages of crashed workers and errors instead of one line;
    * under torchrun, the rank ends as ``distributed.leave_failure_to_launcher`` says.
    """

    def __init__(self, config: pytest.Config):
        self.config = config
        self.stop: pytest.exit.Exception | None = None

    def pytest_keyboard_interrupt(self, excinfo) -> None:  # pytest calls it for pytest.exit too
        stop = excinfo.value
        if not (isinstance(stop, pytest.exit.Exception) and stop.msg.startswith(error_line("run", ""))):
            return
        self.stop = stop
        self.config.option.disable_unused_snapshots = True  # syrupy's --snapshot-disable-unused
        if hasattr(self.config, "workeroutput"):
            self.config.workeroutput[_WORKER_STOP_KEY] = {"line": stop.msg, "returncode": stop.returncode}

    def pytest_unconfigure(self) -> None:
        if self.stop is not None:  # after the session's output: under torchrun, a short summary
            distributed.leave_failure_to_launcher(self.stop.msg)


def pytest_configure(config):
    config.stash[_BARRIERS] = set()
    config.pluginmanager.register(_Stopped(config), "lavender-stopped")
    _sigterm_as_interrupt(config)
    from lavender_checks.notices import python_filters

    # The libraries' warnings known to be harmless (known_warnings.toml) stay out of the summary.
    for message, category in python_filters():
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category}")
    try:
        # Bad options and missing inputs stop the session before collection, in the xdist
        # controller before any worker starts; what needs torch or writes is checked by the
        # gate's first fixture. Under torchrun all of it waits for that fixture: the ranks
        # join their group first, so that an input missing on one host stops all of them.
        run = run_config(config)
        distributed.check_options(config.getoption("store_sharing"), config.getoption("dist_timeout"))
        if not distributed.launched():
            check_inputs(run)
            if run.from_vlmeval is None and run.device is not None and run.device_kind == "cuda":
                check_cuda_without_torch(run.device, _gpu_ids())
            # Output folders given on the command line (the defaults are checked, and made, by
            # the gate's first fixture, so that a run of other tests leaves no folder behind).
            if run.from_vlmeval is None and run.store is not None:
                check_writable_folder("--store", run.store)
            if config.getoption("reports") != REPORTS:
                check_writable_folder("--reports", config.getoption("reports"))
    except input_errors() as exc:
        _stop(exc)
    if distributed.launched() and (config.getoption("numprocesses", None) or _worker()):
        _stop("under torchrun every rank is one pytest session on one GPU: drop -n "
              "(pytest-xdist is the one-host alternative to torchrun)")


# ----------------------------------------------------------------------------- selection


def pytest_collection_finish(session):
    """What the session's selected cases need (after ``-k``, ``-m`` and node ids): the run's
    fixtures then generate, score and report only the benchmarks that have a selected case,
    so that what is deselected is neither computed nor in the report. A benchmark case names
    its benchmark by its ``row_id`` (``<benchmark>-<metric>``) or ``snapshot_benchmark``
    parameter; a selected case that uses the run's results without naming one needs them all."""
    wanted: list[str] = []
    gate_cases = 0
    for item in session.items:
        if "run_results" not in getattr(item, "fixturenames", ()):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "row_id" in params:
            gate_cases += 1
            wanted.append(str(params["row_id"]).split("-", 1)[0])
        elif "snapshot_benchmark" in params:
            wanted.append(str(params["snapshot_benchmark"]))
        else:
            return  # a case of every benchmark
    if wanted:
        session.config.stash[_SELECTION] = {"benchmarks": set(wanted), "gate_cases": gate_cases}


def _selected(config: pytest.Config, run: RunConfig) -> RunConfig:
    """``run`` restricted to the benchmarks of the session's selected cases."""
    selection = config.stash.get(_SELECTION, None)
    if selection is None:
        return run
    benchmarks = tuple(b for b in run.benchmarks if b in selection["benchmarks"])
    return dataclasses.replace(run, benchmarks=benchmarks) if benchmarks else run


def _selection_note(config: pytest.Config, outcome: GateOutcome) -> str:
    """When the selected cases are some of the verdicts of the benchmarks run, say that the
    exit status covers those only ('' when they are all of them)."""
    selection = config.stash.get(_SELECTION, None)
    if selection is None or selection["gate_cases"] >= len(outcome.verdicts):
        return ""
    return (f"pytest selected {selection['gate_cases']} of the {len(outcome.verdicts)} verdicts of "
            f"{', '.join(outcome.reference.benchmarks) or 'the benchmarks run'}: the exit status covers "
            "only the selected cases; the report shows every verdict")
def _sigterm_as_interrupt(config: pytest.Config) -> None:
    """SIGTERM (a scheduler's stop) ends the session as Ctrl-C does, so the session fixtures
    unwind (store locks released, finished predictions kept), then with status 143 and the
    line ``lavender-checks run`` prints (``pytest_keyboard_interrupt``, ``pytest_sessionfinish``)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    config.add_cleanup(lambda: signal.signal(signal.SIGTERM, previous))


_TERMINATED: list[bool] = []  # set when SIGTERM ended this process's session


def pytest_keyboard_interrupt(excinfo):
    if isinstance(excinfo.value, Terminated):
        _TERMINATED.append(True)
        print("terminated (SIGTERM); finished predictions are kept and a rerun resumes from them",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gate_config(pytestconfig) -> RunConfig:
    """The run's configuration, its inputs checked (once per process, before any model loads);
    its benchmarks those of the session's selected cases."""
    config = _selected(pytestconfig, run_config(pytestconfig))
    option = pytestconfig.getoption
    try:
        # Under torchrun the ranks join their group first, so that an input missing on one
        # host stops them all; only rank 0 writes reports.
        shards = pipeline.torchrun_shards(config, option("store_sharing"), option("dist_timeout"))
        pytestconfig.stash[_TORCHRUN] = shards
        reports = option("reports") if shards is None or shards.scores else None
        pipeline.checked(shards, lambda: check_before_work(
            config, reports=reports, keep_reports=option("keep_reports")))
    except input_errors() as exc:
        _stop(exc)
    except distributed.RankFailure as exc:
        _stop(exc, EXIT_RANK_FAILED)
    return config


@pytest.fixture(scope="session")
def model_pair(gate_config):
    """The base model with the Lavender adapter, loaded once per process (one per GPU worker)."""
    if gate_config.from_vlmeval is not None:
        pytest.skip("--from-vlmeval scores VLMEvalKit's files: no model is loaded")
    try:
        return series.load_run_pair(gate_config)  # a checkpoint series: every adapter beside the base
    except input_errors() as exc:
        _stop(exc)


@pytest.fixture(scope="session")
def worker_barrier(gate_config, pytestconfig) -> ShardBarrier | None:
    """The files through which this session's xdist workers share work (None without xdist)."""
    worker = _worker()
    if worker is None or worker[2] < 2:
        return None
    from lavender_checks.run.store import DEFAULT_ROOT

    run_uid = os.environ.get("PYTEST_XDIST_TESTRUNUID", "run")
    shards = (gate_config.store or DEFAULT_ROOT) / ".shards"
    barrier = ShardBarrier(shards / run_uid, worker[2], worker[0])
    remove_stale_barriers(shards, keep=barrier.directory)  # left by killed runs
    # The controller removes this one once every worker is done with it.
    if hasattr(pytestconfig, "workeroutput"):
        pytestconfig.workeroutput[_WORKER_BARRIER_KEY] = str(barrier.directory)
    return barrier


@pytest.fixture(scope="session")
def run_results(gate_config, worker_barrier, request) -> RunResults:
    """Scores of both variants on every benchmark, computed once per process through the
    prediction store (a second session only reads it). Under xdist, worker i generates shard
    i of n and every worker scores the union. Under torchrun, rank i generates shard i of n
    and rank 0 alone scores the union: the other ranks skip every case, naming rank 0 (one
    verdict, one report and one set of snapshots, written by one process; in gather mode
    only rank 0 holds the union at all)."""
    if distributed.launched():
        return _torchrun_results(gate_config, request)
    worker = _worker()
    shard = (worker[1] % worker[2], worker[2]) if worker_barrier is not None else None
    try:
        return series.collect_run(
            gate_config, load_pair=lambda: request.getfixturevalue("model_pair"), shard=shard,
            wait_for_shards=worker_barrier,
            writer=worker[0] if worker else "main", progress=_progress(request.config),
        )
    except input_errors() as exc:
        _stop(exc)


def _torchrun_results(gate_config, request) -> RunResults:
    shards = request.config.stash[_TORCHRUN]
    try:
        run = series.collect_run(
            gate_config, load_pair=lambda: request.getfixturevalue("model_pair"),
            shard=(shards.own, shards.count), wait_for_shards=shards, writer=shards.writer,
            progress=_progress(request.config))
    except input_errors() as exc:
        _stop(exc)
    except distributed.RankFailure as exc:  # every rank ends at once, with the rank to blame
        _stop(exc, EXIT_RANK_FAILED)
    if run is None:
        request.config.stash[_GATE_SUMMARY] = {"rank": shards.skip_reason()}
        pytest.skip(shards.skip_reason())
    return run


def _progress(config: pytest.Config):
    """Generation progress on the terminal, as ``lavender-checks run`` shows it (``run.progress``),
    written around pytest's output capture (as live logging is): per benchmark and variant, a
    bar on a terminal, one line in a CI log (no TTY, or ``CI`` set); nothing under ``-q -q``.

    Under pytest-xdist the workers generate, and xdist hands a worker's output to the
    controller only when its tests report, i.e. after the generation. So each worker writes
    its own lines, prefixed ``[gwN]``, to its stderr: xdist leaves a worker's stderr on the
    controller's terminal (its stdout goes to /dev/null). Lines, not bars: several processes
    redraw one terminal line badly."""
    if config.getoption("verbose") <= -2:
        return False
    from lavender_checks.run.progress import line_bars, tqdm_bars

    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def uncaptured(write):
        def write_around_capture(text):
            with (capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()):
                write(text)
        return write_around_capture

    worker = _worker()
    if worker is not None or reporter is None:
        prefix = f"[{worker[0]}] " if worker is not None else ""

        def to_stderr(text):
            sys.stderr.write(prefix + text + "\n")
            sys.stderr.flush()

        return line_bars(uncaptured(to_stderr))
    if os.environ.get("CI") or not reporter.isatty:
        def to_reporter(text):
            reporter.ensure_newline()
            reporter.write_line(text)

        return line_bars(uncaptured(to_reporter))

    class _Terminal:  # tqdm's stream: the terminal, whatever pytest captures meanwhile
        write = staticmethod(uncaptured(lambda text: (sys.stderr.write(text), sys.stderr.flush())))

        def flush(self):
            pass

    bars = tqdm_bars(_Terminal())

    def bar_on_its_own_line(label, total, rows):
        if total:
            uncaptured(lambda _: reporter.ensure_newline())("")
        return bars(label, total, rows)

    return bar_on_its_own_line


@pytest.fixture(scope="session")
def gate_outcome(run_results, worker_barrier, pytestconfig) -> GateOutcome:
    """The verdicts of every reference row (a checkpoint series: a ``run.series.SeriesOutcome``,
    each checkpoint's own); the report is written here, by one process."""
    outcome = series.judge_any(run_results)
    note = _selection_note(pytestconfig, outcome)
    if note:  # said in report.md and report.json too
        run_results.metadata["selection"] = note
    # Every worker holds the same results: the first to get here writes the report.
    if worker_barrier is None or worker_barrier.claim("report"):
        series.write_any_report(run_results, outcome, reports_root=pytestconfig.getoption("reports"),
                                keep=pytestconfig.getoption("keep_reports"))
        from lavender_checks.gate.step_summary import verdict_table

        summary = {"table": outcome.table(), "report": str(outcome.report),
                   "missing": dict(run_results.missing), "noncomparable": dict(outcome.noncomparable),
                   "unchecked": _unchecked(run_results.metadata), "selection": note,
                   "allow_noncomparable": run_results.config.allow_noncomparable,
                   # a checkpoint series: a line per checkpoint, stopped if a gated one stopped
                   "early_stop": early.headline() if (early := outcome.early_stop) else None,
                   "stopped_early": outcome.stopped_early,
                   "passed": outcome.passed, "markdown_table": verdict_table(outcome.verdicts)}
        pytestconfig.stash[_GATE_SUMMARY] = summary
        if hasattr(pytestconfig, "workeroutput"):
            pytestconfig.workeroutput[_WORKER_OUTPUT_KEY] = summary
    return outcome


def _unchecked(metadata) -> dict:
    from lavender_checks.gate.verdicts import unchecked

    return unchecked(metadata)
@pytest.fixture(scope="session")
def checkpoint() -> str | None:
    """The checkpoint a gate case judges: None for a one-adapter run; a series' cases are
    parametrized with their checkpoint's name (tests/benchmarks/test_gate.py)."""
    return None


def _snapshot_accounts(config: pytest.Config) -> list:
    if _SNAPSHOT_ACCOUNTS not in config.stash:
        config.stash[_SNAPSHOT_ACCOUNTS] = []
    return config.stash[_SNAPSHOT_ACCOUNTS]


@pytest.fixture(scope="session")
def snapshot_accounts(pytestconfig) -> list:
    """Where the snapshot cases put their accounts (gate.snapshots.compare); at the end of the
    session they go to reports/<run-id>/snapshot-diff.md and .json."""
    accounts = _snapshot_accounts(pytestconfig)
    if hasattr(pytestconfig, "workeroutput"):
        pytestconfig.workeroutput[_SNAPSHOT_OUTPUT_KEY] = accounts
    return accounts


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A gate or snapshot case that fails with its own message (``pytest.fail(..., pytrace=False)``)
    reports that message as it is: it becomes the JUnit XML's ``<failure message=...>`` and the
    short summary's text, without pytest's ``Failed: `` prefix."""
    report = yield
    crash = getattr(report.longrepr, "reprcrash", None)
    if (report.failed and crash is not None and call.excinfo is not None
            and "gate_outcome" in getattr(item, "fixturenames", ())
            and isinstance(call.excinfo.value, pytest.fail.Exception) and not call.excinfo.value.pytrace):
        crash.message = call.excinfo.value.msg
    return report


# ----------------------------------------------------------------------------- terminal summary


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Controller: keep the summary of the worker that wrote the report, every worker's
    snapshot accounts, and the barrier folder the workers shared; a worker that stopped on
    bad input (``_Stopped``) stops the session with its line and status."""
    output = getattr(node, "workeroutput", {})
    summary = output.get(_WORKER_OUTPUT_KEY)
    if summary is not None:
        node.config.stash[_GATE_SUMMARY] = summary
    _snapshot_accounts(node.config).extend(output.get(_SNAPSHOT_OUTPUT_KEY, []))
    if output.get(_WORKER_BARRIER_KEY):
        node.config.stash[_BARRIERS].add(output[_WORKER_BARRIER_KEY])
    stop = output.get(_WORKER_STOP_KEY)
    if stop is not None:  # a worker met bad input: the whole session ends, as without xdist
        pytest.exit(stop["line"], returncode=stop["returncode"])


def pytest_sessionfinish(session):
    """Controller (or a session without xdist): the snapshot accounts of the whole session go
    into the run's report folder; every worker is done, so the barrier folders can go. Under
    GitHub Actions the verdicts and the snapshot diff go to the job's summary page. A session
    ended by SIGTERM ends with its status, 143."""
    config = session.config
    if session.exitstatus == pytest.ExitCode.INTERRUPTED and _TERMINATED:
        session.exitstatus = EXIT_TERMINATED
    if hasattr(config, "workeroutput"):
        return
    for folder in config.stash.get(_BARRIERS, ()):
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # store/.shards/ too, unless another run uses it
            Path(folder).parent.rmdir()
    summary, accounts = config.stash.get(_GATE_SUMMARY, None), config.stash.get(_SNAPSHOT_ACCOUNTS, None)
    if (summary is not None and summary.get("noncomparable") and not summary.get("allow_noncomparable")
            and session.exitstatus == pytest.ExitCode.OK):
        # A benchmark not gated at all (no reference rows) has no case to fail: the run does.
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if summary is not None and summary.get("stopped_early") and session.exitstatus == pytest.ExitCode.OK:
        # A run --stop-early stopped has failed, whichever of its cases were selected (-k).
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if summary is None or not summary.get("report"):
        return
    if accounts:
        from lavender_checks.gate.snapshots import write_account

        config.stash[_SNAPSHOT_DIFF] = str(write_account(summary["report"], accounts)[0])
    _append_step_summary(config, summary, accounts or [])


def _append_step_summary(config: pytest.Config, summary: dict, accounts: list) -> None:
    from lavender_checks.gate import step_summary
    from lavender_checks.gate.snapshots import versions_notice
    from lavender_checks.gate.verdicts import noncomparable_notice

    allowed = summary["allow_noncomparable"]
    passed = summary["passed"] and (not summary["noncomparable"] or allowed)
    step_summary.append(step_summary.page(
        # The snapshot cases fail the session on their own; the diff below says so.
        "lavender-checks gate (pytest): verdicts", passed, summary["markdown_table"],
        notices=[noncomparable_notice(summary["noncomparable"], allowed), versions_notice(accounts)],
        missing=summary["missing"], report=summary["report"], snapshot_diff=config.stash.get(_SNAPSHOT_DIFF, None)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = config.stash.get(_GATE_SUMMARY, None)
    if summary is None or hasattr(config, "workeroutput"):
        return
    terminalreporter.write_sep("=", "lavender-checks gate")
    if "rank" in summary:  # a torchrun rank other than 0
        terminalreporter.write_line(summary["rank"])
        return
    from lavender_checks.gate.snapshots import versions_notice

    versions = versions_notice(config.stash.get(_SNAPSHOT_ACCOUNTS, None) or [])
    if versions:  # before the verdicts: it may explain a snapshot failure above
        terminalreporter.write_line(versions, yellow=True)
    terminalreporter.write_line(summary["table"])
    for benchmark, reason in summary["missing"].items():
        terminalreporter.write_line(f"missing {benchmark}: {reason}")
    if summary.get("selection"):
        terminalreporter.write_line(summary["selection"], yellow=True)
    if summary.get("unchecked"):
        from lavender_checks.gate.verdicts import unchecked_notice

        terminalreporter.write_line(unchecked_notice(summary["unchecked"]), yellow=True)
    terminalreporter.write_line(f"report: {summary['report']}")
    if _SNAPSHOT_DIFF in config.stash:
        terminalreporter.write_line(f"snapshot diff: {config.stash[_SNAPSHOT_DIFF]}")
    if summary.get("early_stop"):
        terminalreporter.write_line(summary["early_stop"], bold=True)
    if summary.get("noncomparable"):  # last, where a reader looks first
        from lavender_checks.gate.verdicts import noncomparable_notice

        terminalreporter.write_line(noncomparable_notice(summary["noncomparable"],
                                                         summary["allow_noncomparable"]), red=True)

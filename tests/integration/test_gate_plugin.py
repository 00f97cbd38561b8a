"""The gate's pytest behaviour, tested as a user meets it: a pytest session run by pytester
(as syrupy tests its plugin) with the plugin and the gate's own test module.

Sessions run in a subprocess when they load a model (pytester's in-process runs drop the
modules a session imported, and torch does not survive being imported twice) or stop while
pytest configures itself (which pytester handles only in a subprocess); the others run in
this process. The built-in tiny pair generates into the default store, so after the first session
(or ``pytest tests/benchmarks``) they only read it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lavender_checks import REPO_ROOT
from lavender_checks.run.config import TINY_REFERENCE

GATE_TESTS = REPO_ROOT / "tests" / "benchmarks" / "test_gate.py"
ERROR_LINE = "lavender-checks run: error: "


@pytest.fixture
def gate(pytester, tmp_path, monkeypatch):
    """Run the gate (tests/benchmarks/test_gate.py) in a fresh session with these options."""
    pytester.makepyfile(test_gate=GATE_TESTS.read_text(encoding="utf-8"))
    # When this suite runs under xdist, the session must not take itself for one of its
    # workers (it keeps the test-run id: the outer session's runs share the store's locks).
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)
    # A subprocess session (and its xdist workers) imports this checkout's package, not the
    # one installed in the environment, which may be another checkout's.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    # A subprocess session runs in pytester's folder: it imports this checkout's package, not
    # one installed elsewhere.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                   os.environ.get("PYTHONPATH")])))

    def run(*options: str, subprocess: bool = False):
        runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
        return runner("-p", "lavender_checks.run.pytest_plugin", "-p", "no:cacheprovider",
                      "--reports", str(tmp_path / "reports"), *options)

    return run


def test_the_tiny_gate_passes(gate):
    result = gate("--benchmark", "ChartQA_TEST", subprocess=True)
    rows = [row for row in tomllib.loads(TINY_REFERENCE.read_text())["row"]
            if row["benchmark"] == "ChartQA_TEST"]
    result.assert_outcomes(passed=3 * len(rows))
    result.stdout.fnmatch_lines(["*lavender-checks gate*", f"{3 * len(rows)} pass, 0 fail, 0 missing*",
                                 "report: *"])
    assert result.ret == 0
    # Everything is stored now: a second session reads the store and loads no model.
    again = gate("--benchmark", "ChartQA_TEST", subprocess=True)
    again.assert_outcomes(passed=3 * len(rows))
    report = Path(again.outlines[[line.startswith("report: ") for line in again.outlines].index(True)]
                  .removeprefix("report: "))
    metadata = json.loads((report / "report.json").read_text())["metadata"]
    assert metadata["models"]["loaded"] is False
    assert metadata["predictions"]["ChartQA_TEST"]["lavender"]["generated"] == 0


def test_a_failing_case_prints_measured_reported_band_and_n(gate, tmp_path, monkeypatch):
    text = TINY_REFERENCE.read_text(encoding="utf-8")
    reference = tomllib.loads(text)
    row = next(r for r in reference["row"] if r["benchmark"] == "ChartQA_TEST")
    # The row's base number moved far out of any band; its lavender and gain stay.
    moved = text.replace(
        f'label = "{row["label"]}"\nbenchmark = "ChartQA_TEST"\nmetric = "{row["metric"]}"\n'
        f'unit = "{row["unit"]}"\nbase = {row["base"]:.2f}\nlavender = {row["lavender"]:.2f}\n'
        f'delta = {row["delta"]:.2f}',
        f'label = "{row["label"]}"\nbenchmark = "ChartQA_TEST"\nmetric = "{row["metric"]}"\n'
        f'unit = "{row["unit"]}"\nbase = {row["base"] + 40:.2f}\nlavender = {row["lavender"] + 40:.2f}\n'
        f'delta = {row["delta"]:.2f}', 1)
    assert moved != text
    edited = tmp_path / "edited.toml"
    edited.write_text(moved, encoding="utf-8")
    page = tmp_path / "step-summary.md"
    page.write_text("# earlier steps\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(page))
    junit = tmp_path / "junit.xml"
    result = gate("--benchmark", "ChartQA_TEST", "--reference", str(edited), "--junitxml", str(junit),
                  subprocess=True)
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 2 and result.ret == 1  # base and lavender of that row
    row_id = f"ChartQA_TEST-{row['metric']}"
    first_line = (f"FAIL {row_id} base [ChartQA_TEST {row['metric']}]: measured {row['base']:.2f}, "
                  f"reported {row['base'] + 40:.2f}, band [")
    result.stdout.fnmatch_lines([f"*test_base?{row_id}?*", f"{glob.escape(first_line)}*, *], n=24 questions"])
    result.stdout.fnmatch_lines([f"FAILED test_gate.py::test_base[[]{row_id}[]] - FAIL {row_id[:10]}*"])

    # CI's view: one <testcase> per case; a failure's message is the verdict's, whole.
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    assert len(cases) == sum(outcomes.values())
    failures = {name: case.find("failure") for name, case in cases.items() if case.find("failure") is not None}
    assert sorted(failures) == [f"test_base[{row_id}]", f"test_lavender[{row_id}]"]
    message = failures[f"test_base[{row_id}]"].get("message")
    assert message.startswith(first_line) and message == failures[f"test_base[{row_id}]"].text
    head, band_line = message.splitlines()
    assert re.fullmatch(r".*, band \[[\d.]+, [\d.]+\], n=24 questions", head), head
    assert re.fullmatch(r" +band = reported ± [\d.]+ \(95% paired bootstrap half-width [\d.]+, floor [\d.]+\), "
                        r"reproduce", band_line), band_line
    assert "Traceback" not in message and "assert " not in message and "GateOutcome" not in message

    # GitHub's job page: appended after what earlier steps wrote.
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# earlier steps\n## lavender-checks gate (pytest): verdicts FAILED\n")
    table = [line for line in text.splitlines() if line.startswith(f"| {row_id} ")]
    assert [line.split(" | ")[-1] for line in table] == ["**FAIL** |", "**FAIL** |", "pass |"]
    assert f"| {row['base'] + 40:.2f} | " in table[0] and "| 24 questions |" in table[0]
    assert f"{outcomes['passed']} pass, 2 fail, 0 missing (reproduce)" in text
    assert text.count(f"\nFAIL {row_id} ") == 2  # the messages of the two failures, before the table
    assert "- report: `" in text


def test_an_input_error_stops_the_session_once_with_the_cli_line_and_status(gate, tmp_path, capsys):
    from lavender_checks import cli

    missing = ["--base-model", str(tmp_path / "no-model"), "--lora", str(tmp_path / "no-lora")]
    result = gate(*missing, subprocess=True)
    output = "\n".join(result.outlines + result.errlines)
    assert result.ret == 2
    assert output.count(ERROR_LINE) == 1, output
    assert not re.search(r"\d+ (passed|failed|errors?)\b", output), output
    # The CLI: the same line, the same status.
    capsys.readouterr()  # pytester echoed the session's output
    assert cli.main(["run", *missing, "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(ERROR_LINE) and line in output


def test_without_lmu_data_a_missing_model_is_reported_before_a_missing_lmudata(gate, tmp_path,
                                                                               monkeypatch):
    monkeypatch.delenv("LMUData", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/LMUData either
    result = gate("--base-model", str(tmp_path / "no-model"), "--lora", str(tmp_path / "no-lora"),
                  subprocess=True)
    assert result.ret == 2
    output = "\n".join(result.outlines + result.errlines)
    assert f"{ERROR_LINE}--base-model {tmp_path / 'no-model'}: no such folder" in output, output


@pytest.mark.parametrize("quiet", [(), ("-q", "-q")])
def test_generation_progress_shows_during_the_session_unless_quiet(gate, tmp_path, quiet):
    """Without a TTY (a CI log): one line per benchmark and variant generated, written while
    the session fixture runs (before the cases' outcomes), not captured; none under -q -q."""
    result = gate("--benchmark", "ChartQA_TEST", "--limit", "1", "--store", str(tmp_path / "store"),
                  *quiet, subprocess=True)
    lines = [line for line in result.outlines if re.match(r"ChartQA_TEST (base|lavender): generated \d+ of \d+ rows in ", line)]
    if quiet:
        assert not lines, result.outlines
        return
    assert [line.split(":")[0] for line in lines] == ["ChartQA_TEST base", "ChartQA_TEST lavender"], result.outlines
    assert all("(0 of " in line and "were stored)" in line for line in lines)
    assert result.outlines.index(lines[-1]) < next(i for i, line in enumerate(result.outlines)
                                                   if "lavender-checks gate" in line)


def test_sigterm_ends_the_session_as_ctrl_c_does_with_143(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    pytester.makepyfile(test_stop="""
        import os, signal, time

        def test_stopped_by_the_scheduler():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        """)
    result = pytester.runpytest_subprocess("-p", "lavender_checks.run.pytest_plugin", "-p", "no:cacheprovider",
                                           timeout=120)
    assert result.ret == 143
    assert "terminated (SIGTERM); finished predictions are kept and a rerun resumes" in result.stderr.str()


def test_torchrun_options_outside_torchrun_stop_the_session(gate):
    result = gate("--store-sharing", "shared", "--dist-timeout", "30", subprocess=True)
    assert result.ret == 2
    output = "\n".join(result.outlines + result.errlines)
    assert output.count(f"{ERROR_LINE}--store-sharing shared decides how torchrun") == 1, output
    assert not re.search(r"\d+ (passed|failed|errors?)\b", output), output


def test_an_unwritable_store_is_one_error_before_any_model(gate, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    result = gate("-n", "2", "--store", str(afile), subprocess=True)  # refused in the controller
    assert result.ret == 2
    output = "\n".join(result.outlines + result.errlines)
    assert output.count(f"{ERROR_LINE}--store {afile}: exists and is not a folder") == 1, output
    assert not re.search(r"\d+ (passed|failed|errors?)\b", output), output


@pytest.mark.parametrize("device", ["tpu", "meta"])
def test_an_unusable_device_is_one_error_before_any_case(gate, device):
    # Refused while pytest configures itself: pytester runs that only in a subprocess.
    result = gate("--device", device, subprocess=True)
    assert result.ret == 2
    output = "\n".join(result.outlines + result.errlines)
    assert output.count(f"{ERROR_LINE}--device {device}") == 1, output


def test_cases_are_only_the_rows_of_the_benchmarks_run(gate):
    result = gate("--benchmark", "MME", "--collect-only", "-q")
    ids = [line for line in result.outlines if "::test_" in line]
    assert ids and all(re.search(r"\[MME-", line) for line in ids)


@pytest.mark.slow
def test_a_sharded_session_leaves_no_barrier_folder(gate, tmp_path, monkeypatch):
    # Its own store: its workers are a run of their own (another xdist test-run id).
    store = tmp_path / "store"
    page = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(page))
    result = gate("-n", "2", "--benchmark", "ChartQA_TEST", "--store", str(store), subprocess=True)
    assert result.ret == 0, "\n".join(result.outlines[-30:])
    result.stdout.fnmatch_lines(["*lavender-checks gate*", "* pass, 0 fail, 0 missing*"])
    # The controller writes the job's summary once, with the verdicts one worker computed.
    text = page.read_text(encoding="utf-8")
    assert text.count("## lavender-checks gate (pytest): verdicts passed") == 1 and "| ChartQA_TEST-" in text
    # Every row stored exactly once, whichever worker generated it (a worker that starts late
    # may find its shard taken by the other, by design).
    by_key: dict[Path, list[int]] = {}
    for log in store.rglob("*.jsonl"):
        by_key.setdefault(log.parent, []).extend(json.loads(line)["index"] for line in log.read_text().splitlines())
    assert len(by_key) == 2, sorted(by_key)  # base and Lavender
    base, lavender = by_key.values()
    assert len(base) == len(set(base)) and sorted(base) == sorted(lavender) and base
    assert not (store / ".shards").exists()  # its barrier folder, then the empty .shards/
    # The workers' progress reached the terminal while they generated (their stderr), one
    # line per benchmark and variant each generated, naming the worker.
    progress = [line for line in result.errlines if re.match(r"\[gw[01]\] ChartQA_TEST (base|lavender): generated ", line)]
    assert {line.split()[2] for line in progress} == {"base:", "lavender:"}, result.errlines


def test_cuda_without_cuda_is_one_error_before_any_case_even_under_xdist(gate, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # Checked in the controller, which must not import torch: one line, before any worker.
    result = gate("-n", "2", "--device", "cuda", subprocess=True)
    assert result.ret == 2
    output = "\n".join(result.outlines + result.errlines)
    assert output.count(f"{ERROR_LINE}--device cuda: CUDA is not available here") == 1, output
    capsys.readouterr()
    from lavender_checks import cli

    assert cli.main(["run", "--device", "cuda", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() in output  # the CLI's line, word for word


def _report_json(result) -> dict:
    line = next(line for line in result.outlines if line.startswith("report: "))
    return json.loads((Path(line.removeprefix("report: ")) / "report.json").read_text())


def test_deselected_benchmarks_are_neither_generated_nor_reported(gate, tmp_path):
    """``-k MME``: the session's fixtures run MME alone; a selection of some of a benchmark's
    verdicts says that the exit status covers those only."""
    store = tmp_path / "store"
    mme_rows = [row for row in tomllib.loads(TINY_REFERENCE.read_text())["row"] if row["benchmark"] == "MME"]
    result = gate("-k", "MME", "--store", str(store), subprocess=True)
    result.assert_outcomes(passed=3 * len(mme_rows))
    assert result.ret == 0
    report = _report_json(result)
    assert report["metadata"]["config"]["benchmarks"] == ["MME"]
    assert {v["benchmark"] for v in report["verdicts"]} == {"MME"}
    assert len(report["verdicts"]) == 3 * len(mme_rows) and report["summary"]["selection"] is None
    generated = {path.relative_to(store).parts[0].split("-")[0] for path in store.rglob("*.jsonl")}
    assert generated == {"MME"}
    # Some of MME's verdicts selected: the rest are in the report, and the session says so.
    some = gate("-k", "test_gain and MME", "--store", str(store), subprocess=True)
    some.assert_outcomes(passed=len(mme_rows))
    note = f"pytest selected {len(mme_rows)} of the {3 * len(mme_rows)} verdicts of MME: the exit status covers only"
    some.stdout.fnmatch_lines([f"{note}*", "report: *"])
    assert _report_json(some)["summary"]["selection"].startswith(note)


def test_a_benchmark_run_without_reference_rows_fails_the_session(gate, pytester, tmp_path):
    """A case of MME other than the gate's (as a snapshot case) runs it; the reference has no
    MME rows, so nothing of it is gated: the session says so last and fails."""
    head, *rows = TINY_REFERENCE.read_text().split("[[row]]")
    chartqa = tmp_path / "chartqa.toml"
    chartqa.write_text(head + "".join(f"[[row]]{r}" for r in rows if 'benchmark = "ChartQA_TEST"' in r))
    pytester.makepyfile(test_other="""
        import pytest

        @pytest.mark.parametrize("snapshot_benchmark", ["MME"])
        def test_uses_the_run(gate_outcome, snapshot_benchmark):
            pass
    """)
    result = gate("--reference", str(chartqa), "--benchmark", "ChartQA_TEST", "--benchmark", "MME",
                  "--store", str(tmp_path / "store"), subprocess=True)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 + 3 * sum('benchmark = "ChartQA_TEST"' in r for r in rows)
    assert "failed" not in outcomes and result.ret == 1
    # the gate summary's last lines, above pytest's count
    assert result.outlines[-3].startswith("NOT COMPARABLE with the reference")
    assert result.outlines[-2].startswith("  MME: not gated: chartqa.toml has no rows for it")
# A store key held by another run, as collect_results reports it (no model, no torch needed).
STORE_HELD = """
from lavender_checks.run import pytest_plugin
from lavender_checks.run.store import StoreLockedError


def _held(*args, **kwargs):
    raise StoreLockedError("/store/MME: another run is using these predictions: pid 1 on host-a")


pytest_plugin.series.collect_run = _held
"""


def test_bad_input_met_by_xdist_workers_ends_the_session_with_one_line(gate, pytester):
    pytester.makeconftest(STORE_HELD)
    result = gate("-n", "2", "--benchmark", "MME", subprocess=True)
    output = "\n".join(result.outlines + result.errlines)
    assert result.ret == 2, output
    assert output.count(f"{ERROR_LINE}/store/MME: another run is using these predictions") == 1, output
    assert "crashed" not in output and "Traceback" not in output, output
    assert not re.search(r"\d+ (passed|failed|errors?)\b", output), output


def test_a_stopped_session_keeps_the_accepted_snapshots_and_its_status(gate, pytester):
    """No case ran: syrupy must neither delete the accepted files under --snapshot-update nor
    add its own status for "unused" snapshots to the stop's."""
    pytester.makeconftest(STORE_HELD)
    snapshots = REPO_ROOT / "tests" / "benchmarks" / "__snapshots__" / "test_snapshots"
    accepted = pytester.path / "__snapshots__" / "test_snapshots" / "test_scores[seed-report-tiny-mini-MME].json"
    accepted.parent.mkdir(parents=True)
    accepted.write_bytes((snapshots / accepted.name).read_bytes())
    pytester.makepyfile(test_snapshots=(REPO_ROOT / "tests" / "benchmarks" / "test_snapshots.py").read_text())
    result = gate("--benchmark", "MME", "--snapshot-update", subprocess=True)
    output = "\n".join(result.outlines + result.errlines)
    assert result.ret == 2, output
    assert output.count(ERROR_LINE) == 1, output
    assert accepted.is_file() and "deleted" not in output, output

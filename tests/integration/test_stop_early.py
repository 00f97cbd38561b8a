"""--stop-early end to end: the tiny pair on the mini benchmarks (CLI, the pytest gate, -n 2),
and full-size VLMEvalKit folders read in rounds (--from-vlmeval)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavender_checks import REPO_ROOT, cli
from lavender_checks.run.config import TINY_REFERENCE

GATE_TESTS = REPO_ROOT / "tests" / "benchmarks" / "test_gate.py"
SNAPSHOT_TESTS = REPO_ROOT / "tests" / "benchmarks" / "test_snapshots.py"


def broken_reference(tmp_path: Path) -> Path:
    """The tiny pair's own numbers, but a ChartQA Lavender that no complete run can reach."""
    text = TINY_REFERENCE.read_text(encoding="utf-8")
    old = 'metric = "Overall"\nunit = "percent"\nbase = 0.00\nlavender = 4.17\ndelta = 4.17'
    assert old in text
    path = tmp_path / "unreachable.toml"
    path.write_text(text.replace(old, 'metric = "Overall"\nunit = "percent"\nbase = 0.00\nlavender = 95.83\n'
                                      'delta = 95.83', 1), encoding="utf-8")
    return path


def report_of(out: str) -> dict:
    line = next(line for line in out.splitlines() if line.startswith("report: "))
    return json.loads((Path(line.removeprefix("report: ")) / "report.json").read_text())


def test_a_run_whose_failure_is_certain_stops_and_keeps_what_it_generated(tmp_path, capsys):
    store, reports = tmp_path / "store", tmp_path / "reports"
    code = cli.main(["run", "--stop-early", "--reference", str(broken_reference(tmp_path)), "--store", str(store),
                     "--reports", str(reports), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("STOPPED EARLY after round ")
    assert "Decided by ChartQA_TEST-Overall lavender" in out
    report = report_of(out)
    early = report["early_stop"]
    assert early["stopped"] and 0 < early["rows_used"] < early["rows_total"] == 170
    assert sum(b["rows_used"] for b in early["benchmarks"].values()) == early["rows_used"]
    assert early["decided_by"] == {"row": "ChartQA_TEST-Overall", "quantity": "lavender",
                                   "message": early["decided_by"]["message"]}
    statuses = {(v["row_id"], v["quantity"]): v["status"] for v in report["verdicts"]}
    assert statuses[("ChartQA_TEST-Overall", "lavender")] == "fail"
    assert list(statuses.values()).count("fail") == len(early["failures"])
    assert all(s == "missing" for k, s in statuses.items() if k not in {(f["row"], f["quantity"]) for f in early["failures"]})
    md = next(reports.glob("2*/report.md")).read_text()
    assert "STOPPED EARLY" in "\n".join(md.splitlines()[:6])
    # Every row it generated is stored: the complete run generates only the others.
    code = cli.main(["run", "--reference", str(broken_reference(tmp_path)), "--store", str(store),
                     "--reports", str(reports), "--quiet"])
    complete = report_of(capsys.readouterr().out)
    generated = sum(c["generated"] for b in complete["metadata"]["predictions"].values() for c in b.values())
    reused = sum(c["reused"] for b in complete["metadata"]["predictions"].values() for c in b.values())
    assert reused == 2 * early["rows_used"] and generated == 2 * (early["rows_total"] - early["rows_used"])
    assert ("ChartQA_TEST-Overall", "lavender") in {(v["row_id"], v["quantity"]) for v in complete["verdicts"]
                                                   if v["status"] == "fail"}


def test_a_complete_run_gives_the_verdicts_of_a_run_without_stop_early(tmp_path, capsys):
    common = ["--store", str(tmp_path / "store"), "--reports", str(tmp_path / "reports"), "--quiet"]
    assert cli.main(["run", *common]) == 0
    plain = report_of(capsys.readouterr().out)
    assert cli.main(["run", "--stop-early", *common]) == 0
    out = capsys.readouterr().out
    rounds = report_of(out)
    assert rounds["early_stop"]["stopped"] is False
    assert rounds["early_stop"]["rows_used"] == rounds["early_stop"]["rows_total"] == 170
    assert out.strip().splitlines()[-1].startswith("--stop-early: no failure was certain")
    keep = ("row_id", "quantity", "status", "measured", "band", "n")
    assert [{k: v[k] for k in keep} for v in rounds["verdicts"]] == [{k: v[k] for k in keep} for v in plain["verdicts"]]


@pytest.mark.parametrize("extra", [["--limit", "3"], ["--fraction", "0.5"], ["--write-reference", "new.toml"]])
def test_stop_early_refuses_what_it_cannot_judge(tmp_path, capsys, extra, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--stop-early", *extra, "--store", str(tmp_path / "s"), "--reports",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lavender-checks run: error: ") and "--stop-early" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ the pytest gate


@pytest.fixture
def gate(pytester, tmp_path, monkeypatch):
    pytester.makepyfile(test_gate=GATE_TESTS.read_text(encoding="utf-8"),
                        test_snapshots=SNAPSHOT_TESTS.read_text(encoding="utf-8"))
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)

    def run(*options: str):
        return pytester.runpytest_subprocess("-p", "lavender_checks.run.pytest_plugin", "-p", "no:cacheprovider",
                                             "--reports", str(tmp_path / "reports"), "--store",
                                             str(tmp_path / "store"), *options)

    return run


@pytest.mark.slow
def test_the_pytest_gate_fails_the_certain_case_and_skips_the_others(gate, tmp_path):
    """Under -n 2 every worker generates its share of each round and all stop in the same
    round; a single process (reading the same store) stops at the same row."""
    reports = []
    for workers in (["-n", "2"], []):
        result = gate("--stop-early", "--reference", str(broken_reference(tmp_path)), *workers)
        outcomes = result.parseoutcomes()
        assert result.ret == 1
        assert outcomes["failed"] >= 1 and outcomes["failed"] + outcomes["skipped"] == 81 + 4  # 4 snapshot cases
        result.stdout.fnmatch_lines(["*STOPPED EARLY after round *"])
        result.stdout.fnmatch_lines(["FAILED *test_lavender?ChartQA_TEST-Overall?*"])
        reports.append(report_of("\n".join(result.outlines))["early_stop"])
    assert reports[0]["stopped"] and reports[0]["rows_used"] < 170
    assert reports[0]["rows_used"] == reports[1]["rows_used"]
    assert reports[0]["failures"] == reports[1]["failures"]
    # Cases selected that the stop left unjudged: the session fails all the same.
    some = gate("--stop-early", "--reference", str(broken_reference(tmp_path)), "-k", "test_base")
    assert "failed" not in some.parseoutcomes() and some.ret == 1


# ------------------------------------------------------------------ full-size VLMEvalKit folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from lavender_checks.run.config import SEED_REFERENCE
    from lavender_checks.synthetic.fullsize_data import write_vlmeval_folder

    root = tmp_path_factory.mktemp("folders")
    for scenario in ("noop", "chartqa-halved", "reproduce"):
        write_vlmeval_folder(root / scenario, scenario, SEED_REFERENCE, seed=0, lmu_data=False)
    return {scenario: root / scenario for scenario in ("noop", "chartqa-halved", "reproduce")}


def _gate_folder(folder: Path, **options):
    from lavender_checks.run.collect import collect_results
    from lavender_checks.run.config import RunConfig
    from lavender_checks.run.judge import judge_run

    run = collect_results(RunConfig(from_vlmeval=folder, **options))
    return run, judge_run(run)


@pytest.mark.slow
def test_an_adapter_that_changes_nothing_fails_within_five_percent_of_the_rows(folders):
    run, outcome = _gate_folder(folders["noop"], stop_early=True)
    early = run.early_stop
    assert early.stopped and early.rows_used <= 0.05 * early.rows_total == 0.05 * 14552
    assert not outcome.passed and all(v.status == "fail" for v in outcome.verdicts if v.early.get("judged"))


@pytest.mark.slow
def test_a_halved_chartqa_gain_fails_within_a_quarter_of_chartqa(folders):
    run, _ = _gate_folder(folders["chartqa-halved"], stop_early=True)
    early = run.early_stop
    assert early.stopped and early.deciding.row_id.startswith("ChartQA_TEST")
    assert early.benchmarks["ChartQA_TEST"]["rows_used"] <= 0.25 * 2500


@pytest.mark.slow
def test_a_run_that_reproduces_the_report_uses_every_row_and_judges_as_without_stop_early(folders):
    run, outcome = _gate_folder(folders["reproduce"], stop_early=True)
    assert not run.early_stop.stopped and run.early_stop.rows_used == run.early_stop.rows_total == 14552
    _, plain = _gate_folder(folders["reproduce"])
    assert [(v.row_id, v.quantity, v.status, v.measured, v.band) for v in outcome.verdicts] == [
        (v.row_id, v.quantity, v.status, v.measured, v.band) for v in plain.verdicts]
    assert outcome.passed

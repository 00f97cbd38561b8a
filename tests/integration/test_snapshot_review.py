"""The benchmark snapshots as a reviewer meets them: tests/benchmarks/test_snapshots.py and its
accepted files, run through pytester with one thing changed at a time.

The tiny pair's run is computed once here (MME, the mini data) and handed to each inner
session through an overriding ``run_results`` fixture, so the inner sessions run in-process
without torch; everything else (the plugin's gate, report folder and snapshot-diff files,
syrupy, the test module, the accepted files) is the real thing.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest

from lavender_checks import REPO_ROOT
from lavender_checks.gate import snapshots
from lavender_checks.run.collect import RunResults, collect_results
from lavender_checks.run.config import RunConfig

SNAPSHOTS = REPO_ROOT / "tests" / "benchmarks" / "__snapshots__" / "test_snapshots"
MME_CASE = "test_scores[seed-report-tiny-mini-MME]"

CONFTEST = """
import pickle
import pytest

pytest_plugins = ["lavender_checks.run.pytest_plugin"]


@pytest.fixture(scope="session")
def run_results():
    with open({path!r}, "rb") as f:
        return pickle.load(f)
"""


@pytest.fixture(scope="module")
def tiny_run() -> RunResults:
    """The built-in tiny pair on the mini MME, as the gate computes it (through the default
    prediction store, which the gate's own run of tests/benchmarks fills too)."""
    return collect_results(RunConfig(benchmarks=("MME",)), progress=False,
                                    writer="snapshot-review")


@pytest.fixture
def suite(pytester, tiny_run, tmp_path, monkeypatch):
    """A copy of the snapshot gate; ``run(results, *args)`` runs it on ``results`` (default: the
    tiny run) and returns (pytester result, the run's report folder)."""
    # When this suite runs under xdist, the inner session must not take itself for a worker
    # (the plugin and syrupy read these).
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest("")  # replaced by run()
    shutil.copy(REPO_ROOT / "tests" / "benchmarks" / "test_snapshots.py", pytester.path / "test_snapshots.py")
    shutil.copytree(SNAPSHOTS, pytester.path / "__snapshots__" / "test_snapshots")

    class Suite:
        path = pytester.path
        folder = pytester.path / "__snapshots__" / "test_snapshots"

        def file(self, case: str = MME_CASE) -> Path:
            return self.folder / f"{case}.json"

        def edit(self, change, case: str = MME_CASE) -> None:
            data = snapshots.parse(self.file(case).read_text(encoding="utf-8"))
            change(data)
            self.file(case).write_text(snapshots.dumps(data), encoding="utf-8")

        def run(self, *args: str, results: RunResults = tiny_run):
            saved = tmp_path / "run.pkl"
            saved.write_bytes(pickle.dumps(results))
            pytester.makeconftest(CONFTEST.format(path=str(saved)))
            reports = pytester.path / "reports"
            result = pytester.runpytest(str(pytester.path), "-p", "no:cacheprovider", "--reports", str(reports),
                                        "--benchmark", "MME", *args)
            runs = sorted(p for p in reports.iterdir() if p.is_dir() and p.name[0].isdigit()) if reports.is_dir() else []
            return result, (runs[-1] if runs else None)

    return Suite()


def _output(result) -> str:
    return result.stdout.str()


def _account(report: Path, benchmark: str = "MME") -> dict:
    data = json.loads((report / "snapshot-diff.json").read_text(encoding="utf-8"))
    return next(a for a in data["benchmarks"] if a["benchmark"] == benchmark)


def test_an_unchanged_run_gives_no_account(suite):
    result, report = suite.run()
    result.assert_outcomes(passed=1)
    out = _output(result)
    assert "Metrics (" not in out and "Rows (" not in out
    assert _account(report)["status"] == "unchanged"
    assert "Unchanged: MME" in (report / "snapshot-diff.md").read_text(encoding="utf-8")


def test_an_edited_metric_is_shown_with_its_band_without_verbose(suite):
    def accept_other_ocr(data):
        data["metrics"]["OCR"].update(lavender=150.0, delta=-50.0)

    suite.edit(accept_other_ocr)
    result, report = suite.run()
    result.assert_outcomes(failed=1)
    out = _output(result)
    line = next(line for line in out.splitlines() if line.startswith("| OCR"))
    assert "| 200.00 " in line and "150.00 → 125.00" in line and "-50.00 → -75.00" in line
    # Now 125 is inside every band of the tiny reference's OCR row.
    assert "base in [" in line and "lavender in [" in line and "gain in [" in line
    assert "RunResults(" not in out and "truncated" not in out and "Rows (" not in out
    account = _account(report)
    assert account["status"] == "changed"
    assert [(m["key"], m["accepted"]["lavender"], m["now"]["lavender"]) for m in account["metrics"]] == [("OCR", 150.0, 125.0)]
    assert {g["quantity"]: g["status"] for g in account["metrics"][0]["gate"]} == {"base": "pass", "lavender": "pass", "gain": "pass"}
    assert line in (report / "snapshot-diff.md").read_text(encoding="utf-8")


def test_an_edited_canary_is_shown_as_a_text_change(suite):
    original = snapshots.parse(suite.file().read_text(encoding="utf-8"))
    canary = original["canaries"][0]

    def edit_canary(data):
        data["canaries"][0]["lavender"] = "Maybe"

    suite.edit(edit_canary)
    result, report = suite.run()
    result.assert_outcomes(failed=1)
    out = _output(result)
    assert "1 canary text(s) changed" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {canary['index']} ") and "Maybe" in line)
    assert '"Maybe"' in row and json.dumps(canary["lavender"]) in row and "lavender" in row
    assert _account(report)["canaries"]["changed"] == [
        {"index": canary["index"], "variant": "lavender", "accepted": "Maybe", "now": canary["lavender"]}]


def test_edited_row_digests_and_scores_are_grouped_by_direction(suite):
    original = snapshots.parse(suite.file().read_text(encoding="utf-8"))
    rows = original["row_scores"]
    canary_indices = {c["index"] for c in original["canaries"]}
    plain = next(r for r in rows if r[0] not in canary_indices)  # only its digest is kept
    right = next(r for r in rows if r[1] == 1 and r[0] != plain[0])  # base got it right

    def edit_rows(data):
        for row in data["row_scores"]:
            if row[0] == plain[0]:
                row[4] = "00000000"  # the accepted Lavender answer was another one
            if row[0] == right[0]:
                row[1] = 0  # accepted: base wrong; now right

    suite.edit(edit_rows)
    result, report = suite.run()
    result.assert_outcomes(failed=1)
    out = _output(result)
    assert "Rows (one per variant): 1 wrong → right, 1 answer changed, score same" in out
    changed = next(line for line in out.splitlines() if line.startswith(f"| {plain[0]} ") and "#00000000" in line)
    assert "| lavender " in changed and f"| {plain[2]:g} " in changed
    flipped = next(line for line in out.splitlines() if line.startswith(f"| {right[0]} ") and "0 → 1" in line)
    assert "| base " in flipped
    groups = _account(report)["rows"]["groups"]
    assert [(e["index"], e["variant"]) for e in groups["answer_changed"]] == [(plain[0], "lavender")]
    assert [(e["index"], e["variant"], e["accepted_score"], e["new_score"]) for e in groups["wrong_to_right"]] == [
        (right[0], "base", 0, 1)]
    assert groups["answer_changed"][0]["new_answer"] is not None and groups["answer_changed"][0]["question"]


def test_a_removed_benchmark_fails_with_what_was_accepted(suite, tiny_run):
    reason = "/data/LMUData/MME.tsv does not exist"
    without_mme = dataclasses.replace(tiny_run, results={"MME": {"base": None, "lavender": None}},
                                      missing={"MME": reason}, predictions={})
    result, report = suite.run(results=without_mme)
    result.assert_outcomes(failed=1)
    out = _output(result)
    assert "MME: removed from the run" in out and reason in out
    assert "| total " in out and "1025.00 → —" in out  # what was accepted, metric by metric
    assert _account(report)["status"] == "removed"


def test_snapshot_update_accepts_and_records_what_it_accepted(suite, tiny_run):
    recorded = suite.file().read_text(encoding="utf-8")
    suite.edit(lambda data: data["metrics"]["OCR"].update(lavender=150.0, delta=-50.0))
    result, report = suite.run("--snapshot-update")
    result.assert_outcomes(passed=1)
    assert "1 snapshot updated" in _output(result)
    # The file recorded before versions were kept, now with the versions it was taken with.
    written = snapshots.parse(suite.file().read_text(encoding="utf-8"))
    assert snapshots.same_content(written, snapshots.parse(recorded))
    assert written["versions"] == {p: tiny_run.metadata["versions"][p] for p in snapshots.VERSION_PACKAGES}
    account = _account(report)
    assert account["status"] == "updated" and [m["key"] for m in account["metrics"]] == ["OCR"]


GPU_BOX = {"torch": "2.11.0+cu128", "transformers": "5.17.0", "peft": "0.21.0"}


def _versions_line(tiny_run) -> str:
    now = tiny_run.metadata["versions"]
    return ("recorded with torch 2.11.0+cu128, transformers 5.17.0, peft 0.21.0; this run: "
            f"torch {now['torch']}, transformers {now['transformers']}, peft {now['peft']}")


def test_a_snapshot_of_other_versions_says_so_before_the_verdicts(suite, tiny_run, tmp_path, monkeypatch):
    def recorded_elsewhere(data):
        data["versions"] = GPU_BOX
        data["metrics"]["OCR"].update(lavender=150.0, delta=-50.0)

    suite.edit(recorded_elsewhere)
    page = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(page))
    result, report = suite.run()
    result.assert_outcomes(failed=1)
    lines = _output(result).splitlines()
    # The case's account opens with the versions, before any metric.
    note = next(i for i, line in enumerate(lines) if line.startswith(f"- {_versions_line(tiny_run)}: greedy tokens"))
    assert note < next(i for i, line in enumerate(lines) if line.startswith("| OCR"))
    # The session's summary says so before its verdict table.
    gate = next(i for i, line in enumerate(lines) if "lavender-checks gate" in line)
    assert lines[gate + 1].startswith("SNAPSHOT VERSIONS: ") and "the snapshots of MME differ" in lines[gate + 1]
    assert lines[gate + 2] == f"  MME: {_versions_line(tiny_run)}"
    assert lines[gate + 3].startswith("row ")
    # GitHub's job page: the notice, the verdicts, then the snapshot diff.
    text = page.read_text(encoding="utf-8")
    diff = (report / "snapshot-diff.md").read_text(encoding="utf-8")
    assert text.startswith("## lavender-checks gate (pytest): verdicts passed\n")  # the snapshot did not
    assert text.index("> **SNAPSHOT VERSIONS: ") < text.index("| case | measured |") < text.index(diff.strip())
    assert f"- report: `{report}`" in text


def test_the_same_results_on_other_versions_pass_and_keep_the_file(suite, tiny_run):
    suite.edit(lambda data: data.update(versions=GPU_BOX))
    recorded = suite.file().read_text(encoding="utf-8")
    result, report = suite.run("--snapshot-update")
    result.assert_outcomes(passed=1)
    assert suite.file().read_text(encoding="utf-8") == recorded  # still the versions it was taken with
    out = _output(result)
    assert "match all the same" in out and f"  MME: {_versions_line(tiny_run)}" in out
    assert _account(report)["status"] == "unchanged"


def test_an_older_file_without_versions_still_matches_and_stays_as_it_is(suite):
    recorded = suite.file().read_text(encoding="utf-8")
    assert "versions" not in snapshots.parse(recorded)
    result, _ = suite.run("--snapshot-update")
    result.assert_outcomes(passed=1)
    assert suite.file().read_text(encoding="utf-8") == recorded and "SNAPSHOT VERSIONS" not in _output(result)
DAMAGED = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "unknown key": lambda text: text.replace('{\n', '{\n  "comment": "edited by hand",\n', 1),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_snapshot_file_is_named_with_how_to_rewrite_it(suite, damage):
    recorded = suite.file().read_text(encoding="utf-8")
    suite.file().write_text(DAMAGED[damage](recorded), encoding="utf-8")
    result, report = suite.run()
    result.assert_outcomes(failed=1)
    out = _output(result)
    assert "RunResults(" not in out and "GateOutcome(" not in out and "Traceback" not in out
    assert f"{MME_CASE}.json" in out and "--snapshot-update" in out
    account = _account(report)
    assert account["status"] == "unreadable" and account["snapshot"].endswith(f"{MME_CASE}.json")

    result, report = suite.run("--snapshot-update")
    result.assert_outcomes(passed=1)
    rewritten = json.loads(suite.file().read_text(encoding="utf-8"))
    assert rewritten.pop("versions")  # a rewritten file records the versions it was taken with
    assert rewritten == json.loads(recorded)
    assert _account(report)["status"] == "updated"


def test_a_damaged_snapshot_of_a_removed_benchmark_is_named_too(suite, tiny_run):
    suite.file().write_text("", encoding="utf-8")
    without_mme = dataclasses.replace(tiny_run, results={"MME": {"base": None, "lavender": None}},
                                      missing={"MME": "not in this run"}, predictions={})
    result, report = suite.run(results=without_mme)
    result.assert_outcomes(failed=1)
    out = _output(result)
    assert "Traceback" not in out and "RunResults(" not in out
    assert f"{MME_CASE}.json: the file is empty" in out and "--snapshot-update" in out
    assert _account(report)["status"] == "unreadable" and _account(report)["case"] == MME_CASE

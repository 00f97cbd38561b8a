"""`lavender-checks run` under GitHub Actions: with $GITHUB_STEP_SUMMARY set, the run appends
its verdicts as Markdown to that file (the job's summary page); without it, nothing is
written. (The pytest gate's page: test_gate_plugin.py and test_snapshot_review.py.)"""

from __future__ import annotations

import re

from lavender_checks import cli
from lavender_checks.gate import step_summary
from lavender_checks.run.config import TINY_REFERENCE


def _failing_chartqa_reference(tmp_path):
    """The tiny reference's ChartQA rows, the first row's base and Lavender moved by +40."""
    head, *rows = TINY_REFERENCE.read_text(encoding="utf-8").split("[[row]]")
    rows = [r for r in rows if 'benchmark = "ChartQA_TEST"' in r]
    base = float(re.search(r"^base = ([\d.]+)$", rows[0], re.M).group(1))
    lavender = float(re.search(r"^lavender = ([\d.]+)$", rows[0], re.M).group(1))
    rows[0] = rows[0].replace(f"base = {base:.2f}\n", f"base = {base + 40:.2f}\n") \
                     .replace(f"lavender = {lavender:.2f}\n", f"lavender = {lavender + 40:.2f}\n")
    path = tmp_path / "chartqa.toml"
    path.write_text(head + "".join(f"[[row]]{r}" for r in rows), encoding="utf-8")
    return path, base + 40


def test_a_run_appends_its_verdicts_to_the_step_summary(tmp_path, monkeypatch, capsys):
    reference, reported = _failing_chartqa_reference(tmp_path)
    page = tmp_path / "summary.md"
    page.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv(step_summary.ENV, str(page))
    status = cli.main(["run", "--quiet", "--benchmark", "ChartQA_TEST", "--reference", str(reference),
                       "--store", str(tmp_path / "store"), "--reports", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert status == 1
    text = page.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n## lavender-checks run: FAILED\n\nDid not pass:\n\n```text\n"
                           "FAIL ChartQA_TEST-Overall base [ChartQA_TEST Overall]: measured ")
    assert "\n```\n\n| case | measured | reported | band | n | status |\n" in text
    rows = [line for line in text.splitlines() if line.startswith("| ChartQA_TEST-Overall ")]
    assert [r.split(" | ")[0] for r in rows] == [f"| ChartQA_TEST-Overall {q}" for q in ("base", "lavender", "gain")]
    assert f"| {reported:.2f} |" in rows[0] and "| 24 questions | **FAIL** |" in rows[0]
    assert rows[2].endswith("| pass |")
    assert "7 pass, 2 fail, 0 missing (reproduce)" in text
    report = next(line for line in out.splitlines() if line.startswith("report: ")).removeprefix("report: ")
    assert f"- report: `{report}`" in text


def test_without_the_variable_nothing_is_written(tmp_path):
    assert step_summary.append("text", environ={}) is None
    assert step_summary.append("text", environ={step_summary.ENV: ""}) is None
    target = tmp_path / "page.md"
    assert step_summary.append("a", environ={step_summary.ENV: str(target)}) == target
    assert step_summary.append("b\n", environ={step_summary.ENV: str(target)}) == target
    assert target.read_text(encoding="utf-8") == "a\nb\n"

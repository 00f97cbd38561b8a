"""Data that is not what the reference was measured on (issue 12, item 3): the run says so
last on the console and first in report.md, fails unless --allow-noncomparable, and
--strict-data refuses it before any work; the same under pytest."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from lavender_checks import FIXTURES, REPO_ROOT, cli

MINI = FIXTURES / "lmudata-mini"


@pytest.fixture(scope="module")
def edited_lmudata(tmp_path_factory):
    """The mini benchmarks with one ChartQA question edited: its md5 is no longer the one
    tiny-mini.toml was recorded from."""
    root = tmp_path_factory.mktemp("lmudata")
    for path in MINI.iterdir():
        if path.is_file():
            shutil.copy(path, root / path.name)
    frame = pd.read_csv(root / "ChartQA_TEST.tsv", sep="\t", keep_default_na=False)
    frame.loc[5, "question"] = frame.loc[5, "question"] + " "
    frame.to_csv(root / "ChartQA_TEST.tsv", sep="\t", index=False)
    return root


@pytest.fixture(scope="module")
def chartqa_reference(tmp_path_factory):
    """tiny-mini.toml's ChartQA rows alone (its data md5s kept): a ChartQA-only run has no
    missing rows."""
    head, *rows = (FIXTURES / "reported" / "tiny-mini.toml").read_text().split("[[row]]")
    path = tmp_path_factory.mktemp("reference") / "tiny-mini.toml"
    path.write_text(head + "".join(f"[[row]]{r}" for r in rows if 'benchmark = "ChartQA_TEST"' in r))
    return path


@pytest.fixture
def _run(tmp_path, chartqa_reference):
    def run(lmudata, *extra):
        return cli.main(["run", "--quiet", "--lmu-data", str(lmudata), "--benchmark", "ChartQA_TEST",
                         "--reference", str(chartqa_reference), "--store", str(tmp_path / "store"),
                         "--reports", str(tmp_path / "reports"), *extra])
    return run


def test_the_run_fails_and_says_so_last_and_first(tmp_path, edited_lmudata, capsys, _run):
    with pytest.warns(UserWarning, match="LMUDATA MISMATCH"):
        code = _run(edited_lmudata)
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[-2].startswith("NOT COMPARABLE with the reference: its verdicts do not test")
    assert out[-1].startswith(f"  ChartQA_TEST: {edited_lmudata / 'ChartQA_TEST.tsv'} is not the "
                              "ChartQA_TEST TSV tiny-mini.toml was recorded from: md5 ")
    assert "9 pass, 0 fail, 0 missing" in "\n".join(out)  # the verdicts alone would have passed
    report = next(p for p in (tmp_path / "reports").iterdir() if p.name[0].isdigit())
    md = (report / "report.md").read_text(encoding="utf-8").splitlines()
    assert md[2].startswith("> **NOT COMPARABLE")
    # report.json's passed is the exit status's meaning; the verdicts alone are kept apart.
    summary = json.loads((report / "report.json").read_text(encoding="utf-8"))["summary"]
    assert (summary["passed"], summary["verdicts_passed"], summary["comparable"]) == (False, True, False)


def test_allow_noncomparable_gates_it_anyway(tmp_path, edited_lmudata, capsys, _run):
    with pytest.warns(UserWarning, match="LMUDATA MISMATCH"):
        assert _run(edited_lmudata, "--allow-noncomparable") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("NOT COMPARABLE with the reference: --allow-noncomparable was given")
    report = next(p for p in (tmp_path / "reports").iterdir() if p.name[0].isdigit())
    summary = json.loads((report / "report.json").read_text(encoding="utf-8"))["summary"]
    assert (summary["passed"], summary["verdicts_passed"], summary["comparable"]) == (True, True, False)


def test_strict_data_refuses_it_before_any_work(tmp_path, edited_lmudata, capsys, _run):
    with pytest.warns(UserWarning, match="--strict-data"):
        assert _run(edited_lmudata, "--strict-data") == 2
    err = capsys.readouterr().err
    assert "--strict-data:" in err and "ChartQA_TEST.tsv is not the ChartQA_TEST TSV" in err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.jsonl"))


def test_the_mini_data_is_comparable_with_its_own_reference(capsys, _run):
    assert _run(MINI, "--strict-data") == 0
    assert "NOT COMPARABLE" not in capsys.readouterr().out


@pytest.mark.parametrize("allow", [False, True])
def test_pytest_cases_do_not_pass_silently(tmp_path, edited_lmudata, allow):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/benchmarks/test_gate.py", "-q", "-p", "no:cacheprovider",
         "--lmu-data", str(edited_lmudata), "--benchmark", "ChartQA_TEST", "--store", str(tmp_path / "store"),
         "--reports", str(tmp_path / "reports"), *(["--allow-noncomparable"] if allow else [])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout
    if allow:
        assert done.returncode == 0, out + done.stderr
        assert "9 passed" in out
    else:
        assert done.returncode == 1, out + done.stderr
        assert "9 failed" in out
        assert "NOT COMPARABLE with the reference: " in out
        # Each case still shows what was measured on that data, for the reader of a CI page.
        assert re.search(r"^    on that data: PASS ChartQA_TEST-\S+ base \[ChartQA_TEST \S+\]: measured [\d.]+, "
                         r"reported [\d.]+, band \[[\d.]+, [\d.]+\], n=\d+ questions$", out, re.M), out
    lines = out.splitlines()
    after_report = lines[next(i for i, line in enumerate(lines) if line.startswith("report: ")) + 1]
    assert after_report.startswith("NOT COMPARABLE with the reference: ")  # the gate summary's last lines


@pytest.mark.parametrize("allow", [False, True])
def test_a_run_the_reference_has_no_rows_for_at_all_is_refused_before_any_work(
        tmp_path, capsys, chartqa_reference, monkeypatch, allow):
    """Nothing of it would be gated: no verdict at all is no pass, even with
    --allow-noncomparable, and it is known before anything is generated."""
    import lavender_checks.model as model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "_load_base_model", refuse)
    code = cli.main(["run", "--quiet", "--benchmark", "MME", "--reference", str(chartqa_reference),
                     "--store", str(tmp_path / "store"), "--reports", str(tmp_path / "reports"),
                     *(["--allow-noncomparable"] if allow else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"lavender-checks run: error: --reference {chartqa_reference} has no rows for MME: "
                   "nothing of this run would be gated (its rows are of ChartQA_TEST)"]
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_an_outcome_without_verdicts_is_no_pass():
    from lavender_checks.run.judge import GateOutcome

    assert GateOutcome(reference=None, verdicts=[]).passed is False


def test_a_run_with_another_profile_than_the_references_fails_saying_so(capsys, _run):
    """tiny-mini.toml was recorded with the seed-report profile (name and fingerprint)."""
    assert _run(MINI, "--profile", "vlmevalkit") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("NOT COMPARABLE with the reference")
    assert out[-1].startswith("  ChartQA_TEST: the run used profile 'vlmevalkit'")
    assert "was recorded with profile 'seed-report'" in out[-1]


def test_a_benchmark_the_reference_has_no_rows_for_is_named_and_fails_the_run(tmp_path, capsys, _run):
    assert _run(MINI, "--benchmark", "MME") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("NOT COMPARABLE with the reference")
    assert out[-1].startswith("  MME: not gated: tiny-mini.toml has no rows for it")
    assert "9 pass, 0 fail, 0 missing" in "\n".join(out)  # the gated verdicts alone would have passed
    report = next(p for p in (tmp_path / "reports").iterdir() if p.name[0].isdigit())
    assert "MME: not gated" in (report / "report.md").read_text(encoding="utf-8").splitlines()[4]
    summary = json.loads((report / "report.json").read_text(encoding="utf-8"))["summary"]
    assert summary["passed"] is False and "MME" in summary["noncomparable"]

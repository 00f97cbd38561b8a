"""``--from-vlmeval``: gating the prediction files of a VLMEvalKit work dir (no model, no GPU).

The folders are built here, in both of VLMEvalKit's folder layouts, from full-size synthetic
runs (``synthetic.fullsize_data``: every benchmark at its real size and structure) whose
predictions are chosen so that their scores print the seed report's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lavender_checks import REPO_ROOT, cli
from lavender_checks.benchmarks.signature import SignatureMismatch
from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
from lavender_checks.gate.report import RUN_ID_PATTERN
from lavender_checks.gate.verdicts import load_reference
from lavender_checks.run.collect import RunResults, collect_results
from lavender_checks.run.config import (
    DEFAULT_BASE_NAME,
    DEFAULT_LAVENDER_NAME,
    SEED_REFERENCE,
    RunConfig,
    RunInputError,
)
from lavender_checks.run.judge import GateOutcome, judge_run
from lavender_checks.synthetic import fullsize_data
from lavender_checks.vlmeval_io import write_prediction_file

SEED = load_reference(SEED_REFERENCE)
BASE, LAVENDER = DEFAULT_BASE_NAME, DEFAULT_LAVENDER_NAME
BENCHMARKS = ("DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME")


def reported(row_id: str, quantity: str) -> float:
    return SEED.row(row_id).reported(quantity)


# ----------------------------------------------------------------- synthetic full-size predictions

MODEL_NAMES = {"base": BASE, "lavender": LAVENDER}


def write_run(work: Path, frames: dict[str, dict[str, pd.DataFrame]], *, layout: str = "new",
              suffix: str = ".tsv") -> Path:
    """A VLMEvalKit work dir holding ``frames[benchmark][variant]``.

    new: ``<work>/<model>/T<date>-<time>/<model>_<dataset>`` plus a symlink in ``<work>/<model>/``;
    legacy: ``<work>/<model>/T<date>_G<hash>/<model>_<dataset>``.
    """
    for benchmark, by_variant in frames.items():
        for variant, frame in by_variant.items():
            model = MODEL_NAMES[variant]
            run_dir = work / model / ("T20260820-101500" if layout == "new" else "T20250301_G1a2b3c4")
            target = write_prediction_file(frame, run_dir / f"{model}_{benchmark}{suffix}")
            if layout == "new":
                link = work / model / target.name
                if link.is_symlink() or link.exists():
                    link.unlink()
                os.symlink(target.relative_to(link.parent), link)
    return work


@pytest.fixture(scope="module")
def seed_frames() -> dict[str, dict[str, pd.DataFrame]]:
    """benchmark -> variant -> prediction frame, full size, printing the seed report's numbers."""
    frames = fullsize_data.benchmark_frames(seed=0)
    targets = fullsize_data.scenario_targets(SEED, "reproduce")
    return fullsize_data.prediction_frames(frames, fullsize_data.predictions_for_targets(frames, targets))


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, seed_frames) -> Path:
    """A full-size VLMEvalKit work dir (new layout) that reproduces the seed report."""
    return write_run(tmp_path_factory.mktemp("vlmeval") / "outputs", seed_frames)


def gate(work: Path, **options) -> tuple[RunResults, GateOutcome]:
    config = RunConfig(from_vlmeval=work, **options)
    run = collect_results(config)
    return run, judge_run(run)


# ----------------------------------------------------------------------------------- tests


def test_synthetic_run_prints_the_seed_numbers(seed_frames):
    """The synthetic files do land on the report's printed numbers (within its rounding)."""
    from lavender_checks.benchmarks import get_benchmark

    scored = {b: {v: get_benchmark(b).score(f) for v, f in by_variant.items()}
              for b, by_variant in seed_frames.items()}
    assert len(seed_frames["MMBench_DEV_EN"]["base"]) == 4329
    assert len(seed_frames["MME"]["base"]) == 2374
    for row in SEED.rows:
        for variant in ("base", "lavender"):
            value = sum(scored[row.benchmark][variant].metrics[k] for k in row.parts)
            assert abs(value - row.reported(variant)) <= 0.2, (row.id, variant, value)


def test_gate_passes_on_a_run_that_reproduces_the_seed_report(seed_run):
    run, outcome = gate(seed_run)
    assert run.missing == {}
    assert run.metadata["mode"] == "from-vlmeval"
    assert set(run.metadata["files"]) == set(BENCHMARKS)
    failing = [v.message() for v in outcome.verdicts if v.status != "pass"]
    assert failing == []
    assert len(outcome.verdicts) == 3 * len(SEED.rows)


def test_gate_fails_only_the_rows_whose_gain_was_removed(tmp_path, seed_frames):
    frames = {b: dict(v) for b, v in seed_frames.items()}
    # Lavender's ChartQA answers replaced by base's: its ChartQA gain is gone.
    frames["ChartQA_TEST"]["lavender"] = frames["ChartQA_TEST"]["base"]
    run, outcome = gate(write_run(tmp_path / "outputs", frames))
    failed = {(v.row_id, v.quantity) for v in outcome.verdicts if v.status == "fail"}
    chartqa_rows = [r.id for r in SEED.rows if r.benchmark == "ChartQA_TEST"]
    assert failed == {(row, q) for row in chartqa_rows for q in ("lavender", "gain")}
    assert all(v.status == "pass" for v in outcome.verdicts if (v.row_id, v.quantity) not in failed)
    message = outcome.verdict("ChartQA_TEST-Overall", "gain").message()
    assert message.startswith("FAIL ChartQA_TEST-Overall gain") and "reported +22.64" in message


@pytest.mark.parametrize("pick", [dict(fraction=0.5), dict(limit=1)], ids=str)
def test_a_subset_of_a_reproducing_run_passes(seed_run, pick):
    """Issue 12 item 1: the files are the whole benchmark (no LMUData here), so a subset's
    bands account for the rows it did not score."""
    _, outcome = gate(seed_run, **pick)
    failing = [v.message() for v in outcome.verdicts if v.status != "pass"]
    assert failing == []
    assert all(v.subset for v in outcome.verdicts)


def test_a_removed_gain_still_fails_on_half_the_files(tmp_path, seed_frames):
    frames = {"ChartQA_TEST": dict(seed_frames["ChartQA_TEST"])}
    frames["ChartQA_TEST"]["lavender"] = frames["ChartQA_TEST"]["base"]
    _, outcome = gate(write_run(tmp_path / "outputs", frames), benchmarks=("ChartQA_TEST",),
                        fraction=0.5)
    chartqa = [v for v in outcome.verdicts if v.benchmark == "ChartQA_TEST"]
    assert {(v.quantity, v.status) for v in chartqa} == {("base", "pass"), ("lavender", "fail"),
                                                        ("gain", "fail")}


def test_a_file_of_another_benchmark_is_refused(tmp_path, seed_frames):
    from lavender_checks.benchmarks.signature import SignatureMismatch

    work = write_run(tmp_path / "outputs", {"DocVQA_VAL": dict(seed_frames["ChartQA_TEST"])})
    with pytest.raises(SignatureMismatch, match="is not a DocVQA_VAL file: .*it looks like ChartQA_TEST"):
        gate(work, benchmarks=("DocVQA_VAL",))


@pytest.fixture(scope="module")
def chartqa_only(seed_frames) -> dict[str, dict[str, pd.DataFrame]]:
    return {"ChartQA_TEST": seed_frames["ChartQA_TEST"]}


@pytest.mark.parametrize("layout", ["new", "legacy"])
def test_both_folder_layouts_and_xlsx_are_read(tmp_path, chartqa_only, layout):
    work = write_run(tmp_path / "outputs", chartqa_only, layout=layout, suffix=".xlsx")
    run, outcome = gate(work, benchmarks=("ChartQA_TEST",))
    files = run.metadata["files"]["ChartQA_TEST"]
    assert Path(files["base"]).name == f"{BASE}_ChartQA_TEST.xlsx"
    assert ("T20250301_G1a2b3c4" in files["base"]) == (layout == "legacy")
    result = run.results["ChartQA_TEST"]
    assert round(result["base"].metrics["Overall"], 2) == reported("ChartQA_TEST-Overall", "base")
    assert round(result["lavender"].metrics["Overall"], 2) == reported("ChartQA_TEST-Overall", "lavender")
    chartqa = [v for v in outcome.verdicts if v.benchmark == "ChartQA_TEST"]
    assert chartqa and all(v.status == "pass" for v in chartqa)


def test_missing_files_are_named_with_where_it_looked(tmp_path, seed_frames):
    frames = {b: dict(v) for b, v in seed_frames.items() if b in ("ChartQA_TEST", "MME")}
    del frames["MME"]["lavender"]
    work = write_run(tmp_path / "outputs", frames)
    run, outcome = gate(work, benchmarks=("ChartQA_TEST", "MME", "DocVQA_VAL"))
    assert set(run.missing) == {"MME", "DocVQA_VAL"}
    assert f"{LAVENDER}_MME" in run.missing["MME"] and f"{BASE}_MME" not in run.missing["MME"]
    assert str(work / LAVENDER) in run.missing["MME"]  # where it looked
    assert f"{BASE}_DocVQA_VAL" in run.missing["DocVQA_VAL"]
    assert run.results["DocVQA_VAL"] == {"base": None, "lavender": None}
    assert run.results["ChartQA_TEST"]["lavender"] is not None
    # The base file of MME is there: it is scored and judged; only Lavender and the gain are
    # missing, each naming the Lavender file (never "no base result").
    assert run.results["MME"]["base"] is not None and run.results["MME"]["lavender"] is None
    mme = [v for v in outcome.verdicts if v.benchmark == "MME"]
    assert mme and all(v.status == "pass" for v in mme if v.quantity == "base")
    assert all(v.status == "missing" for v in mme if v.quantity != "base")
    for verdict in (v for v in mme if v.quantity != "base"):
        assert f"{LAVENDER}_MME" in verdict.reason and "no base result" not in verdict.reason
    assert not outcome.passed


def test_a_folder_without_any_prediction_file_is_refused(tmp_path):
    (tmp_path / "outputs" / BASE).mkdir(parents=True)
    with pytest.raises(RunInputError) as caught:
        gate(tmp_path / "outputs")
    text = str(caught.value)
    assert f"{BASE}_ChartQA_TEST" in text and str(tmp_path / "outputs" / BASE) in text
    with pytest.raises(RunInputError, match="no such folder"):
        gate(tmp_path / "elsewhere")


def test_base_and_lavender_on_different_rows_are_refused(tmp_path, chartqa_only):
    frames = {"ChartQA_TEST": {"base": chartqa_only["ChartQA_TEST"]["base"],
                               "lavender": chartqa_only["ChartQA_TEST"]["lavender"].iloc[:1000]}}
    work = write_run(tmp_path / "outputs", frames)
    with pytest.raises(RunInputError) as caught:
        gate(work, benchmarks=("ChartQA_TEST",))
    text = str(caught.value)
    assert "ChartQA_TEST: base and Lavender predictions cover different rows (2500 vs 1000)" in text
    assert "1500 row(s) only in" in text and f"{BASE}_ChartQA_TEST.tsv" in text
    assert "index 1000, 1001" in text


@pytest.mark.parametrize("stop_early", [False, True])
def test_a_file_that_repeats_an_index_is_named(tmp_path, chartqa_only, stop_early):
    """The scorer names the benchmark and the rows; the run reads two files of it, so the error
    says which one (before --stop-early's rounds score parts of it)."""
    lavender = chartqa_only["ChartQA_TEST"]["lavender"].copy()
    lavender.loc[7, "index"] = lavender.loc[6, "index"]
    frames = {"ChartQA_TEST": {"base": chartqa_only["ChartQA_TEST"]["base"], "lavender": lavender}}
    work = write_run(tmp_path / "outputs", frames)
    with pytest.raises(ScoringInputError) as caught:
        gate(work, benchmarks=("ChartQA_TEST",), stop_early=stop_early)
    assert str(caught.value).startswith(f"{work / LAVENDER / 'T20260820-101500' / LAVENDER}_ChartQA_TEST.tsv: "
                                        "ChartQA_TEST: column 'index' repeats 1 value(s)")


def test_limit_takes_the_same_rows_of_both_files(seed_run):
    run, _ = gate(seed_run, benchmarks=("MMBench_DEV_EN", "MME"), limit=40)
    for benchmark in ("MMBench_DEV_EN", "MME"):
        base, lavender = run.results[benchmark]["base"], run.results[benchmark]["lavender"]
        assert list(base.units["unit"]) == list(lavender.units["unit"])
    assert len(run.results["MME"]["base"].units) == 40  # image pairs
    assert len(run.results["MMBench_DEV_EN"]["base"].units) == 40  # circular groups


def test_run_command_exit_codes(seed_run, tmp_path, capsys, seed_frames):
    reports = tmp_path / "reports"
    code = cli.main(["run", "--from-vlmeval", str(seed_run), "--reports", str(reports), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 fail, 0 missing" in out
    report_dir = Path(out.strip().splitlines()[-1].removeprefix("report: "))
    assert (report_dir / "report.json").is_file() and report_dir.parent == reports

    frames = {b: dict(v) for b, v in seed_frames.items()}
    frames["ChartQA_TEST"]["lavender"] = frames["ChartQA_TEST"]["base"]
    broken = write_run(tmp_path / "broken", frames)
    assert cli.main(["run", "--from-vlmeval", str(broken), "--reports", str(reports), "--quiet"]) == 1
    assert "FAIL" in capsys.readouterr().out

    assert cli.main(["run", "--from-vlmeval", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["run", "--from-vlmeval", str(seed_run), "--base-model", str(tmp_path),
                     "--lora", str(tmp_path), "--quiet"]) == 2
    assert "--from-vlmeval" in capsys.readouterr().err


@pytest.mark.slow
def test_pytest_gate_over_a_folder_fails_what_is_missing(tmp_path, seed_frames):
    """``pytest tests/benchmarks --from-vlmeval DIR`` under xdist: rows whose files are absent
    fail (the folder is the evidence); one report; the controller prints the verdict table."""
    frames = {b: dict(v) for b, v in seed_frames.items()}
    del frames["MME"]["lavender"]
    work = write_run(tmp_path / "outputs", frames)
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/benchmarks", "-q", "-p", "no:cacheprovider", "-n", "2",
         "--from-vlmeval", str(work), "--reports", str(reports), "--store", str(tmp_path / "store")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout
    mme_rows = sum(r.benchmark == "MME" for r in SEED.rows)
    assert done.returncode == 1, out + done.stderr
    # MME's base file is there: its base cases pass; Lavender's and the gain's fail.
    assert f"{2 * mme_rows} failed, {3 * len(SEED.rows) - 2 * mme_rows} passed, 4 skipped" in out
    assert "FAILED tests/benchmarks/test_gate.py::test_gain[MME-total]" in out
    assert "lavender-checks gate" in out and f"missing MME: no prediction file {LAVENDER}_MME" in out
    runs = [p.name for p in reports.iterdir() if RUN_ID_PATTERN.match(p.name)]
    assert len(runs) == 1 and (reports / runs[0] / "report.json").is_file()  # written once


def test_a_file_whose_questions_are_not_the_tsvs_is_refused(tmp_path):
    """With the benchmark's TSV in LMUData, every file's questions are checked against it, as
    ``score --meta`` does: a file of an edited TSV is refused, naming the row."""
    from lavender_checks.benchmarks.signature import SignatureMismatch
    from lavender_checks.data import load_benchmark_frame
    from lavender_checks.run.config import MINI_LMUDATA

    meta = load_benchmark_frame("DocVQA_VAL", MINI_LMUDATA).drop(columns=["image"], errors="ignore")
    frame = meta.assign(prediction=meta["answer"])
    edited = frame.copy()
    edited.loc[1, "question"] = "an edited question?"
    work = write_run(tmp_path / "ok", {"DocVQA_VAL": {"base": frame, "lavender": frame}})
    run, _ = gate(work, benchmarks=("DocVQA_VAL",), lmu_data=MINI_LMUDATA)
    assert run.results["DocVQA_VAL"]["base"] is not None
    work = write_run(tmp_path / "edited", {"DocVQA_VAL": {"base": frame, "lavender": edited}})
    with pytest.raises(SignatureMismatch, match=r"1 row\(s\) whose question is not the one of .*DocVQA_VAL.tsv "
                                                r"at the same index, e.g. index .*'an edited question\?' in the file"):
        gate(work, benchmarks=("DocVQA_VAL",), lmu_data=MINI_LMUDATA)


def test_files_of_another_size_without_lmu_data_are_not_comparable(tmp_path, seed_frames, capsys):
    """Without the TSVs, the files' row count is checked against VLMEvalKit's (benchmarks.toml),
    and what could not be checked is said; 24-row files are no test of the full-size report."""
    small = {"ChartQA_TEST": {v: f.iloc[:24] for v, f in seed_frames["ChartQA_TEST"].items()}}
    work = write_run(tmp_path / "outputs", small)
    run, outcome = gate(work, benchmarks=("ChartQA_TEST",))
    why = outcome.noncomparable["ChartQA_TEST"]
    assert "has 24 rows, VLMEvalKit's ChartQA_TEST has 2500" in why
    assert "not checked against VLMEvalKit's ChartQA_TEST TSV" in run.metadata["data"]["ChartQA_TEST"]["unchecked"]
    reports = tmp_path / "reports"
    code = cli.main(["run", "--from-vlmeval", str(work), "--benchmark", "ChartQA_TEST",
                     "--reports", str(reports), "--quiet"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[-2].startswith("NOT COMPARABLE with the reference") and "has 24 rows" in out[-1]
    assert any(line.startswith("NOT CHECKED against the benchmark's data") for line in out)
    report = next(p for p in reports.iterdir() if RUN_ID_PATTERN.match(p.name))
    md = (report / "report.md").read_text().splitlines()
    assert md[2].startswith("> **NOT COMPARABLE") and any("**NOT CHECKED" in line for line in md[:12])
    summary = json.loads((report / "report.json").read_text())["summary"]
    assert summary["comparable"] is False and "ChartQA_TEST" in summary["unchecked"]


def test_full_size_files_without_lmu_data_are_gated_saying_what_was_not_checked(seed_run):
    run, outcome = gate(seed_run, benchmarks=("MME",))
    assert outcome.noncomparable == {}
    assert "checked: row count (2374, VLMEvalKit's 2374)" in run.metadata["data"]["MME"]["unchecked"]


def test_base_and_lavender_files_asking_different_questions_are_refused(tmp_path, chartqa_only):
    lavender = chartqa_only["ChartQA_TEST"]["lavender"].copy()
    lavender.loc[7, "question"] = "an edited question?"
    work = write_run(tmp_path / "outputs", {"ChartQA_TEST": {"base": chartqa_only["ChartQA_TEST"]["base"],
                                                             "lavender": lavender}})
    with pytest.raises(SignatureMismatch, match=r"1 row\(s\) whose question is not the one of .*llama_vision_base"
                                                r"_ChartQA_TEST.* at the same index, e.g. index 7"):
        gate(work, benchmarks=("ChartQA_TEST",))


def test_mmbench_files_without_their_circular_copies_are_not_comparable(tmp_path, seed_frames, capsys):
    """Scored on the main questions alone, a guess counts once: not MMBench's circular accuracy."""
    mains = {v: f[f["index"] < 1_000_000] for v, f in seed_frames["MMBench_DEV_EN"].items()}
    work = write_run(tmp_path / "outputs", {"MMBench_DEV_EN": mains})
    run, outcome = gate(work, benchmarks=("MMBench_DEV_EN",))
    why = outcome.noncomparable["MMBench_DEV_EN"]
    assert "1164 of 1164 questions have no circular copies" in why
    assert "CircularEval could not be applied" in why
    assert "has 1164 rows, VLMEvalKit's MMBench_DEV_EN has 4329" in why
    assert cli.main(["run", "--from-vlmeval", str(work), "--benchmark", "MMBench_DEV_EN",
                     "--reports", str(tmp_path / "reports"), "--quiet"]) == 1
    assert "CircularEval could not be applied" in capsys.readouterr().out.splitlines()[-1]

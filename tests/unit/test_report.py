"""reports/<run-id>/: the files, their content, and reports/latest."""

import dataclasses
import json
import os
import re
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks.base import Ratio, ScoreResult
from lavender_checks.gate import report as report_module
from lavender_checks.gate.report import RUN_ID_PATTERN, latest_run, new_run_id, write_report
from lavender_checks.gate.verdicts import benchmark_spec, judge, load_reference

N_RESAMPLES = 300  # enough for the layout; the gate's own tests use the full setting


def chartqa_result(correct: np.ndarray, variant: str) -> ScoreResult:
    """ChartQA questions 0..n-1, half per split; predictions say whether the answer was hit."""
    n = len(correct)
    split = np.where(np.arange(n) < n // 2, "test_human", "test_augmented").astype(object)
    units = pd.DataFrame({"unit": np.arange(n), "stratum": split, "correct": correct})
    forms = {s: [Ratio(correct * (split == s), (split == s).astype(float))] for s in ("test_human", "test_augmented")}
    forms["Overall"] = [Ratio(correct, np.ones(n))]
    metrics = {s: float(np.mean(correct[split == s]) * 100) for s in ("test_human", "test_augmented")}
    metrics["Overall"] = float(np.mean(correct) * 100)
    samples = pd.DataFrame({
        "index": np.arange(n), "unit": np.arange(n), "score": correct, "split": split,
        "question": [f"What is bar {i}?" for i in range(n)], "answer": [str(i) for i in range(n)],
        "prediction": [str(i) if c else f"{variant} guess" for i, c in enumerate(correct)],
    })
    return ScoreResult("ChartQA_TEST", metrics, samples, units, forms)


def mme_result(scores: dict[str, np.ndarray]) -> ScoreResult:
    """All 14 MME subtasks; scores[c] is (images × 2) question scores; units are images."""
    keys = benchmark_spec("MME").metric_keys
    subtasks = [k for k in keys if k not in ("perception", "reasoning")]
    cats = np.concatenate([[c] * len(scores[c]) for c in subtasks])
    both = np.concatenate([scores[c] for c in subtasks])
    unit_ids = [f"{c}/img{i}.jpg" for c in subtasks for i in range(len(scores[c]))]
    units = pd.DataFrame({"unit": unit_ids, "stratum": cats, "correct": both.mean(axis=1)})
    forms, metrics = {}, {}
    for c in subtasks:
        inside = (cats == c).astype(float)
        forms[c] = [Ratio(both.sum(axis=1) * inside, 2 * inside), Ratio(both[:, 0] * both[:, 1] * inside, inside)]
        metrics[c] = float(np.mean(scores[c].ravel()) * 100 + np.mean(scores[c][:, 0] * scores[c][:, 1]) * 100)
    forms["perception"] = [t for c in subtasks[:10] for t in forms[c]]
    forms["reasoning"] = [t for c in subtasks[10:] for t in forms[c]]
    metrics = {"perception": sum(metrics[c] for c in subtasks[:10]),
               "reasoning": sum(metrics[c] for c in subtasks[10:]), **metrics}
    rows = [(u, q, s) for u, pair in zip(unit_ids, both) for q, s in enumerate(pair)]
    samples = pd.DataFrame({
        "index": range(len(rows)), "unit": [r[0] for r in rows], "score": [r[2] for r in rows],
        "question": [f"{r[0]} question {r[1]}" for r in rows], "answer": ["Yes"] * len(rows),
        "prediction": ["Yes" if r[2] else "No" for r in rows],
        "extracted": ["Yes" if r[2] else "No" for r in rows],
    })
    return ScoreResult("MME", metrics, samples, units, forms)


@pytest.fixture(scope="module")
def run_inputs():
    rng = np.random.default_rng(7)
    base_c = (rng.random(400) < 0.1).astype(float)
    lav_c = np.where(rng.random(400) < 0.25, 1.0, base_c)
    lav_c[np.flatnonzero(base_c)[:3]] = 0.0  # a few losses too
    subtasks = [k for k in benchmark_spec("MME").metric_keys if k not in ("perception", "reasoning")]
    base_s = {c: (rng.random((12, 2)) < 0.6).astype(float) for c in subtasks}
    lav_s = {c: np.where(rng.random((12, 2)) < 0.2, 1.0 - s, s) for c, s in base_s.items()}
    results = {
        "ChartQA_TEST": {"base": chartqa_result(base_c, "base"), "lavender": chartqa_result(lav_c, "lavender")},
        "MME": {"base": mme_result(base_s), "lavender": mme_result(lav_s)},
        "MMBench_DEV_EN": {"base": None, "lavender": None},
    }
    reference = load_reference()
    verdicts = judge(reference, results, n_resamples=N_RESAMPLES)
    metadata = {"profile": {"name": "seed-report", "fingerprint": "f00d"},
                "models": {"base": {"path": "/models/base", "fingerprint": "abc123"},
                           "adapter": {"path": "/models/lavender-lora", "fingerprint": "def456"}}}
    return reference, verdicts, results, metadata, (base_c, lav_c)


@pytest.fixture(scope="module")
def written(run_inputs, tmp_path_factory):
    reference, verdicts, results, metadata, _ = run_inputs
    root = tmp_path_factory.mktemp("reports")
    return write_report(root, None, reference, verdicts, results, metadata)


def test_files_are_written(written):
    assert RUN_ID_PATTERN.match(written.name)
    assert sorted(p.name for p in written.iterdir()) == ["flips.jsonl", "gains.png", "report.json", "report.md"]
    assert (written / "gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (written / "gains.png").stat().st_size > 10_000
    assert not [p for p in written.parent.iterdir() if p.name.endswith(".partial")]


def test_markdown_has_the_seed_reports_sections(written, run_inputs):
    md = (written / "report.md").read_text(encoding="utf-8")
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    # Results first (as reports/README.md lays it out), scope and configuration after them.
    assert headings == ["## Overall comparison", "## ChartQA breakdown",
                        "## MMBench (selected sub-scores, %)", "## MME", "## Verdicts",
                        "## Every metric measured", "## Scope", "## Files"]
    assert "NOT COMPARABLE" not in md  # no data was described
    assert "`abc123`" in md and "`def456`" in md and "`f00d`" in md  # fingerprints and profile
    assert "lxasqjc/lavender-llama-3.2-11b-lora" in md  # the reference run's settings
    # Missing rows say so, and why.
    ocr = next(line for line in md.splitlines() if line.startswith("| ocr |"))
    assert "missing" in ocr and "no base result for MMBench_DEV_EN" in ocr
    # ChartQA's measured numbers with the reported ones in brackets.
    _, verdicts, results, _, (base_c, lav_c) = run_inputs
    human = next(line for line in md.splitlines() if line.startswith("| test_human |"))
    assert f"{np.mean(base_c[:200]) * 100:.2f} (11.52)" in human
    assert f"{(np.mean(lav_c[:200]) - np.mean(base_c[:200])) * 100:+.2f} | +19.92 |" in human


def test_results_come_before_the_scope(written):
    """The summary line and the first results table open report.md, within a screen; the
    run's configuration (hundreds of lines on a real run) follows every result."""
    lines = (written / "report.md").read_text(encoding="utf-8").splitlines()
    assert lines[2].startswith("Written ") and "Verdicts: **" in lines[2]
    assert lines.index("## Overall comparison") < 10
    scope = lines.index("## Scope")
    for heading in ("## MME", "## Verdicts", "## Every metric measured"):
        assert lines.index(heading) < scope


def test_mme_rows_are_ranked_by_measured_gain(written, run_inputs):
    md = (written / "report.md").read_text(encoding="utf-8")
    section = md.split("## MME\n", 1)[1].split("\n## ", 1)[0]
    gains = {}
    current = None
    for line in section.splitlines():
        if line.startswith("**"):
            current = line.strip("*: ").split("**")[0]
        elif line.startswith("| ") and not line.startswith(("| Metric", "| ---")):
            gains.setdefault(current, []).append(float(line.split(" | ")[3]))
    assert set(gains) <= {"Top increases", "Decreases", "No change"} and gains
    for values in gains.values():
        assert values == sorted(values, reverse=True)
    assert all(g > 0 for g in gains.get("Top increases", []))
    assert all(g < 0 for g in gains.get("Decreases", []))  # a +0.00 row is no decrease
    assert all(g == 0 for g in gains.get("No change", []))
    assert sum(len(v) for v in gains.values()) == 12


def test_json_holds_everything(written, run_inputs):
    reference, verdicts, results, _, _ = run_inputs
    data = json.loads((written / "report.json").read_text(encoding="utf-8"))
    assert data["run_id"] == written.name
    assert len(data["verdicts"]) == 3 * len(reference.rows)
    counts = {s: sum(v.status == s for v in verdicts) for s in ("pass", "fail", "missing")}
    assert {k: data["summary"][k] for k in counts} == counts and data["summary"]["passed"] is False
    # Every metric key of every benchmark measured, in or out of the reference.
    assert set(data["benchmarks"]) == {"ChartQA_TEST", "MME"}
    mme = data["benchmarks"]["MME"]["metrics"]
    assert set(benchmark_spec("MME").metric_keys) | {"total"} == set(mme)
    assert mme["position"]["reference_row"] is None  # measured, though the report skipped it
    assert mme["total"]["base"] == pytest.approx(results["MME"]["base"].metrics["perception"]
                                                 + results["MME"]["base"].metrics["reasoning"])
    missing = next(v for v in data["verdicts"] if v["row_id"] == "MMBench_DEV_EN-ocr")
    assert missing["measured"] is None and missing["band"] is None and missing["reason"]
    assert data["reference"]["gate"]["n_resamples"] == 2000


def test_flips_list_every_changed_unit_with_its_samples(written, run_inputs):
    _, _, results, _, (base_c, lav_c) = run_inputs
    lines = [json.loads(line) for line in (written / "flips.jsonl").read_text(encoding="utf-8").splitlines()]
    chartqa = [x for x in lines if x["benchmark"] == "ChartQA_TEST"]
    changed = np.flatnonzero(base_c != lav_c)
    assert sorted(x["unit"] for x in chartqa) == changed.tolist()
    lost = [x for x in chartqa if x["direction"] == "lost"]
    assert len(lost) == 3 and all(x["base_correct"] == 1.0 and x["lavender_correct"] == 0.0 for x in lost)
    sample = chartqa[0]["samples"][0]
    unit = chartqa[0]["unit"]
    assert sample["question"] == f"What is bar {unit}?" and sample["answer"] == str(unit)
    assert {sample["base_prediction"], sample["lavender_prediction"]} == {str(unit), f"{'lavender' if lav_c[unit] == 0 else 'base'} guess"}
    mme = [x for x in lines if x["benchmark"] == "MME"]
    b_units, l_units = results["MME"]["base"].units, results["MME"]["lavender"].units
    assert len(mme) == int((b_units["correct"] != l_units["correct"]).sum())
    assert all(len(x["samples"]) == 2 and "base_extracted" in x["samples"][0] for x in mme)


@pytest.fixture
def no_plot(monkeypatch):
    """The plot is checked once above; these tests are about folders, so skip drawing it."""
    monkeypatch.setattr(report_module, "_plot_gains", lambda path, *args: path.write_bytes(b"png"))


def test_latest_points_to_the_newest_run(run_inputs, tmp_path, no_plot):
    reference, verdicts, results, metadata, _ = run_inputs
    args = (reference, verdicts, results, metadata)
    first = write_report(tmp_path, "20260101-000000-aaaaaaaa", *args)
    assert (tmp_path / "latest").resolve() == first.resolve()
    second = write_report(tmp_path, "20260102-000000-bbbbbbbb", *args)
    assert (tmp_path / "latest").resolve() == second.resolve()
    # A run written later under an older id does not take `latest` away from the newest.
    write_report(tmp_path, "20251231-235959-cccccccc", *args)
    assert os.readlink(tmp_path / "latest") == second.name
    assert latest_run(tmp_path) == second
    with pytest.raises(FileExistsError):
        write_report(tmp_path, second.name, *args)
    with pytest.raises(ValueError, match="run id"):
        write_report(tmp_path, "my-run", *args)


def test_latest_falls_back_to_a_text_file(run_inputs, tmp_path, monkeypatch, no_plot):
    reference, verdicts, results, metadata, _ = run_inputs

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(report_module.os, "symlink", no_symlinks)
    run = write_report(tmp_path, None, reference, verdicts, results, metadata)
    assert not (tmp_path / "latest").exists()
    assert (tmp_path / "latest.txt").read_text(encoding="utf-8").strip() == run.name


def test_run_ids_sort_by_time_and_do_not_collide():
    t0 = datetime(2026, 11, 27, 9, 5, 1, tzinfo=timezone.utc)
    t1 = datetime(2026, 11, 27, 10, 0, 0, tzinfo=timezone.utc)
    a, b, c = new_run_id(t0), new_run_id(t0), new_run_id(t1)
    assert re.fullmatch(r"20261127-090501-[0-9a-f]{8}", a)
    assert a != b and max(a, b) < c


def test_an_unchanged_mme_row_is_listed_as_no_change(run_inputs, tmp_path):
    reference, _, results, metadata, _ = run_inputs
    same = dict(results)
    same["MME"] = {"base": results["MME"]["base"], "lavender": results["MME"]["base"]}
    verdicts = judge(reference, same, n_resamples=N_RESAMPLES)
    md = (write_report(tmp_path, None, reference, verdicts, same, metadata) / "report.md").read_text()
    section = md.split("## MME\n", 1)[1].split("\n## ", 1)[0]
    assert "**Decreases**" not in section and "**No change**:" in section
    assert "+0.00 |" in section.split("**No change**:", 1)[1]


def test_data_that_is_not_the_references_is_said_first(run_inputs, tmp_path):
    """Issue 12 item 3: a TSV that is not VLMEvalKit's opens report.md and report.json says so."""
    reference, verdicts, results, metadata, _ = run_inputs
    data = {"ChartQA_TEST": {"tsv": "/data/ChartQA_TEST.tsv", "md5": "0" * 32,
                             "md5_expected": "c902e0aa9be5582a7aad6dcf52734b42", "rows_in_file": 2499,
                             "rows_expected": 2500}}
    written = write_report(tmp_path, None, reference, verdicts, results, {**metadata, "data": data})
    md = (written / "report.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    assert lines[2].startswith("> **NOT COMPARABLE with the reference: its verdicts do not test")
    assert "/data/ChartQA_TEST.tsv is not VLMEvalKit's ChartQA_TEST TSV: md5 0000" in lines[4]
    assert "2499 rows (VLMEvalKit's has 2500)" in lines[4]
    summary = json.loads((written / "report.json").read_text())["summary"]
    assert summary["comparable"] is False and "ChartQA_TEST" in summary["noncomparable"]
    allowed = {**metadata, "data": data, "config": {"allow_noncomparable": True}}
    md = (write_report(tmp_path, None, reference, verdicts, results, allowed) / "report.md").read_text()
    assert "--allow-noncomparable was given" in md.splitlines()[2]


def test_percent_bands_never_go_below_zero(run_inputs):
    _, verdicts, _, _, _ = run_inputs
    for v in verdicts:
        if v.band is not None and v.quantity != "gain":
            assert v.band[0] >= 0, v.message()
        if v.band is not None and v.metric_unit == "percent" and v.quantity != "gain":
            assert v.band[1] <= 100, v.message()


def test_a_subsets_rows_read_n_of_N(run_inputs, tmp_path, no_plot):
    """report.md (and reports/README.md) say that on a subset n reads `n of N`."""
    reference, _, results, metadata, _ = run_inputs
    chartqa = {variant: dataclasses.replace(result, population={"test_human": 1250, "test_augmented": 1250})
               for variant, result in results["ChartQA_TEST"].items()}
    subset = {**results, "ChartQA_TEST": chartqa}
    verdicts = judge(reference, subset, n_resamples=N_RESAMPLES)
    assert next(v for v in verdicts if v.row_id == "ChartQA_TEST-test_human").subset
    md = (write_report(tmp_path, None, reference, verdicts, subset, metadata) / "report.md").read_text()
    human = next(line for line in md.splitlines() if line.startswith("| test_human |"))
    assert "| 200 of 1250 |" in human
    ocr = next(line for line in md.splitlines() if line.startswith("| ocr |"))
    assert " of " not in ocr.split(" | ")[6]  # not measured: no n at all


def test_a_report_being_written_survives_another_runs_pruning(run_inputs, tmp_path, monkeypatch):
    """Another run's report (which prunes killed runs' .partial folders) arriving while this
    one is written leaves this one alone; its lock file goes with it."""
    from lavender_checks.run.judge import prune_reports

    reference, verdicts, results, metadata, _ = run_inputs
    pruned = []
    monkeypatch.setattr(report_module, "_plot_gains",
                        lambda path, *args: pruned.extend(prune_reports(tmp_path)) or path.write_bytes(b"png"))
    written = write_report(tmp_path, None, reference, verdicts, results, metadata)
    assert pruned == []
    assert (written / "report.md").is_file() and (written / "gains.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [written.name, "latest"]

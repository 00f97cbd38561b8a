"""--stop-early in a checkpoint series: each checkpoint stops on its own (run/series.py,
run/rounds.py ``run_rounds_each``).

The generated path runs the tiny pair's Trainer-like output_dir (checkpoint-100 refused,
checkpoint-200 at half strength, checkpoint-300 the tiny adapter) on two mini benchmarks. Whether
a checkpoint stops is the statistics' call (tests/unit/test_sequential.py and
test_stop_early.py test that); here one checkpoint's looks are made certain of a failure, so
that what the series does with it can be seen: that checkpoint is generated no further, the
base and the others go on. The VLMEvalKit work dir runs the real statistics on full-size
ChartQA files: a checkpoint with no gain stops within 5 % of the rows, one that reproduces the
report goes to the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lavender_checks import cli
from lavender_checks.gate.sequential import Decision, EarlyFailure
from lavender_checks.run import collect

from .test_series import BENCHMARKS, ROWS, latest_report, run_args
from .test_stop_early import broken_reference

FAILURE = EarlyFailure("ChartQA_TEST-Overall", "gain", 4.17, (-50.0, -10.0), 2.0, "below", 0.01, 3, 24)


def certain_failure(monkeypatch, checkpoint: str, look: int = 2) -> None:
    """In each run, ``checkpoint``'s ``look``-th look finds ChartQA's gain certain to fail;
    every other look is the real one."""
    real = collect._stop_early_plans

    def plans(*args, **kwargs):
        plans, settings, lookers = real(*args, **kwargs)
        looker = lookers.get(checkpoint)
        if looker is not None:
            real_look, looks = looker.look, []  # counted per run

            def looked(predictions, done):
                decision = real_look(predictions, done)
                looks.append(1)
                return Decision([FAILURE]) if len(looks) == look else decision

            looker.look = looked
        return plans, settings, lookers

    monkeypatch.setattr(collect, "_stop_early_plans", plans)


@pytest.fixture
def checkpoint_200_fails_in_round_2(monkeypatch):
    certain_failure(monkeypatch, "checkpoint-200")


@pytest.mark.slow
def test_a_checkpoint_certain_to_fail_stops_while_the_others_go_on(tiny_checkpoints, tmp_path, capsys,
                                                                    checkpoint_200_fails_in_round_2):
    from lavender_checks.synthetic.tiny import write_checkpoint_series

    out = tmp_path / "output_dir"
    write_checkpoint_series(tiny_checkpoints.adapter, out)
    store, reports = tmp_path / "store", tmp_path / "reports"
    args = ["run", *run_args(tiny_checkpoints.base, out, store=store, reports=reports), "--quiet"]
    assert cli.main([*args, "--stop-early"]) == 0  # the candidate, checkpoint-300, went to the end and passed
    printed = capsys.readouterr().out
    report = latest_report(reports)
    refused, half, full = report["checkpoints"]
    assert refused["refused"] and refused["early_stop"] is None
    assert half["early_stop"]["stopped"] and half["early_stop"]["rounds_done"] == 2
    assert half["early_stop"]["decided_by"]["row"] == "ChartQA_TEST-Overall"
    assert half["summary"] == {"pass": 0, "fail": 1, "missing": len(half["verdicts"]) - 1}
    assert not full["early_stop"]["stopped"] and full["early_stop"]["rows_used"] == sum(ROWS.values())
    for benchmark, rows in ROWS.items():
        used = half["early_stop"]["benchmarks"][benchmark]["rows_used"]
        assert 0 < used < rows
        # The base once, checkpoint-200 only the rows of its two rounds, checkpoint-300 all.
        assert report["predictions"][benchmark] == {
            "base": {"generated": rows, "reused": 0}, "checkpoint-100": {"generated": 0, "reused": 0},
            "checkpoint-200": {"generated": used, "reused": 0}, "checkpoint-300": {"generated": rows, "reused": 0}}
    assert "checkpoint-200: STOPPED EARLY after round 2" in printed
    assert "checkpoint-300: --stop-early: no failure was certain before the end" in printed
    text = (reports / "latest" / "report.md").read_text()
    # not counted by --gate-series last: report.md does not lead with a pass, nor with a fail
    assert "> **--stop-early: STOPPED EARLY: checkpoint-200 (not counted)." in "\n".join(text.splitlines()[:6])
    assert report["series"]["early_stop"] == {"stopped": ["checkpoint-200"], "cut_short": [], "fails_the_run": False}
    assert "- **checkpoint-200**: STOPPED EARLY after round 2" in text
    assert "**FAIL** (certain, stopped early)" in text and "not judged" in text

    # checkpoint-300's verdicts are those of the run without --stop-early, which reuses every
    # stored row and generates only what checkpoint-200 left.
    assert cli.main(args) == 0
    capsys.readouterr()
    plain = latest_report(reports)
    keep = ("row_id", "quantity", "status", "measured", "band", "n")
    assert ([{k: v[k] for k in keep} for v in plain["checkpoints"][2]["verdicts"]]
            == [{k: v[k] for k in keep} for v in full["verdicts"]])
    for benchmark, rows in ROWS.items():
        used = half["early_stop"]["benchmarks"][benchmark]["rows_used"]
        assert plain["predictions"][benchmark]["checkpoint-200"] == {"generated": rows - used, "reused": used}

    # --gate-series all: checkpoint-200 counts, and each checkpoint has a share of alpha.
    assert cli.main([*args, "--stop-early", "--gate-series", "all"]) == 1
    capsys.readouterr()
    every = latest_report(reports)
    assert every["checkpoints"][1]["early_stop"]["stopped"] and every["series"]["early_stop"]["fails_the_run"]
    assert "(counted: the run fails)" in (reports / "latest" / "report.md").read_text()
    assert every["checkpoints"][2]["early_stop"]["alpha"] == pytest.approx(0.01 / 3)
    assert "its share of 0.01 over the 3 checkpoints" in every["checkpoints"][2]["early_stop"]["alpha_scope"]


@pytest.mark.slow
def test_once_the_last_checkpoint_stops_the_rounds_end(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """--gate-series last: the run's failure is certain once checkpoint-300 stops, so the
    rounds end there; checkpoint-200, still going, is cut short and not judged."""
    from lavender_checks.synthetic.tiny import write_checkpoint_series

    certain_failure(monkeypatch, "checkpoint-300")
    out = tmp_path / "output_dir"
    write_checkpoint_series(tiny_checkpoints.adapter, out)
    args = run_args(tiny_checkpoints.base, out, store=tmp_path / "store", reports=tmp_path / "reports",
                    extra=("--stop-early", "--quiet"))
    assert cli.main(["run", *args]) == 1
    printed = capsys.readouterr().out
    report = latest_report(tmp_path / "reports")
    _, half, full = report["checkpoints"]
    assert full["early_stop"]["stopped"] and full["early_stop"]["rounds_done"] == 2
    assert not half["early_stop"]["stopped"] and half["early_stop"]["ended_by"] == "checkpoint-300"
    assert half["early_stop"]["rows_used"] == full["early_stop"]["rows_used"] < sum(ROWS.values())
    assert half["summary"] == {"pass": 0, "fail": 0, "missing": len(half["verdicts"])}
    assert all("when checkpoint-300, which the exit status counts, had stopped early" in v["reason"]
               for v in half["verdicts"])
    assert "checkpoint-200: not judged: the rounds ended after round 2" in printed
    assert report["series"]["early_stop"] == {"stopped": ["checkpoint-300"], "cut_short": ["checkpoint-200"],
                                              "fails_the_run": True}
    for benchmark in BENCHMARKS:
        used = full["early_stop"]["benchmarks"][benchmark]["rows_used"]
        generated = {variant: counts["generated"] for variant, counts in report["predictions"][benchmark].items()}
        assert generated == {"base": used, "checkpoint-100": 0, "checkpoint-200": used, "checkpoint-300": used}


@pytest.mark.slow
def test_a_series_whose_checkpoints_all_fail_stops_without_generating_the_rest(tiny_checkpoints, tmp_path, capsys):
    """A reference no checkpoint can reach: each stops in the same round, the base with them."""
    from lavender_checks.synthetic.tiny import write_checkpoint_series

    out = tmp_path / "output_dir"
    write_checkpoint_series(tiny_checkpoints.adapter, out)
    args = run_args(tiny_checkpoints.base, out, store=tmp_path / "store", reports=tmp_path / "reports",
                    extra=("--reference", str(broken_reference(tmp_path)), "--stop-early", "--quiet"))
    assert cli.main(["run", *args]) == 1
    capsys.readouterr()
    report = latest_report(tmp_path / "reports")
    stops = [c["early_stop"] for c in report["checkpoints"]]
    assert stops[0] is None and stops[1]["stopped"] and stops[2]["stopped"]
    assert stops[1]["rows_used"] == stops[2]["rows_used"] < sum(ROWS.values())
    for benchmark in BENCHMARKS:
        used = stops[2]["benchmarks"][benchmark]["rows_used"]
        generated = {variant: counts["generated"] for variant, counts in report["predictions"][benchmark].items()}
        assert generated == {"base": used, "checkpoint-100": 0, "checkpoint-200": used, "checkpoint-300": used}
    assert report["summary"]["passed"] is False


def _chartqa_work_dir(root: Path) -> Path:
    """A VLMEvalKit work dir on full-size ChartQA: the base, a checkpoint with no gain yet and
    one that reproduces the report."""
    from lavender_checks.gate.verdicts import load_reference
    from lavender_checks.run.config import SEED_REFERENCE
    from lavender_checks.synthetic import fullsize_data
    from lavender_checks.vlmeval_io import write_prediction_file

    chartqa = fullsize_data.benchmark_frames(seed=0, benchmarks=("ChartQA_TEST",))
    targets = fullsize_data.scenario_targets(load_reference(SEED_REFERENCE), "reproduce")
    frames = fullsize_data.prediction_frames(chartqa, fullsize_data.predictions_for_targets(chartqa, targets))
    frames = frames["ChartQA_TEST"]
    work = root / "outputs"
    for model, frame in {"llama_vision_base": frames["base"], "lavender_checkpoint-100": frames["base"],
                         "lavender_checkpoint-200": frames["lavender"]}.items():
        write_prediction_file(frame, work / model / "T20260820-101500" / f"{model}_ChartQA_TEST.tsv")
    return work


def test_vlmeval_checkpoints_stop_on_their_own(tmp_path, capsys):
    work = _chartqa_work_dir(tmp_path)
    args = ["run", "--from-vlmeval", str(work), "--benchmark", "ChartQA_TEST", "--reports", str(tmp_path / "r"),
            "--lavender-name", "lavender_checkpoint-100", "--lavender-name", "lavender_checkpoint-200",
            "--quiet", "--stop-early"]
    assert cli.main(args) == 0  # the candidate goes to the end and passes
    capsys.readouterr()
    report = latest_report(tmp_path / "r")
    no_gain, reproduces = report["checkpoints"]
    assert no_gain["early_stop"]["stopped"] and no_gain["early_stop"]["rows_used"] <= 0.05 * 2500
    assert no_gain["summary"]["fail"] > 0 and no_gain["summary"]["pass"] == 0
    assert not reproduces["early_stop"]["stopped"] and reproduces["early_stop"]["rows_used"] == 2500
    assert reproduces["summary"]["fail"] == reproduces["summary"]["missing"] == 0
    assert no_gain["early_stop"]["alpha"] == reproduces["early_stop"]["alpha"] == 0.01
    # Every checkpoint counts: the one that stopped fails the run, with half the alpha each.
    assert cli.main([*args, "--gate-series", "all"]) == 1
    assert "gated checkpoints that did not pass: lavender_checkpoint-100" in capsys.readouterr().out
    every = latest_report(tmp_path / "r")
    assert [c["early_stop"]["alpha"] for c in every["checkpoints"]] == [0.005, 0.005]
    assert every["checkpoints"][0]["early_stop"]["decided_by"]["row"].startswith("ChartQA_TEST")
    assert every["series"]["early_stop"] == {"stopped": ["lavender_checkpoint-100"], "cut_short": [],
                                             "fails_the_run": True}


@pytest.mark.slow
def test_the_pytest_gate_stops_each_checkpoint_alike_in_one_process_and_under_n_2(tiny_checkpoints, tmp_path):
    """``pytest`` and ``pytest -n 2`` over one series with a reference no checkpoint reaches:
    every worker stops each checkpoint in the round one process stops it in; the candidate's
    certain case fails, its others are skipped, the earlier checkpoint's failure is an xfail."""
    import os
    import subprocess
    import sys

    from lavender_checks import REPO_ROOT
    from lavender_checks.synthetic.tiny import write_checkpoint_series

    from .test_series import GATE_TESTS

    out = tmp_path / "output_dir"
    write_checkpoint_series(tiny_checkpoints.adapter, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    stops, counts = [], []
    for workers in (["-n", "2"], []):
        reports = tmp_path / f"reports{len(workers)}"
        args = run_args(tiny_checkpoints.base, out, store=tmp_path / f"store{len(workers)}", reports=reports,
                        extra=("--reference", str(broken_reference(tmp_path)), "--stop-early"))
        done = subprocess.run([sys.executable, "-m", "pytest", str(GATE_TESTS), "-q", "-rfx", "-p", "no:cacheprovider",
                               *workers, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        assert "FAILED" in done.stdout and "test_lavender[checkpoint-300-ChartQA_TEST-Overall]" in done.stdout
        assert "XFAIL" in done.stdout and "checkpoint-200 is not gated" in done.stdout
        assert "checkpoint-300: STOPPED EARLY after round" in done.stdout
        report = latest_report(reports)
        stops.append([c["early_stop"] for c in report["checkpoints"]])
        counts.append(report["predictions"])
    def without_timing(records):  # "looks" holds the seconds each look took
        return [{k: v for k, v in r.items() if k != "looks"} if r else r for r in records]

    assert without_timing(stops[0]) == without_timing(stops[1])
    assert counts[0] == counts[1]  # whichever worker wrote the report: rows generated by the run, not by it
    assert stops[0][2]["stopped"] and stops[0][2]["rows_used"] < sum(ROWS.values())


@pytest.mark.slow
def test_torchrun_ranks_stop_each_checkpoint_where_one_process_does(tiny_checkpoints, tmp_path, capsys):
    """torchrun, two ranks on one host: each generates its shard of the base and of each
    checkpoint not stopped, rank 0 decides for all (the refused checkpoint too, which rank 1
    may meet first); every checkpoint stops where one process stops it."""
    from lavender_checks.synthetic.tiny import write_checkpoint_series
    from tests.integration.test_torchrun import Launch

    out = tmp_path / "output_dir"
    write_checkpoint_series(tiny_checkpoints.adapter, out)
    extra = ("--reference", str(broken_reference(tmp_path)), "--stop-early", "--quiet")
    single_reports, reports = tmp_path / "single", tmp_path / "reports"
    assert cli.main(["run", *run_args(tiny_checkpoints.base, out, store=tmp_path / "store1", reports=single_reports,
                                      extra=extra)]) == 1
    capsys.readouterr()
    launch = Launch(tmp_path, "series-early", 1, 2, ["-m", "lavender_checks.cli", "run", *run_args(
        tiny_checkpoints.base, out, store=tmp_path / "store2", reports=reports, extra=extra)])
    codes = launch.wait(timeout=900)
    assert codes == [1], launch.output() + launch.rank_output(0, 0)
    single, shared = latest_report(single_reports), latest_report(reports)
    keep = ("stopped", "rows_used", "rows_total", "benchmarks", "rounds_done", "decided_by", "failures")
    assert ([{k: c["early_stop"][k] for k in keep} if c["early_stop"] else None for c in shared["checkpoints"]]
            == [{k: c["early_stop"][k] for k in keep} if c["early_stop"] else None for c in single["checkpoints"]])
    assert shared["checkpoints"][0]["refused"] and shared["checkpoints"][2]["early_stop"]["stopped"]
    # the base and the two good checkpoints, each on the rows of its rounds, once over the ranks
    used = shared["checkpoints"][2]["early_stop"]["rows_used"]
    assert sum(shared["metadata"]["torchrun"]["generated_by_rank"]) == 3 * used
    assert shared["predictions"] == single["predictions"]  # the rows the launch generated, not rank 0's share

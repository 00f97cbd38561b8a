"""A series of checkpoints in one run, on the tiny pair on CPU (run/series.py).

The series is a Trainer-like output_dir made from the tiny adapter (synthetic/tiny.py
``write_checkpoint_series``): checkpoint-100 changes nothing (all lora_B zero; the no-op check
refuses it), checkpoint-200 has the tiny LoRA at half strength, checkpoint-300 is the tiny
adapter (whose numbers tiny-mini.toml records). One run gates the good ones, generates the
base once, and judges each checkpoint as a one-adapter run of it judges it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lavender_checks import FIXTURES, REPO_ROOT, cli
from lavender_checks.run.collect import collect_results
from lavender_checks.run.config import TINY_REFERENCE, RunConfig
from lavender_checks.run.judge import judge_run
from lavender_checks.synthetic.tiny import write_checkpoint_series, write_scaled_adapter

MINI = FIXTURES / "lmudata-mini"
BENCHMARKS = ("ChartQA_TEST", "DocVQA_VAL")
ROWS = {"ChartQA_TEST": 24, "DocVQA_VAL": 24}
GATE_TESTS = REPO_ROOT / "tests" / "benchmarks" / "test_gate.py"
ERROR_LINE = "lavender-checks run: error: "


def run_args(base: Path, *lora: Path, store: Path, reports: Path, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["--base-model", str(base), "--lmu-data", str(MINI), "--reference", str(TINY_REFERENCE),
            "--store", str(store), "--reports", str(reports)]
    for folder in lora:
        args += ["--lora", str(folder)]
    for benchmark in BENCHMARKS:
        args += ["--benchmark", benchmark]
    return args + list(extra)


def latest_report(reports: Path) -> dict:
    return json.loads((reports / "latest" / "report.json").read_text())


@pytest.fixture(scope="module")
def series(tiny_checkpoints, tmp_path_factory):
    """The output_dir, and one series run over it (store, reports, exit status, report.json)."""
    root = tmp_path_factory.mktemp("series")
    out = root / "output_dir"
    write_checkpoint_series(tiny_checkpoints.adapter, out)
    store, reports = root / "store", root / "reports"
    code = cli.main(["run", *run_args(tiny_checkpoints.base, out, store=store, reports=reports), "--quiet"])
    return {"out": out, "store": store, "reports": reports, "code": code, "report": latest_report(reports),
            "report_dir": (reports / "latest").resolve(), "root": root}


@pytest.mark.slow
def test_a_series_gates_each_checkpoint_and_generates_the_base_once(series):
    report = series["report"]
    assert series["code"] == 0  # the last checkpoint passes
    names = [c["name"] for c in report["checkpoints"]]
    assert names == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    for benchmark, rows in ROWS.items():
        assert report["predictions"][benchmark] == {
            "base": {"generated": rows, "reused": 0},
            "checkpoint-100": {"generated": 0, "reused": 0},  # refused: nothing to generate with
            "checkpoint-200": {"generated": rows, "reused": 0},
            "checkpoint-300": {"generated": rows, "reused": 0}}
    refused, half, full = report["checkpoints"]
    assert "does not change the logits" in refused["refused"]
    # its base verdicts stand (the base was computed); its own are missing, saying why
    assert refused["summary"] == {"pass": len(refused["verdicts"]) // 3, "fail": 0,
                                  "missing": 2 * len(refused["verdicts"]) // 3}
    assert all("adapter refused" in v["reason"] for v in refused["verdicts"] if v["quantity"] != "base")
    assert half["summary"]["fail"] > 0 and full["summary"] == {"pass": len(full["verdicts"]), "fail": 0, "missing": 0}
    assert len({c["adapter_fingerprint"] for c in report["checkpoints"]}) == 3
    assert report["series"] == {"gate_series": "last", "candidate": "checkpoint-300",
                                "first_passing": "checkpoint-300"}
    assert report["summary"]["passed"] is True
    # The rest of the report is the candidate's, and says so
    assert report["metadata"]["checkpoint"]["name"] == "checkpoint-300"
    text = (series["report_dir"] / "report.md").read_text()
    assert "## Checkpoint series" in text and "First checkpoint from which every verdict passes: **checkpoint-300**" in text
    assert "| row | quantity | reported | band | checkpoint-100 | checkpoint-200 | checkpoint-300 |" in text
    assert "checkpoint-100: adapter refused" in text
    for benchmark in BENCHMARKS:
        assert (series["report_dir"] / f"trend-{benchmark}.png").stat().st_size > 0


@pytest.mark.slow
def test_each_checkpoint_is_judged_as_a_one_adapter_run_of_it(series, tiny_checkpoints, tmp_path):
    """A one-adapter run of a checkpoint on the same store generates nothing (the series
    stored it under the keys that run uses) and gives the series' verdicts, bands included;
    its report counts its predictions too."""
    from lavender_checks.run.judge import write_run_report

    for entry in series["report"]["checkpoints"][1:]:
        config = RunConfig(base_model=tiny_checkpoints.base, lora=Path(entry["path"]), lmu_data=MINI,
                           reference=TINY_REFERENCE, store=series["store"], benchmarks=BENCHMARKS)
        run = collect_results(config, progress=False)
        assert all(c["generated"] == 0 for per in run.metadata["predictions"].values() for c in per.values())
        assert run.metadata["fingerprints"]["adapter"] == entry["adapter_fingerprint"]
        outcome = judge_run(run)
        single = [json.loads(json.dumps(v.to_dict())) for v in outcome.verdicts]
        assert single == entry["verdicts"], entry["name"]
    # The same checkpoint generated by a one-adapter run of its own (a fresh store): the same
    # predictions as the series stored for it, the base's included.
    fresh = collect_results(RunConfig(base_model=tiny_checkpoints.base, lora=Path(entry["path"]), lmu_data=MINI,
                                      reference=TINY_REFERENCE, store=tmp_path / "fresh", benchmarks=("ChartQA_TEST",)),
                            progress=False)
    assert fresh.metadata["predictions"]["ChartQA_TEST"]["lavender"]["generated"] == ROWS["ChartQA_TEST"]
    assert fresh.predictions["ChartQA_TEST"] == run.predictions["ChartQA_TEST"]
    report = json.loads((write_run_report(run, outcome, reports_root=tmp_path) / "report.json").read_text())
    assert report["predictions"] == {b: {"base": {"generated": 0, "reused": rows},
                                         "lavender": {"generated": 0, "reused": rows}} for b, rows in ROWS.items()}
    assert "checkpoints" not in report


@pytest.mark.slow
def test_a_rerun_with_one_more_checkpoint_generates_only_that_one(series, tiny_checkpoints, tmp_path):
    out = tmp_path / "output_dir"
    shutil.copytree(series["out"], out)
    write_scaled_adapter(tiny_checkpoints.adapter, out / "checkpoint-400", 0.75)
    reports = tmp_path / "reports"
    code = cli.main(["run", *run_args(tiny_checkpoints.base, out, store=series["store"], reports=reports),
                     "--quiet", "--gate-series", "all"])
    report = latest_report(reports)
    assert code == 1  # checkpoint-100 (refused) and checkpoint-200 count now
    assert [c["name"] for c in report["checkpoints"]][-1] == "checkpoint-400"
    for benchmark, rows in ROWS.items():
        counts = report["predictions"][benchmark]
        assert counts["base"] == {"generated": 0, "reused": rows}
        assert counts["checkpoint-200"] == counts["checkpoint-300"] == {"generated": 0, "reused": rows}
        assert counts["checkpoint-400"] == {"generated": rows, "reused": 0}
    earlier = {c["name"]: c["verdicts"] for c in series["report"]["checkpoints"]}
    for entry in report["checkpoints"][1:3]:  # a checkpoint's verdicts do not depend on the others
        assert entry["verdicts"] == earlier[entry["name"]]
    assert "does not change the logits" in report["checkpoints"][0]["refused"]
    assert report["summary"]["passed"] is False and report["series"]["gate_series"] == "all"


def test_the_series_pair_computes_each_checkpoint_as_its_own_pair(tiny_checkpoints, tiny_pair, tmp_path):
    """One weight copy, three adapters beside it: each variant's logits are those of the
    one-adapter pair (bit for bit), base included; the no-op adapter is refused, not loaded
    as a silent copy of the base."""
    import torch

    from lavender_checks.model import AdapterRefused, fixed_probe_inputs, load_series_pair

    folders = write_checkpoint_series(tiny_checkpoints.adapter, tmp_path / "out")
    pair = load_series_pair(tiny_checkpoints.base, [(f.name, f) for f in folders], device="cpu")
    assert [a.refused is not None for a in pair.adapters.values()] == [True, False, False]
    inputs = fixed_probe_inputs(pair.processor, pair.device)
    with torch.inference_mode():
        logits = {}
        for name in ("base", "checkpoint-200", "checkpoint-300"):
            with pair.variant(name) as model:
                logits[name] = model(**inputs).logits
        with tiny_pair.variant("base") as model:
            single_base = model(**inputs).logits
        with tiny_pair.variant("lavender") as model:
            single = model(**inputs).logits
        with pair.variant("base") as model:  # disabling after an adapter ran still gives the base
            assert torch.equal(model(**inputs).logits, single_base)
    assert torch.equal(logits["base"], single_base) and torch.equal(logits["checkpoint-300"], single)
    assert not torch.equal(logits["checkpoint-200"], single)
    with pytest.raises(AdapterRefused, match="does not change the logits"):
        with pair.variant("checkpoint-100"):
            pass
    assert sum(p.numel() for n, p in pair.model.named_parameters() if "lora_" not in n) == \
        sum(p.numel() for n, p in tiny_pair.model.named_parameters() if "lora_" not in n)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_loads(monkeypatch):
    import lavender_checks.model as model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "_load_base_model", refuse)


@pytest.mark.parametrize("case, expected", [
    ("two of one name", "--lora: two adapters are named 'checkpoint-300'"),
    ("another base model", "adapter_other_base: made for another base model"),
    ("no adapters", "empty has no adapter_config.json: not a peft adapter folder"),
    ("a checkpoint without adapter_config.json", "checkpoint-250 has no adapter_config.json"),
])
def test_bad_series_stop_before_any_model_loads(case, expected, tiny_checkpoints, tmp_path, capsys, no_model_loads):
    out = tmp_path / "output_dir"
    folders = write_checkpoint_series(tiny_checkpoints.adapter, out, {200: 0.5, 300: 1.0})
    lora: list[Path] = [out]
    if case == "two of one name":
        lora = [folders[1], write_scaled_adapter(tiny_checkpoints.adapter, tmp_path / "other" / "checkpoint-300", 2.0)]
    elif case == "another base model":
        lora = [*folders, tiny_checkpoints.adapter_other_base]
    elif case == "no adapters":
        lora = [tmp_path / "empty"]
        (tmp_path / "empty" / "runs").mkdir(parents=True)
    else:
        (out / "checkpoint-250").mkdir()
        (out / "checkpoint-250" / "adapter_model.safetensors").write_bytes(b"")
    code = cli.main(["run", *run_args(tiny_checkpoints.base, *lora, store=tmp_path / "store",
                                      reports=tmp_path / "reports"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(ERROR_LINE) and expected in err[0], err


def test_a_bad_series_stops_the_pytest_session_too(tiny_checkpoints, tmp_path):
    """While pytest configures itself: one line, exit status 2, no case run."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(GATE_TESTS), "-q", "-p", "no:cacheprovider",
         *run_args(tiny_checkpoints.base, tiny_checkpoints.adapter, tiny_checkpoints.adapter_other_base,
                   store=tmp_path / "store", reports=tmp_path / "reports")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{ERROR_LINE}{tiny_checkpoints.adapter_other_base}: made for another base model" in done.stdout + done.stderr


# ----------------------------------------------------------------------------- pytest


@pytest.mark.slow
def test_the_pytest_gate_has_cases_per_checkpoint(series, tiny_checkpoints, pytester, monkeypatch, tmp_path):
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # this checkout's package in the sessions
    pytester.makepyfile(test_gate=GATE_TESTS.read_text(encoding="utf-8"))
    args = run_args(tiny_checkpoints.base, series["out"], store=series["store"], reports=tmp_path / "reports")
    verdicts = {c["name"]: c["verdicts"] for c in series["report"]["checkpoints"]}
    cases = len(verdicts["checkpoint-300"])

    result = pytester.runpytest_subprocess("-p", "lavender_checks.run.pytest_plugin", "-p", "no:cacheprovider",
                                           "-rx", *args)
    # --gate-series last: the last checkpoint's cases count; a failing earlier one is an xfail
    failing_200 = sum(v["status"] == "fail" for v in verdicts["checkpoint-200"])
    refused_100 = sum(v["status"] == "missing" for v in verdicts["checkpoint-100"])
    result.assert_outcomes(passed=3 * cases - failing_200 - refused_100, xfailed=failing_200 + refused_100)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["first checkpoint from which every verdict passes: checkpoint-300",
                                 "*XFAIL*test_lavender?checkpoint-200-DocVQA_VAL-Overall?*checkpoint-200 is not gated*"])

    every = pytester.runpytest_subprocess("-p", "lavender_checks.run.pytest_plugin", "-p", "no:cacheprovider",
                                          *args, "--gate-series", "all", "-k", "checkpoint-100 or checkpoint-300",
                                          "-v")
    every.assert_outcomes(passed=cases + (cases - refused_100), failed=refused_100)
    assert every.ret == 1
    every.stdout.fnmatch_lines(["*test_gain?checkpoint-300-ChartQA_TEST-Overall? PASSED*",
                                "*_ test_gain?checkpoint-100-ChartQA_TEST-Overall? _*",
                                "checkpoint-100: adapter refused, no predictions: *does not change the logits*"])


# ----------------------------------------------------------------------------- --from-vlmeval


def test_a_vlmeval_work_dir_with_several_lavender_models(tmp_path, capsys):
    """Several Lavender model folders of one VLMEvalKit work dir, ``--lavender-name`` repeated:
    each gated on its own, the last one judged by default, every one with --gate-series all."""
    from lavender_checks.gate.verdicts import load_reference
    from lavender_checks.run.config import SEED_REFERENCE
    from lavender_checks.synthetic import fullsize_data
    from lavender_checks.vlmeval_io import write_prediction_file

    chartqa = fullsize_data.benchmark_frames(seed=0, benchmarks=("ChartQA_TEST",))
    targets = fullsize_data.scenario_targets(load_reference(SEED_REFERENCE), "reproduce")
    frames = fullsize_data.prediction_frames(chartqa, fullsize_data.predictions_for_targets(chartqa, targets))
    frames = frames["ChartQA_TEST"]
    work = tmp_path / "outputs"
    models = {"llama_vision_base": frames["base"], "lavender_checkpoint-100": frames["base"],  # no gain yet
              "lavender_checkpoint-200": frames["lavender"]}
    for model, frame in models.items():
        write_prediction_file(frame, work / model / "T20260820-101500" / f"{model}_ChartQA_TEST.tsv")
    args = ["run", "--from-vlmeval", str(work), "--benchmark", "ChartQA_TEST", "--reports", str(tmp_path / "r"),
            "--lavender-name", "lavender_checkpoint-100", "--lavender-name", "lavender_checkpoint-200", "--quiet"]
    assert cli.main(args) == 0, capsys.readouterr().out
    report = latest_report(tmp_path / "r")
    first, last = report["checkpoints"]
    assert (first["name"], first["step"], last["name"]) == ("lavender_checkpoint-100", 100, "lavender_checkpoint-200")
    assert first["summary"]["fail"] > 0 and last["summary"]["fail"] == last["summary"]["missing"] == 0
    assert report["series"]["first_passing"] == "lavender_checkpoint-200"
    rows = len(frames["base"])
    assert report["predictions"]["ChartQA_TEST"] == {
        variant: {"generated": 0, "reused": 0} for variant in ("base", "lavender_checkpoint-100", "lavender_checkpoint-200")}
    assert report["metadata"]["series"]["checkpoints"][0]["path"] is None and rows == 2500
    assert cli.main([*args, "--gate-series", "all"]) == 1
    assert "gated checkpoints that did not pass: lavender_checkpoint-100" in capsys.readouterr().out
    assert cli.main([*args, "--lavender-name", "lavender_checkpoint-100"]) == 2
    assert "two adapters are named 'lavender_checkpoint-100'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- several processes


def _verdicts(report: dict) -> dict[str, list]:
    return {c["name"]: [(v["row_id"], v["quantity"], v["status"], v["measured"], v["band"]) for v in c["verdicts"]]
            for c in report["checkpoints"]}


@pytest.mark.slow
def test_pytest_xdist_workers_share_a_series(series, tiny_checkpoints, tmp_path):
    """``pytest -n 2``: each worker generates its shard of every variant (base and each
    checkpoint) into a fresh store; both score the union; one report, the one-process verdicts."""
    reports = tmp_path / "reports"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(GATE_TESTS), "-q", "-p", "no:cacheprovider", "-n", "2",
         *run_args(tiny_checkpoints.base, series["out"], store=tmp_path / "store", reports=reports)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [p for p in reports.iterdir() if p.is_dir() and not p.is_symlink() and (p / "report.json").is_file()]
    assert len(runs) == 1  # written once
    report = json.loads((runs[0] / "report.json").read_text())
    assert _verdicts(report) == _verdicts(series["report"])
    assert "first checkpoint from which every verdict passes: checkpoint-300" in done.stdout


@pytest.mark.slow
def test_torchrun_ranks_share_a_series(series, tiny_checkpoints, tmp_path):
    """torchrun, two ranks: each generates its shard of every variant, rank 0 gates each
    checkpoint on the union as one process does; the base's rows are generated once."""
    from tests.integration.test_torchrun import Launch

    reports = tmp_path / "reports"
    launch = Launch(tmp_path, "series", 1, 2, ["-m", "lavender_checks.cli", "run", "--quiet",
                                                *run_args(tiny_checkpoints.base, series["out"],
                                                          store=tmp_path / "store", reports=reports)])
    codes = launch.wait(timeout=900)
    assert codes == [0], launch.output() + launch.rank_output(0, 0)
    report = latest_report(reports)
    assert _verdicts(report) == _verdicts(series["report"])
    # every row of the base and of the two good checkpoints, once, over the two ranks
    assert sum(report["metadata"]["torchrun"]["generated_by_rank"]) == 3 * sum(ROWS.values())

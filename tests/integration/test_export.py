"""``lavender-checks export``: a run's stored predictions as VLMEvalKit's prediction files; the
round trip through ``run --from-vlmeval`` gives the run's scores."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from lavender_checks import cli
from lavender_checks.run.config import MINI_LMUDATA, TINY_REFERENCE
from lavender_checks.vlmeval_io import find_prediction_file, read_prediction_file

BENCHMARK = "ChartQA_TEST"


def _metrics(report: Path) -> dict:
    return json.loads((report / "report.json").read_text())["benchmarks"][BENCHMARK]["metrics"]


def _report(out: str) -> Path:
    return Path(next(line for line in out.splitlines() if line.startswith("report: ")).removeprefix("report: "))


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """The tiny pair run on one benchmark into its own store: (store, its report)."""
    work = tmp_path_factory.mktemp("export")
    store = work / "store"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["run", "--benchmark", BENCHMARK, "--store", str(store),
                           "--reports", str(work / "reports"), "--quiet"])
    assert status == 0, out.getvalue()
    return store, _report(out.getvalue())


def test_export_then_from_vlmeval_gives_the_runs_scores(stored_run, tmp_path, capsys):
    store, report = stored_run
    out = tmp_path / "outputs"
    assert cli.main(["export", "--benchmark", BENCHMARK, "--store", str(store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for model in ("llama_vision_base", "llama_vision_lavender"):
        path = out / model / f"{model}_{BENCHMARK}.xlsx"  # VLMEvalKit's name and place
        assert f"wrote {path}" in printed
        assert find_prediction_file(out, model, BENCHMARK) == path.resolve()
        frame = read_prediction_file(path)
        tsv = pd.read_csv(MINI_LMUDATA / f"{BENCHMARK}.tsv", sep="\t", nrows=1)
        assert list(frame.columns) == [c for c in tsv.columns if c != "image"] + ["prediction"]
    assert cli.main(["run", "--from-vlmeval", str(out), "--lmu-data", str(MINI_LMUDATA),
                     "--reference", str(TINY_REFERENCE), "--benchmark", BENCHMARK,
                     "--reports", str(tmp_path / "reports"), "--quiet"]) == 0
    again = _report(capsys.readouterr().out)
    assert _metrics(again) == _metrics(report) and _metrics(report)


def test_other_model_names(stored_run, tmp_path, capsys):
    store, _ = stored_run
    out = tmp_path / "outputs"
    assert cli.main(["export", "--benchmark", BENCHMARK, "--store", str(store), "--out", str(out),
                     "--base-name", "base_m", "--lavender-name", "lav_m"]) == 0
    assert (out / "base_m" / f"base_m_{BENCHMARK}.xlsx").is_file()
    assert (out / "lav_m" / f"lav_m_{BENCHMARK}.xlsx").is_file()


def test_predictions_the_store_lacks_are_one_error_and_no_model_loads(tmp_path, capsys, monkeypatch):
    from lavender_checks.run import pair

    monkeypatch.setattr(pair, "load_model_pair", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "store").mkdir()
    assert cli.main(["export", "--benchmark", BENCHMARK, "--store", str(tmp_path / "store"),
                     "--out", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lavender-checks export: error: the store ")
    assert "run `lavender-checks run` with the same options first" in err[0]
    assert not list((tmp_path / "out").rglob("*.xlsx"))


def test_the_same_name_twice_is_refused(tmp_path, capsys):
    assert cli.main(["export", "--out", str(tmp_path), "--base-name", "m", "--lavender-name", "m"]) == 2
    assert "overwrite each other" in capsys.readouterr().err

"""`lavender-checks make-vlmeval-folder`: a full-size synthetic VLMEvalKit work dir that the
gate, reading it with `run --from-vlmeval`, passes on every verdict of the seed report.
(The scenarios' verdicts are checked in memory in tests/unit/test_fullsize_data.py.)"""

from __future__ import annotations

import pytest

from lavender_checks import cli
from lavender_checks.benchmarks import get_spec
from lavender_checks.synthetic.fullsize_data import BENCHMARKS, MODEL_NAMES
from lavender_checks.vlmeval_io import find_prediction_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlmeval-folder")
    assert cli.main(["make-vlmeval-folder", "--scenario", "reproduce", str(root / "outputs")]) == 0
    return root


@pytest.fixture(autouse=True)
def no_lmudata(tmp_path, monkeypatch):
    """$LMUData names an empty folder: no TSV of this machine is compared with the files."""
    monkeypatch.setenv("LMUData", str(tmp_path))


def test_the_folder_has_vlmevalkit_layout_and_the_tsvs(folder):
    out = folder / "outputs"
    for benchmark in BENCHMARKS:
        for model in MODEL_NAMES.values():
            assert find_prediction_file(out, model, benchmark) == out / model / f"{model}_{benchmark}.xlsx"
        assert (out / "LMUData" / get_spec(benchmark).tsv).is_file()
    assert (out / "LMUData" / "synthetic.toml").is_file()


@pytest.mark.parametrize("tsvs", [False, True], ids=["files-only", "with-lmu-data"])
def test_the_gate_passes_every_verdict_of_the_seed_report(folder, tsvs, capsys):
    capsys.readouterr()
    extra = ["--lmu-data", str(folder / "outputs" / "LMUData"), "--allow-noncomparable"] if tsvs else []
    code = cli.main(["run", "--from-vlmeval", str(folder / "outputs"), "--reports", str(folder / "reports"),
                     *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "81 pass, 0 fail, 0 missing (reproduce)" in out
    # Synthetic TSVs are never VLMEvalKit's: the run says its verdicts do not test the report.
    assert ("NOT COMPARABLE with the reference: --allow-noncomparable was given" in out) == tsvs

"""`lavender-checks make-vlmeval-folder`: a full-size synthetic VLMEvalKit work dir that the
gate, reading it with `run --from-vlmeval`, passes on every verdict of the seed report.
(The scenarios' verdicts are checked in memory in tests/unit/test_fullsize_data.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lavender_checks import REPO_ROOT
from lavender_checks.benchmarks import get_spec
from lavender_checks.synthetic.fullsize_data import BENCHMARKS, MODEL_NAMES
from lavender_checks.vlmeval_io import find_prediction_file


def _cli(*args, cwd, lmu_env):
    # $LMUData names an empty folder: no TSV of this machine is compared with the files.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LMUData": str(lmu_env)}
    return subprocess.run([sys.executable, "-m", "lavender_checks.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlmeval-folder")
    (root / "no-lmudata").mkdir()
    done = _cli("make-vlmeval-folder", "--scenario", "reproduce", str(root / "outputs"), cwd=root,
                lmu_env=root / "no-lmudata")
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_the_folder_has_vlmevalkit_layout_and_the_tsvs(folder):
    out = folder / "outputs"
    for benchmark in BENCHMARKS:
        for model in MODEL_NAMES.values():
            path = find_prediction_file(out, model, benchmark)
            assert path == out / model / f"{model}_{benchmark}.xlsx"
        assert (out / "LMUData" / get_spec(benchmark).tsv).is_file()
    assert (out / "LMUData" / "synthetic.toml").is_file()


@pytest.mark.parametrize("tsvs", [False, True], ids=["files-only", "with-lmu-data"])
def test_the_gate_passes_every_verdict_of_the_seed_report(folder, tsvs):
    extra = ["--lmu-data", str(folder / "outputs" / "LMUData"), "--allow-noncomparable"] if tsvs else []
    done = _cli("run", "--from-vlmeval", str(folder / "outputs"), "--reports", str(folder / "reports"),
                *extra, cwd=folder, lmu_env=folder / "no-lmudata")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "81 pass, 0 fail, 0 missing (reproduce)" in done.stdout
    # Synthetic TSVs are never VLMEvalKit's: the run says its verdicts do not test the report.
    assert ("NOT COMPARABLE with the reference: --allow-noncomparable was given" in done.stdout) == tsvs

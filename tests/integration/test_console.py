"""What `lavender-checks` prints (issue 12, item 13): the help opens with what the tool is,
--quiet prints no progress bar (transformers' included) and only the verdicts that did not
pass, and a run prints no FutureWarning or clean-up notice of the libraries."""

from __future__ import annotations

import os
import subprocess
import sys

from lavender_checks import FIXTURES, REPO_ROOT


def _cli(*args, tmp_path=None):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "lavender_checks.cli", *args], cwd=tmp_path or REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_help_opens_with_what_the_tool_is():
    done = _cli("--help")
    description = done.stdout.split("\n\n")[1]
    assert description.startswith("Regression gate for Llama-3.2-11B-Vision-Instruct")
    assert "lazily" not in done.stdout


def test_quiet_run_prints_no_progress_no_library_notices_and_only_problems(tmp_path):
    head, *rows = (FIXTURES / "reported" / "tiny-mini.toml").read_text().split("[[row]]")
    reference = tmp_path / "chartqa.toml"
    reference.write_text(head + "".join(f"[[row]]{r}" for r in rows if 'benchmark = "ChartQA_TEST"' in r))
    done = _cli("run", "--quiet", "--benchmark", "ChartQA_TEST", "--reference", str(reference),
                "--store", str(tmp_path / "store"), "--reports", str(tmp_path / "reports"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for noise in ("it/s", "Loading weights", "FutureWarning", "is_gradient_checkpointing",
                  "clean_up_tokenization_spaces"):
        assert noise not in done.stderr + done.stdout, noise
    lines = done.stdout.splitlines()
    assert lines[0] == "9 pass, 0 fail, 0 missing (reproduce)"  # no table of passing rows
    assert lines[1].startswith("report: ") and len(lines) == 2


def test_a_warning_is_one_notice_line_without_its_source(tmp_path):
    """--limit 1 on ChartQA (two splits) raises the limit, with a warning: one line, never
    Python's "file:line: UserWarning" with the source line under it; --quiet included."""
    done = _cli("run", "--quiet", "--benchmark", "ChartQA_TEST", "--limit", "1",
                "--store", str(tmp_path / "store"), "--reports", str(tmp_path / "reports"), tmp_path=tmp_path)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    notices = [line for line in done.stderr.splitlines() if line.strip()]
    assert "lavender-checks run: warning: ChartQA_TEST: limit 1 raised to 2 units so that every split " \
           "is represented" in notices, done.stderr
    assert all(line.startswith("lavender-checks run: warning: ") for line in notices), done.stderr

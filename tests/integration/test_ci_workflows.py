"""The CI examples of docs/ci/ (a GitHub Actions workflow, a GitLab CI job) are what a team
copies: they must be valid YAML, every command they call must exist with the options they
give it (checked against the real parsers: ``lavender_checks.cli`` for ``lavender-checks``
and ``./lc run``; pytest's own, its plugins' and the gate's options from
``run.config.add_run_options`` for ``pytest`` and ``./lc test``), they must gate in
no-regression mode with --stop-early, keep the prediction store between runs, install from
the lock and keep reports/; and their gate step must run, here on the built-in tiny pair on
CPU (the same command, the weights and data options dropped).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lavender_checks import REPO_ROOT

CI = REPO_ROOT / "docs" / "ci"
WORKFLOWS = {"github": CI / "github-actions.yml", "gitlab": CI / "gitlab-ci.yml"}
# Options of the gate step that point at real weights and data: dropped to run it on the tiny
# pair; and where it writes, pointed into the test's folder.
MODEL_OPTIONS = ("--base-model", "--lora", "--lmu-data", "--store")
OUTPUT_OPTIONS = ("--junitxml", "--reports")


@dataclass(frozen=True)
class Command:
    workflow: str  # file name
    step: str  # the step's (GitHub) or job's script line's (GitLab) name
    program: str  # "pytest" or "lavender-checks"
    args: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.workflow}, step {self.step!r}"

    @property
    def gates(self) -> bool:
        return ((self.program == "pytest" and any(a.startswith("tests/benchmarks") for a in self.args))
                or (self.program == "lavender-checks" and self.args[:1] == ("run",)))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _scripts(path: Path) -> list[tuple[str, str]]:
    """(step name, shell text) of every `run:` step (GitHub) or `script:` line (GitLab)."""
    data = _load(path)
    out = []
    if "jobs" in data:  # GitHub Actions
        for job_name, job in data["jobs"].items():
            for number, step in enumerate(job.get("steps", []), start=1):
                if "run" in step:
                    out.append((step.get("name", f"{job_name} step {number}"), step["run"]))
    else:  # GitLab CI: every mapping with a script is a job
        for job_name, job in data.items():
            if not isinstance(job, dict):
                continue
            for key in ("before_script", "script", "after_script"):
                lines = job.get(key, [])
                for number, line in enumerate([lines] if isinstance(lines, str) else lines, start=1):
                    out.append((f"{job_name} {key}[{number}]", line))
    return out


def _program(argv: list[str]) -> tuple[str, list[str]] | None:
    """("pytest" | "lavender-checks", its arguments) for a command line of ours, else None."""
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value cmd
        argv = argv[1:]
    if not argv:
        return None
    name = os.path.basename(argv[0])
    if re.fullmatch(r"python(3(\.\d+)?)?", name) and argv[1:2] == ["-m"] and len(argv) > 2:
        module = {"pytest": "pytest", "lavender_checks.cli": "lavender-checks"}.get(argv[2])
        return (module, argv[3:]) if module else None
    if name in ("pytest", "lavender-checks"):
        return name, argv[1:]
    if name == "lc":
        command = argv[1] if len(argv) > 1 else "run"
        if command == "test":
            return "pytest", argv[2:]
        return None if command == "lint" else ("lavender-checks", argv[1:])
    return None


def commands(path: Path) -> list[Command]:
    """Every `pytest ...`, `lavender-checks ...` and `./lc ...` command line of a workflow."""
    out = []
    for step, text in _scripts(path):
        text = text.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            current: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", "||", ";", "|"):
                    found = _program(current)
                    if found:
                        out.append(Command(path.name, step, found[0], tuple(found[1])))
                    current = []
                else:
                    current.append(word)
    return out


def _pytest_parser():
    """pytest's own parser with its plugins' options and the gate's (run/pytest_plugin.py)."""
    from _pytest.config import get_config

    config = get_config()
    config.pluginmanager.load_setuptools_entrypoints("pytest11")
    config.pluginmanager.import_plugin("lavender_checks.run.pytest_plugin")
    return config._parser


def problems(command: Command) -> list[str]:
    """What is wrong with one command line: options its parser does not know, values it
    refuses, test paths that do not exist."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if command.program == "pytest":
                namespace, unknown = _pytest_parser().parse_known_and_unknown_args(list(command.args))
            else:
                from lavender_checks.cli import build_parser

                namespace, unknown = build_parser().parse_known_args(list(command.args))
    except (SystemExit, pytest.UsageError) as exc:
        said = err.getvalue().strip().splitlines()
        return [f"{command.where}: {command.program} refuses its arguments: {said[-1] if said else exc}"]
    found = [f"{command.where}: {command.program} has no option {word}"
             for word in unknown if word.startswith("-")]
    if command.program == "pytest" and not found:
        found += [f"{command.where}: pytest: no such test path {target}"
                  for target in namespace.file_or_dir if not (REPO_ROOT / target.split("::")[0]).exists()]
    return found


# ---------------------------------------------------------------------------- the files


@pytest.mark.parametrize("kind", sorted(WORKFLOWS))
def test_a_workflow_gates_no_regression_keeps_the_store_and_the_reports(kind):
    path = WORKFLOWS[kind]
    data = _load(path)
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    gates = [c for c in commands(path) if c.gates]
    assert len(gates) == 1, f"{path}: one gate step expected, found {[c.step for c in gates]}"
    gate = gates[0]
    args = list(gate.args)
    assert args[args.index("--gate") + 1] == "no-regression" and "--stop-early" in args, gate
    store = args[args.index("--store") + 1]
    assert store.startswith("$"), f"{gate.where}: --store {store}: name the kept folder once, as a variable"
    installs = [text for _, text in _scripts(path) if "pip install" in text and ".[test]" in text]
    assert installs and all("-c constraints.txt" in text for text in installs), f"{path}: install from the lock"
    if kind == "github":
        env = data["env"]
        assert data.get("on", data.get(True)), f"{path}: no trigger"  # YAML 1.1 reads `on` as true
        # A self-hosted runner's folder outside the checkout outlives the job.
        kept = env[store.strip("${}")]
        assert kept.startswith("/") and "github.workspace" not in kept, kept
        job = next(iter(data["jobs"].values()))
        assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
        uploads = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
        assert uploads and uploads[0]["with"]["path"].rstrip("/") == "reports" and uploads[0]["if"] == "always()"
    else:
        job = data["lavender-gate"]
        kept = job["variables"][store.strip("${}")]
        assert f"{kept.rstrip('/')}/" in job["cache"]["paths"] and job["cache"]["when"] == "always"
        assert "reports/" in job["artifacts"]["paths"] and job["artifacts"]["when"] == "always"
        assert job["artifacts"]["reports"]["junit"] == args[args.index("--junitxml") + 1]


def test_every_command_of_the_workflows_exists_with_its_options():
    found = [p for path in WORKFLOWS.values() for c in commands(path) for p in problems(c)]
    assert found == []


def test_the_checker_names_the_step_and_the_option():
    wrong = Command("w.yml", "Gate", "pytest", ("tests/benchmarks", "--gate", "no-regression", "--stop-erly"))
    assert problems(wrong) == ["w.yml, step 'Gate': pytest has no option --stop-erly"]
    cli = Command("w.yml", "Run", "lavender-checks", ("run", "--gate", "sideways"))
    assert problems(cli)[0].startswith("w.yml, step 'Run': lavender-checks refuses its arguments: ")
    assert "invalid choice: 'sideways'" in problems(cli)[0]
    assert problems(Command("w.yml", "T", "pytest", ("tests/nowhere",))) == [
        "w.yml, step 'T': pytest: no such test path tests/nowhere"]
    assert _program(shlex.split("./lc test tests/benchmarks -n 2")) == ("pytest", ["tests/benchmarks", "-n", "2"])
    assert _program(shlex.split('X=1 "$VENV/bin/python" -m lavender_checks.cli run --quiet')) == (
        "lavender-checks", ["run", "--quiet"])
    assert _program(shlex.split("./lc lint")) is None


# ---------------------------------------------------------------------------- the gate step


def _on_the_tiny_pair(command: Command, folder: Path) -> list[str]:
    """The gate step's arguments with the weights, data and store options dropped (the tiny
    pair, the mini benchmarks, the default store), its outputs in ``folder``."""
    args, out = list(command.args), []
    while args:
        word = args.pop(0)
        flag = word.split("=", 1)[0]
        if flag in MODEL_OPTIONS + OUTPUT_OPTIONS:
            if "=" not in word:
                args.pop(0)
            if flag in OUTPUT_OPTIONS:
                out.append(f"{flag}={folder / flag.strip('-')}")
            continue
        out.append(word)
    if "--reports" not in " ".join(out):
        out.append(f"--reports={folder / 'reports'}")
    return out


@pytest.mark.slow
def test_the_gate_step_runs_on_the_tiny_pair(tmp_path):
    runs = {}
    for path in WORKFLOWS.values():
        gate = next(c for c in commands(path) if c.gates)
        runs.setdefault((gate.program, tuple(_on_the_tiny_pair(gate, tmp_path))), []).append(gate.where)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("GITHUB_STEP_SUMMARY", None)
    for (program, args), where in runs.items():
        module = "pytest" if program == "pytest" else "lavender_checks.cli"
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
        assert " pass, 0 fail, 0 missing (no-regression)" in done.stdout, done.stdout[-2000:]
        if program == "pytest":
            cases = list(ET.parse(tmp_path / "junitxml").getroot().iter("testcase"))
            assert cases and not any(c.find("failure") is not None or c.find("error") is not None for c in cases)
        assert list((tmp_path / "reports").glob("*/report.md"))

"""constraints.txt, the lock ./lc, .ci/run and docs/ci/ install from: it pins every
requirement of lavender-checks[test] to one version that pyproject.toml allows, and torch
without its build tag, so that the CPU and the CUDA builds both match it."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from lavender_checks import REPO_ROOT

LOCK = REPO_ROOT / "constraints.txt"


def _locked() -> dict[str, str]:
    pins = {}
    for number, line in enumerate(LOCK.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert match, f"constraints.txt line {number}: {line!r} is not name==version"
            name = canonicalize_name(match.group(1))
            assert name not in pins, f"constraints.txt line {number}: {name} pinned twice"
            pins[name] = match.group(2)
    return pins


def test_every_requirement_of_the_package_is_pinned_within_its_bounds():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _locked()
    for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in constraints.txt: run scripts/lock_versions.py"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt {name}=={pins[name]} is outside {text}"


def test_torch_is_pinned_for_any_build_and_the_prediction_stack_exactly():
    pins = _locked()
    for name in ("torch", "transformers", "peft", "tokenizers", "safetensors", "huggingface-hub", "numpy", "pillow"):
        assert name in pins, name
        assert Version(pins[name]).local is None, f"{name}=={pins[name]}: no build tag, or one build only matches"

"""lavender-checks: a regression gate for Llama-3.2-11B-Vision-Instruct with the Lavender LoRA."""

import os
from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout's root (in an installed package: site-packages, where nothing is written).
REPO_ROOT = PACKAGE_DIR.parent
_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
# Reference numbers, run profiles, mini benchmarks. The top-level fixtures/ of a checkout is
# the source of truth; lavender_checks/fixtures links to it, so an installed package carries it.
FIXTURES = PACKAGE_DIR / "fixtures"
# Reports (and the default prediction store) go to ./reports of the folder a run starts in.
REPORTS = Path("reports").absolute()
# Built things (the tiny checkpoints): .cache/ of a checkout, else the user's cache folder.
CACHE_ROOT = (REPO_ROOT / ".cache" if _CHECKOUT else
              Path(os.environ.get("LAVENDER_CHECKS_CACHE") or "~/.cache/lavender-checks").expanduser())

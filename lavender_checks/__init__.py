"""lavender-checks: a regression gate for Llama-3.2-11B-Vision-Instruct with the Lavender LoRA."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root (the package is used from a checkout: `pip install -e .`).
# fixtures/ (reference numbers, run profiles, mini benchmarks) and reports/ live there.
REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "fixtures"
REPORTS = REPO_ROOT / "reports"

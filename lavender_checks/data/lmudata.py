"""The LMUData folder, as VLMEvalKit finds it:

* ``$LMUData`` when it names an existing folder, else ``~/LMUData``.
"""

from __future__ import annotations

import os
from pathlib import Path

LMUDATA_ENV = "LMUData"  # VLMEvalKit's environment variable

HOW_TO_SET_LMUDATA = (
    "Set the environment variable LMUData to the folder that holds VLMEvalKit's TSV files "
    "(VLMEvalKit's own rule; without it VLMEvalKit uses ~/LMUData), or pass that folder "
    "explicitly. The synthetic mini benchmarks live in fixtures/lmudata-mini."
)


def lmudata_root(override: str | os.PathLike | None = None) -> Path:
    """The LMUData folder: ``override``, else ``$LMUData`` if it names an existing folder,
    else ``~/LMUData`` (VLMEvalKit's ``LMUDataRoot``, which also does not expand ``~`` in the
    variable). Nothing is created."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(LMUDATA_ENV)
    if env and os.path.isdir(env):
        return Path(env)
    return Path.home() / "LMUData"


def _folders_looked_at(override: str | os.PathLike | None) -> list[str]:
    if override is not None:
        return [f"{Path(override).expanduser()} (given explicitly)"]
    env = os.environ.get(LMUDATA_ENV)
    looked = []
    if env:
        state = "a folder" if os.path.isdir(env) else "not an existing folder, so not used"
        looked.append(f"$LMUData = {env} ({state})")
    else:
        looked.append("$LMUData (not set)")
    looked.append(f"{Path.home() / 'LMUData'} (VLMEvalKit's default)")
    return looked

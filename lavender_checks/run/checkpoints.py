"""Which adapters a run gates: one (``--lora DIR``, the usual run) or a series of checkpoints.

A series is ``--lora`` given more than once (``--lora A --lora B``, in that order), or one
``--lora`` naming a folder that is no adapter itself but holds adapters in its subfolders (a
fine-tuning run's ``output_dir``): ``checkpoint-N`` folders (transformers' Trainer) ordered by
their step N, then any other adapter folders by name; a subfolder that is neither a
checkpoint nor an adapter (``runs/`` of TensorBoard, hidden folders) is not part of it. With
``--from-vlmeval``, ``--lavender-name`` given more than once names the series' models.

A checkpoint is named by its folder (or VLMEvalKit model) name: the name is its variant in the
store's counts, its case ids (``test_gain[checkpoint-500-ChartQA_TEST-Overall]``) and its
column of the report, so two checkpoints of one series cannot share one. Only file names are
read here: no torch, no weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
# The variant name of the base model, which a checkpoint cannot take (model.BASE_VARIANT).
RESERVED_NAME = "base"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STEP_IN_NAME = re.compile(r"checkpoint-(\d+)(?!.*checkpoint-\d)")


class SeriesInputError(ValueError):
    """Adapters that cannot form a series (no adapter, two of one name, a broken checkpoint)."""


@dataclass(frozen=True)
class Checkpoint:
    """One adapter of a series: its name, its folder (None for a VLMEvalKit model name) and its
    training step when the name carries one (``checkpoint-500`` -> 500)."""

    name: str
    path: Path | None
    step: int | None

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path) if self.path else None, "step": self.step}


def step_of(name: str) -> int | None:
    """The step a Trainer checkpoint's name carries (``checkpoint-500``, ``run_checkpoint-500``)."""
    match = _STEP_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def is_adapter_folder(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_series(lora: Path | tuple[Path, ...] | None) -> tuple[Checkpoint, ...] | None:
    """The checkpoints of a series, in order; None when ``lora`` is one adapter (or none).

    A folder with no adapter in it (nor a ``checkpoint-*`` folder) is no series: the usual
    run refuses it as it refuses any folder that is not an adapter. Raises SeriesInputError,
    naming the option and folder, for a ``checkpoint-*`` folder without ``adapter_config.json``
    beside good ones, an adapter folder given twice or two of one name, or a name the base
    model's variant holds.
    """
    if lora is None:
        return None
    if isinstance(lora, tuple):
        found = [_given_adapter(Path(path)) for path in lora]
    else:
        folder = Path(lora)
        if not folder.is_dir() or is_adapter_folder(folder):
            return None  # one adapter: the usual run, whose own checks name what is wrong
        found = _adapters_in(folder)
        if not found:
            return None  # no adapter anywhere: the usual run's checks say so, as for any folder
    _check_names(found)
    return tuple(found)


def names_series(names: str | tuple[str, ...]) -> tuple[Checkpoint, ...] | None:
    """``--from-vlmeval``: the series of VLMEvalKit model names (None for one name)."""
    if isinstance(names, str):
        return None
    found = [Checkpoint(name, None, step_of(name)) for name in names]
    _check_names(found, option="--lavender-name")
    return tuple(found)


def _given_adapter(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise SeriesInputError(f"--lora {path}: no such folder")
    if not is_adapter_folder(path):
        raise SeriesInputError(f"--lora {path}: no {ADAPTER_CONFIG} there; each of several --lora "
                               "must be one adapter folder (a folder of checkpoints goes alone)")
    return Checkpoint(path.name, path, step_of(path.name))


def _adapters_in(folder: Path) -> list[Checkpoint]:
    checkpoints, others, broken = [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _CHECKPOINT.match(sub.name)
        if is_adapter_folder(sub):
            (checkpoints if match else others).append(
                Checkpoint(sub.name, sub, int(match.group(1)) if match else None))
        elif match:
            broken.append(sub)
    if broken:
        raise SeriesInputError(
            f"--lora {folder}: {', '.join(p.name for p in broken)} has no {ADAPTER_CONFIG} "
            "(a checkpoint saved halfway, or not a LoRA run's); remove it or give the good "
            "checkpoints with --lora each")
    checkpoints.sort(key=lambda c: c.step)
    return checkpoints + others


def _check_names(found: list[Checkpoint], option: str = "--lora") -> None:
    seen: dict[str, Checkpoint] = {}
    for checkpoint in found:
        if checkpoint.name == RESERVED_NAME:
            raise SeriesInputError(f"{option} {checkpoint.path or checkpoint.name}: the name "
                                   f"{RESERVED_NAME!r} is the base model's; rename the folder")
        if checkpoint.name in seen:
            first = seen[checkpoint.name]
            where = (f"{first.path} and {checkpoint.path}" if checkpoint.path else "twice")
            raise SeriesInputError(
                f"{option}: two adapters are named {checkpoint.name!r} ({where}); the checkpoints "
                "of a series are told apart by their names")
        seen[checkpoint.name] = checkpoint


def check_series(base: Path, lora: Path | tuple[Path, ...] | None) -> tuple[Checkpoint, ...] | None:
    """``adapter_series``, and each checkpoint's tensors against the base model's shapes
    (``model.check_adapter_fits``: file headers only, no weights), so that an adapter made for
    another model stops the run before any model loads, naming it."""
    series = adapter_series(lora)
    if series is not None:
        from lavender_checks.model import check_adapter_fits

        for checkpoint in series:
            check_adapter_fits(base, checkpoint.path)
    return series

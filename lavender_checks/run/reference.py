"""Recording a run's numbers as a reference file (``lavender-checks run --write-reference``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from lavender_checks import FIXTURES
from lavender_checks.model import VARIANTS
from lavender_checks.outputs import check_output_file, write_file
from lavender_checks.run.collect import RunResults
from lavender_checks.run.config import SEED_REFERENCE, RunConfig, RunInputError

TINY_REFERENCE_DESCRIPTION = (
    "The built-in tiny pair's own numbers on the mini benchmarks (fixtures/lmudata-mini), "
    "recorded with the seed report's profile. They say nothing about Llama-3.2-11B-Vision or "
    "Lavender: the default gate uses them to check that the whole chain (data, prompts, "
    "generation, store, scoring, gate) reproduces itself."
)


def check_target(path: str | Path, *, force: bool = False) -> None:
    """Before any work: ``--write-reference`` can write ``path`` (not a folder, in a folder this
    process can write to) and, without ``force``, no file is there yet."""
    path = Path(path)
    check_output_file("--write-reference", path)
    if path.exists() and not force:
        raise RunInputError(f"--write-reference {path}: the file exists; add --force to replace it")


def write_reference(run: RunResults, path: str | Path, *, template: str | Path = SEED_REFERENCE,
                    description: str = "", force: bool = False) -> Path:
    """Record this run's numbers as a reference file (the schema of ``fixtures/reported``).

    The rows are the template's (the same tables, labels and metrics), their numbers this
    run's, each rounded to 2 decimals as a report prints them (delta = the difference of the
    rounded numbers); [gate] and [derived] are the template's. A row this run did not measure
    is an error: a reference holds no number that was not computed, and so is a subset
    (``--limit``, ``--fraction``, a shard). An existing file is replaced only with ``force``; the
    file is written whole (``outputs.write_file``).
    """
    from lavender_checks.gate.verdicts import load_reference

    path = Path(path)
    refuse_subset(run.config)
    check_target(path, force=force)
    template_ref = load_reference(template)
    rows, unmeasured = [], []
    for row in template_ref.rows:
        entry = run.results.get(row.benchmark) or {}
        values = {}
        for variant in VARIANTS:
            result = entry.get(variant)
            if result is None or any(k not in result.metrics for k in row.parts):
                unmeasured.append(f"{row.id} {variant}")
                continue
            values[variant] = round(sum(float(result.metrics[k]) for k in row.parts), 2) + 0.0
        if len(values) == 2:
            rows.append((row, values["base"], values["lavender"]))
    if unmeasured:
        raise RunInputError(f"cannot record a reference from this run: not measured: {', '.join(unmeasured)}")

    meta = run.metadata
    settings = {
        "source": f"lavender-checks run ({run.config.label()})",
        "description": description or f"The numbers of one lavender-checks run ({run.config.label()}).",
        "benchmarks": [b for b in template_ref.benchmarks if b in run.results],
        "profile": meta.get("profile", {}).get("name", run.config.profile),
        "profile_fingerprint": meta.get("profile", {}).get("fingerprint"),
        "base_fingerprint": meta.get("fingerprints", {}).get("base"),
        "adapter_fingerprint": meta.get("fingerprints", {}).get("adapter"),
        "lmu_data_md5": {b: d.get("md5") for b, d in meta.get("data", {}).items() if d.get("md5")},
        "greedy": True,
        "template": _fixtures_relative(template_ref.path),
    }
    gate = template_ref.gate
    document: dict[str, Any] = {
        "run": {key: value for key, value in settings.items() if value is not None},
        "gate": {"confidence": gate.confidence, "n_resamples": gate.n_resamples, "seed": gate.seed,
                 "stop_early_alpha": gate.stop_early_alpha,
                 "consistency_tolerance": gate.consistency_tolerance, "floor": dict(gate.floors)},
        "derived": {benchmark: {name: list(parts) for name, parts in derived.items()}
                    for benchmark, derived in template_ref.derived.items()},
    }
    if not document["derived"]:
        del document["derived"]
    # Each row as its own [[row]] table, as in the hand-written files (tomli-w would put short
    # tables inline); tomli-w writes every value.
    row_tables = []
    for row, base, lavender in rows:
        table = {"table": row.table, "subtable": row.subtable, "label": row.label,
                 "benchmark": row.benchmark, "metric": row.metric, "unit": row.unit,
                 "base": base, "lavender": lavender, "delta": round(lavender - base, 2) + 0.0}
        row_tables.append("[[row]]\n" + tomli_w.dumps({k: v for k, v in table.items() if v is not None}))
    text = "\n".join([
        f"# Reference numbers recorded by `lavender-checks run --write-reference` from "
        f"{_fixtures_relative(template_ref.path)}'s rows.\n"
        "# Schema: see fixtures/reported/seed-report.toml.\n",
        tomli_w.dumps(document), *row_tables])
    write_file("--write-reference", path, lambda fh: fh.write(text))
    load_reference(path)  # what was written reads back as a valid reference
    return path


def refuse_subset(config: RunConfig) -> None:
    """A subset's numbers are a sample of the benchmark's, not the benchmark's: recorded as a
    reference they would be gated as the whole benchmark's (bands for the whole, not a sample)."""
    chosen = [flag for flag, value in (("--limit", config.limit), ("--fraction", config.fraction))
              if value is not None]
    if config.shard is not None:
        chosen.append(f"shard {config.shard[0]} of {config.shard[1]}")
    if chosen:
        raise RunInputError(f"--write-reference records the whole benchmarks' numbers, not a subset's: "
                            f"drop {' and '.join(chosen)}")


def _fixtures_relative(path: Path) -> str:
    """``fixtures/...`` for a file of the fixtures (in a checkout or an installed package)."""
    try:
        return str(Path("fixtures") / Path(path).resolve().relative_to(FIXTURES.resolve()))
    except ValueError:
        return str(path)

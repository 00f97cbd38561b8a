"""``lavender-checks export``: a run's predictions, read from the prediction store, written as
VLMEvalKit's prediction files, so that VLMEvalKit's own evaluation can be run on them.

For the pair, profile and LMUData given (the options of ``lavender-checks run``), every
benchmark's predictions of both variants are read from the store as a run would reuse them
(the same store keys and prompt hashes; no weights are loaded) and written as
``OUT/<model>/<model>_<dataset>.xlsx`` (``--base-name``, ``--lavender-name``; VLMEvalKit's
file names and layout: ``run.store.export_vlmeval``). ``lavender-checks run --from-vlmeval OUT``
reads them back to the same scores. Rows the store does not hold are an error: run
``lavender-checks run`` with the same options first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lavender_checks.errors import EXIT_INPUT, EXIT_OK, error_line
from lavender_checks.model import VARIANTS
from lavender_checks.run.config import RUN_OPTIONS, RunInputError, check_inputs, config_from_options, input_errors

__all__ = ["add_arguments", "main", "export_run"]

SUFFIXES = ("xlsx", "tsv", "json")  # VLMEvalKit's PRED_FORMAT choices


# The run options that decide which stored predictions are the run's (the store key, the
# rows) and how the files are named; the others (gating, generation, reports) do not apply.
_OPTIONS = ("--base-model", "--lora", "--lmu-data", "--benchmark", "--profile", "--limit", "--fraction",
            "--base-name", "--lavender-name", "--store", "--device", "--dtype", "--no-batch-invariance")


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, metavar="DIR", required=True,
                        help="the VLMEvalKit work dir to write: OUT/<model>/<model>_<dataset>.xlsx")
    parser.add_argument("--format", choices=SUFFIXES, default="xlsx",
                        help="file type, as VLMEvalKit's PRED_FORMAT (default xlsx)")
    for flag, kwargs in RUN_OPTIONS:
        if flag in _OPTIONS:
            parser.add_argument(flag, **kwargs)


def main(args) -> int:
    defaults = {kwargs.get("dest", flag[2:].replace("-", "_")): kwargs.get("default")
                for flag, kwargs in RUN_OPTIONS}
    from lavender_checks.notices import one_line_notices

    try:
        with one_line_notices("export"):
            config = config_from_options(lambda dest: getattr(args, dest, defaults[dest]))
            written, missing = export_run(config, args.out, suffix=args.format)
    except input_errors() as exc:
        print(error_line("export", exc), file=sys.stderr)
        return EXIT_INPUT
    for path in written:
        print(f"wrote {path}")
    for benchmark, reason in missing.items():
        print(f"missing {benchmark}: {reason}")
    return EXIT_OK


def export_run(config, out: Path, *, suffix: str = "xlsx") -> tuple[list[Path], dict[str, str]]:
    """Write the stored predictions of ``config``'s run under ``out``; returns the files written
    and the benchmarks left out (their TSV absent), with why."""
    from lavender_checks.data import load_benchmark
    from lavender_checks.run.collect import collect_results
    from lavender_checks.run.store import DEFAULT_ROOT, export_vlmeval

    if config.base_name == config.lavender_name:
        raise RunInputError(f"--base-name and --lavender-name are both {config.base_name!r}: "
                            "the two models' files would overwrite each other")
    check_inputs(config)
    if out.exists() and not out.is_dir():
        raise RunInputError(f"--out {out}: is a file, not a folder")
    store = config.store or DEFAULT_ROOT
    if not store.is_dir():
        raise RunInputError(f"--store {store}: no such folder (nothing was run into it)")

    def not_stored():
        raise RunInputError(f"the store {store} does not hold every prediction of this run (base, "
                            "adapter, profile, LMUData and subset as given): run `lavender-checks "
                            "run` with the same options first")

    run = collect_results(config, load_pair=not_stored, progress=False)
    names = {"base": config.base_name, "lavender": config.lavender_name}
    written = []
    for bench in config.selected:
        if bench.name in run.missing:
            continue
        frame = load_benchmark(bench, config.lmu_root()).frame
        for variant in VARIANTS:
            predictions = run.predictions[bench.name][variant]
            rows = frame[frame["index"].isin(predictions.keys())]
            written.append(export_vlmeval(rows, predictions, out / names[variant], names[variant],
                                          bench.name, suffix=suffix))
    return written, dict(run.missing)

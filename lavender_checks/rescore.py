"""`lavender-checks score`: score a VLMEvalKit prediction file exactly as VLMEvalKit does.

    lavender-checks score ChartQA_TEST outputs/llama/T20261101-120000/llama_ChartQA_TEST.xlsx
    lavender-checks score MME preds.xlsx --json --samples mme_samples.jsonl

No model is loaded and no LLM judge is called (VLMEvalKit falls back to exact matching
without one). Cached ``_result.pkl`` / ``_auxmatch.xlsx`` files next to the prediction
file are ignored: they can hold stale scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lavender_checks.errors import EXIT_INPUT, error_line
from lavender_checks.outputs import OutputFileError, check_output_file, write_file

# pandas and the scorers are imported inside main(): building the CLI parser stays cheap.

# A file or benchmark that cannot be scored is bad input, as for `run` (lavender_checks.errors).
EXIT_ERROR = EXIT_INPUT
EXIT_UNKNOWN_BENCHMARK = EXIT_INPUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", metavar="BENCHMARK",
                        help="VLMEvalKit dataset name, e.g. DocVQA_VAL, ChartQA_TEST, MMBench_DEV_EN, MME")
    parser.add_argument("predictions_file", metavar="PREDICTIONS_FILE", type=Path,
                        help="VLMEvalKit prediction file <model>_<dataset>.xlsx (or .tsv/.csv/.json/.jsonl)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object metric -> value (VLMEvalKit key names; MMBench in percent)")
    parser.add_argument("--samples", metavar="OUT.jsonl", type=Path,
                        help="write one JSON line per prediction row (index, score, extracted answer, ...)")
    parser.add_argument("--meta", metavar="TSV", type=Path,
                        help="the benchmark TSV: check that every predicted index belongs to it "
                             "(MMBench then takes the ground truth from it, as VLMEvalKit does)")


class MetaFileError(ValueError):
    """A ``--meta`` TSV that cannot be read; the message names the option and the file."""


def _read_meta(path: Path):
    """The benchmark TSV as VLMEvalKit reads it (tab-separated, default NA handling),
    without the large ``image`` column."""
    import pandas as pd

    if path.is_dir():
        raise MetaFileError(f"--meta {path}: a folder, not the benchmark TSV")
    if not path.is_file():
        raise MetaFileError(f"--meta {path}: benchmark TSV not found")
    try:
        return pd.read_csv(path, sep="\t", usecols=lambda column: column != "image")
    except Exception as err:
        raise MetaFileError(f"--meta {path}: cannot read it as a TSV: {type(err).__name__}: {err}") from err


def _plain(value):
    """A samples cell as a JSON value (numpy scalars to Python, NaN to null)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is not None and not isinstance(value, (str, int, float, bool)):
        import pandas as pd

        return None if pd.isna(value) else str(value)
    return value


def _write_samples(samples, path: Path) -> None:
    columns = list(samples.columns)

    def write(fh) -> None:
        for row in samples.itertuples(index=False, name=None):
            record = {column: _plain(value) for column, value in zip(columns, row)}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    write_file("--samples", path, write)


def _print_table(benchmark: str, source: Path, rows: int, metrics: dict[str, float]) -> None:
    width = max(len("metric"), *(len(key) for key in metrics))
    print(f"{benchmark}: {source} ({rows} prediction rows)")
    print(f"{'metric':<{width}}  value")
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value!r}")


def main(args: argparse.Namespace) -> int:
    from lavender_checks.benchmarks import UnknownBenchmark, get_benchmark
    from lavender_checks.benchmarks.signature import SignatureMismatch, check_questions, check_signature
    from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
    from lavender_checks.vlmeval_io import PredictionFileError, read_prediction_file

    try:
        benchmark = get_benchmark(args.benchmark)
    except UnknownBenchmark as err:
        print(error_line("score", err), file=sys.stderr)
        return EXIT_UNKNOWN_BENCHMARK

    source = Path(args.predictions_file)
    try:
        if args.samples:  # before reading and scoring: the file is written last
            check_output_file("--samples", Path(args.samples))
        frame = read_prediction_file(source)
        # Another benchmark's file would be scored without a word (its rows, this benchmark's
        # metric keys): refuse it, saying what it looks like.
        check_signature(frame, benchmark.name, str(source))
        meta = _read_meta(Path(args.meta)) if args.meta else None
        if meta is not None:
            check_signature(meta, benchmark.name, f"--meta {args.meta}")
        result = benchmark.score(frame, meta)
        if meta is not None:
            check_questions(frame, meta, str(source), f"--meta {args.meta}")
    except (SignatureMismatch, OutputFileError, MetaFileError) as err:
        print(error_line("score", err), file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, PredictionFileError) as err:
        print(error_line("score", err), file=sys.stderr)
        return EXIT_ERROR
    except (ScoringInputError, ValueError) as err:
        print(error_line("score", f"{source}: {err}"), file=sys.stderr)
        return EXIT_ERROR

    if args.samples:
        try:
            _write_samples(result.samples, Path(args.samples))
        except OutputFileError as err:
            print(error_line("score", err), file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        print(json.dumps(result.metrics))
    else:
        _print_table(benchmark.name, source, len(frame), result.metrics)
    if result.noncomparable:  # computed as VLMEvalKit would, but not the metric it reports
        print(f"NOT THE REPORTED METRIC: {benchmark.name} {source}: {result.noncomparable}", file=sys.stderr)
    return 0

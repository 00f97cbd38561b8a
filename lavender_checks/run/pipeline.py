"""``lavender-checks run``: the main job. Predictions of base and Lavender on the benchmarks,
scores, gate, report.

The stages live beside this module: ``config`` (RunConfig and the options shared with the
pytest plugin), ``pair`` (the model pair, loaded only to generate), ``predict`` and ``store``
(predictions through the resumable store), ``shards`` (sharing the generation among
processes), ``collect`` (generated or ``--from-vlmeval`` results, scored), ``judge``
(verdicts and report) and ``reference`` (``--write-reference``). Under torchrun
(``distributed``) each rank generates its shard and rank 0 alone scores, gates and reports.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lavender_checks.errors import EXIT_GATE_FAILED, EXIT_INPUT, EXIT_OK, EXIT_RANK_FAILED, error_line
from lavender_checks.run import distributed, series
from lavender_checks.run.collect import RunResults
from lavender_checks.run.config import (
    SEED_REFERENCE,
    RunConfig,
    RunInputError,
    add_run_options,
    check_before_work,
    config_from_options,
    input_errors,
)
from lavender_checks.run.reference import TINY_REFERENCE_DESCRIPTION, check_target, refuse_subset, write_reference

__all__ = ["add_arguments", "checked", "main", "torchrun_shards"]


def add_arguments(parser) -> None:
    add_run_options(parser.add_argument)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (transformers' included); only the verdicts that did not pass")
    parser.add_argument("--write-reference", type=Path, metavar="FILE", default=None,
                        help="record this run's numbers as a reference file (the rows of --reference, "
                             "default seed-report.toml) instead of gating it")
    parser.add_argument("--force", action="store_true",
                        help="with --write-reference: replace the file if it exists")


def main(args) -> int:
    """The exit status of one run; bad input and a failed rank end it with one line, and
    warnings show as one-line notices (``notices``)."""
    from lavender_checks.notices import one_line_notices

    try:
        with one_line_notices("run", quiet=args.quiet, libraries=args.from_vlmeval is None):
            return _run(args)
    except input_errors() as exc:
        return _failed(error_line("run", exc), EXIT_INPUT)
    except distributed.RankFailure as exc:
        return _failed(error_line("run", exc), EXIT_RANK_FAILED)


def _failed(line: str, status: int) -> int:
    print(line, file=sys.stderr)
    distributed.leave_failure_to_launcher(line)  # under torchrun: a short summary
    return status


def _run(args) -> int:
    config = config_from_options(lambda dest: getattr(args, dest))
    distributed.check_options(args.store_sharing, args.dist_timeout)
    if args.force and args.write_reference is None:
        raise RunInputError("--force only applies to --write-reference")
    if args.write_reference is not None:  # a reference records a complete run of one adapter
        refuse_subset(config)
        if config.stop_early:
            raise RunInputError("--write-reference records a complete run's numbers: drop --stop-early")
    shards = torchrun_shards(config, args.store_sharing, args.dist_timeout)
    # Under torchrun only rank 0 writes reports, or the reference.
    scores = shards is None or shards.scores
    writes = args.write_reference is None and scores

    def check() -> None:
        check_before_work(config, reports=args.reports if writes else None, keep_reports=args.keep_reports)
        if args.write_reference is not None and scores:  # before the work, not after it
            check_target(args.write_reference, force=args.force)

    checked(shards, check)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:
        _quiet_library_progress()
    if args.write_reference is not None:
        series.refuse_write_reference(config)  # after the checks: they name a missing --lora first
        return _record_reference(config, args, shards)
    run = _collect(config, shards, progress=not args.quiet)
    if run is None:
        print(shards.skip_reason())
        return EXIT_OK
    outcome = series.judge_any(run)  # a checkpoint series: each checkpoint on its own
    path = series.write_any_report(run, outcome, reports_root=args.reports, keep=args.keep_reports)
    from lavender_checks.gate.verdicts import noncomparable_notice, unchecked, unchecked_notice

    print(outcome.table(only_problems=args.quiet))
    for benchmark, reason in run.missing.items():
        print(f"missing {benchmark}: {reason}")
    if unchecked(run.metadata):
        print(unchecked_notice(unchecked(run.metadata)))
    print(f"report: {path}")
    early = outcome.early_stop  # a series: each checkpoint's line
    if early is not None:
        print(early.headline())
    problems = outcome.noncomparable
    if problems:  # last, where a reader looks first
        print(noncomparable_notice(problems, config.allow_noncomparable))
    passed = outcome.passed and (not problems or config.allow_noncomparable)
    from lavender_checks.gate import step_summary

    step_summary.append(step_summary.page(
        "lavender-checks run:", passed, step_summary.verdict_table(outcome.verdicts),
        notices=[noncomparable_notice(problems, config.allow_noncomparable)], missing=run.missing,
        report=path))
    return EXIT_OK if passed else EXIT_GATE_FAILED


def _quiet_library_progress() -> None:
    """--quiet: transformers' and huggingface_hub's progress bars (loading weights) off too."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _record_reference(config: RunConfig, args, shards: distributed.TorchrunShards | None) -> int:
    from lavender_checks.gate.verdicts import load_reference

    template = config.reference or SEED_REFERENCE
    description = TINY_REFERENCE_DESCRIPTION if config.builtin_model and config.lmu_data is None else ""
    load_reference(template)
    run = _collect(config, shards, progress=not args.quiet)
    if run is None:
        print(shards.skip_reason())
        return EXIT_OK
    path = write_reference(run, args.write_reference, template=template, description=description,
                           force=args.force)
    print(f"reference: {path}")
    return EXIT_OK


def torchrun_shards(config: RunConfig, store_sharing: str = "auto",
                    timeout_s: float = distributed.DEFAULT_TIMEOUT_S) -> distributed.TorchrunShards | None:
    """Under torchrun, this rank's share of the run (its GPU pinned, the gloo group joined);
    None otherwise."""
    if not distributed.launched():
        return None
    if config.shard is not None:
        raise RunInputError("under torchrun each rank generates shard RANK of WORLD_SIZE: "
                            "do not give a shard as well")
    if config.from_vlmeval is not None:
        raise RunInputError("--from-vlmeval scores files and loads no model: run it without torchrun")
    distributed.check_device(config.device)
    from lavender_checks.run.store import DEFAULT_ROOT

    distributed.pin_local_gpu(distributed.visible_gpus())
    return distributed.TorchrunShards(distributed.group(timeout_s), config.store or DEFAULT_ROOT,
                                      store_sharing)


def checked(shards: distributed.TorchrunShards | None, check) -> None:
    """``check()``; under torchrun on every rank, all of them stopping when one fails."""
    if shards is None:
        check()
    else:
        shards.check(check)


def _collect(config: RunConfig, shards: distributed.TorchrunShards | None, *,
             progress: bool) -> RunResults | series.SeriesResults | None:
    if shards is None:
        return series.collect_run(config, progress=progress)
    return series.collect_run(config, shard=(shards.own, shards.count), wait_for_shards=shards,
                              writer=shards.writer, progress=progress)

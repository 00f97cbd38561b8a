"""A series of checkpoints in one run: one weight copy of the base model, each checkpoint's
adapter beside it, base predictions generated once, each checkpoint gated on its own.

Which adapters make a series: ``run.checkpoints``. The flow, as data::

    collect_series: collect_results over the variants base + each checkpoint's name, one
        engine and one store (a SeriesPair: model.load_series_pair), -n N / torchrun alike;
        or, with --from-vlmeval, one collect per --lavender-name
    -> gate_checkpoint, per checkpoint: its own RunResults (base + that checkpoint, as a
        one-adapter run would have them) and its own verdicts and bands (run.judge.judge_run)
    -> SeriesOutcome: the exit status judges the last checkpoint (the candidate) or, with
        --gate-series all, every one; the first checkpoint from which every verdict passes
    -> write_series_report: the candidate's report with the trend (gate/trend.py) added.

Each checkpoint's predictions are stored under its own adapter fingerprint and the base's
under none, so a rerun with one more checkpoint generates that checkpoint only. A checkpoint
whose adapter fails the fixed-input check (``model.AdapterRefused``: it changes nothing, as
at step 0) gets missing verdicts saying so; the others are gated.

With ``--stop-early`` each checkpoint stops on its own: the rounds (``run.rounds.run_rounds_each``)
generate the base and every checkpoint still going; a stopped checkpoint's ``RunResults``
carries its own ``early_stop`` record and is judged as a stopped one-adapter run; the rounds
end once every checkpoint the exit status counts has stopped (``SeriesStops``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS
from lavender_checks.model import BASE_VARIANT, LAVENDER_VARIANT
from lavender_checks.run.checkpoints import Checkpoint, adapter_series, names_series
from lavender_checks.run.collect import RunResults, collect_results
from lavender_checks.run.config import RunConfig, RunInputError
from lavender_checks.run.judge import GateOutcome, judge_run, prune_reports, run_reference
from lavender_checks.run.pair import LazyPair, load_model_pair

__all__ = ["CheckpointOutcome", "SeriesOutcome", "SeriesResults", "candidate_config", "checkpoint_config",
           "collect_run", "collect_series", "gate_checkpoint", "judge_any", "judge_series",
           "load_run_pair", "series_of", "write_any_report", "write_series_report"]


def series_of(config: RunConfig) -> tuple[Checkpoint, ...] | None:
    """The checkpoints of the run's series, in order; None for a one-adapter run."""
    if config.from_vlmeval is not None:
        return names_series(config.lavender_name)
    if config.base_model is None:
        return None
    return adapter_series(config.lora)


def checkpoint_config(config: RunConfig, checkpoint: Checkpoint) -> RunConfig:
    """The configuration of a one-adapter run of ``checkpoint`` (its label, its report)."""
    if config.from_vlmeval is not None:
        return dataclasses.replace(config, lavender_name=checkpoint.name)
    return dataclasses.replace(config, lora=checkpoint.path)


def candidate_config(config: RunConfig) -> RunConfig:
    """The configuration the snapshots are taken of: the series' last checkpoint, else the run's."""
    series = series_of(config)
    return checkpoint_config(config, series[-1]) if series else config


# ----------------------------------------------------------------------------- the pair


@dataclasses.dataclass
class SeriesIdentity:
    """What a series' predictions are keyed by, read without loading weights: the base's
    identity and each checkpoint's adapter fingerprint."""

    processor: Any
    base_fingerprint: str
    adapter_fingerprints: dict[str, str]
    device: Any
    dtype: Any
    base_path: Path
    adapter_paths: dict[str, str]
    adapter_fingerprint: None = None  # a series has one per checkpoint

    def describe(self) -> dict[str, Any]:
        return {"base_path": str(self.base_path), "base_fingerprint": self.base_fingerprint,
                "adapters": [{"name": name, "path": self.adapter_paths[name], "fingerprint": fingerprint}
                             for name, fingerprint in self.adapter_fingerprints.items()],
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


def series_identity(config: RunConfig, checkpoints: tuple[Checkpoint, ...]) -> SeriesIdentity:
    from lavender_checks.model import adapter_fingerprint, read_pair_identity

    base = read_pair_identity(config.base_model, None, device=config.device, dtype=config.dtype)
    return SeriesIdentity(
        processor=base.processor, base_fingerprint=base.base_fingerprint,
        adapter_fingerprints={c.name: adapter_fingerprint(c.path) for c in checkpoints},
        device=base.device, dtype=base.dtype, base_path=config.base_model,
        adapter_paths={c.name: str(c.path) for c in checkpoints})


def load_series(config: RunConfig, checkpoints: tuple[Checkpoint, ...]):
    """The base model once, every checkpoint's adapter beside it (``model.SeriesPair``)."""
    from lavender_checks.model import load_series_pair

    return load_series_pair(config.base_model, [(c.name, c.path) for c in checkpoints],
                            device=config.device, dtype=config.dtype)


def load_run_pair(config: RunConfig):
    """The run's model: a series' ``SeriesPair``, else ``run.pair.load_model_pair``."""
    series = series_of(config)
    return load_series(config, series) if series else load_model_pair(config)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class SeriesResults:
    """What a series run computed: each checkpoint's results as a one-adapter run of it would
    have them (``runs``, in series order), and how many predictions each variant generated
    and reused (``predictions``: benchmark -> variant -> counts; variants ``base`` and each
    checkpoint's name)."""

    config: RunConfig
    checkpoints: tuple[Checkpoint, ...]
    runs: dict[str, RunResults]
    predictions: dict[str, dict[str, dict[str, Any]]]
    metadata: dict[str, Any]

    @property
    def candidate(self) -> RunResults:
        return self.runs[self.checkpoints[-1].name]

    @property
    def missing(self) -> dict[str, str]:
        return self.candidate.missing


def collect_series(config: RunConfig, checkpoints: tuple[Checkpoint, ...] | None = None, *,
                   load_pair: Callable[[], Any] | None = None, **options: Any) -> SeriesResults | None:
    """Predictions and scores of the base and every checkpoint (module docstring). ``options``
    are ``collect_results``'s (shard, wait_for_shards, writer, progress); None on a torchrun
    rank that does not score."""
    checkpoints = checkpoints or series_of(config)
    if config.from_vlmeval is not None:
        return _series_from_vlmeval(config, checkpoints)
    names = tuple(c.name for c in checkpoints)
    pair = LazyPair(series_identity(config, checkpoints), load_pair or (lambda: load_series(config, checkpoints)))
    combined = collect_results(config, pair=pair, variants=(BASE_VARIANT, *names),
                               stop_early_split=stop_early_split(config, checkpoints), **options)
    if combined is None:
        return None
    fingerprints = pair.identity.adapter_fingerprints
    runs = {c.name: checkpoint_run(combined, config, c, fingerprints[c.name]) for c in checkpoints}
    # every variant, a refused checkpoint's too (nothing generated, nothing reused)
    predictions = {benchmark: {variant: _counts(per_variant.get(variant)) for variant in (BASE_VARIANT, *names)}
                   for benchmark, per_variant in combined.metadata["predictions"].items()}
    return SeriesResults(config, checkpoints, runs, predictions, _series_metadata(config, checkpoints, combined))


def stop_early_split(config: RunConfig, checkpoints: tuple[Checkpoint, ...]) -> int:
    """How many checkpoints share ``--stop-early``'s alpha: every one the exit status counts
    (``--gate-series all``); with ``last`` each checkpoint's verdicts hold at the whole alpha,
    and the exit status hangs on the last one's alone."""
    return len(checkpoints) if config.gate_series == "all" else 1


def checkpoint_run(combined: RunResults, config: RunConfig, checkpoint: Checkpoint,
                   fingerprint: str | None) -> RunResults:
    """One checkpoint's results out of a series' (variants base + every checkpoint): what a
    one-adapter run of it gives, its variant named ``lavender``, its adapter's fingerprint."""
    name = checkpoint.name
    own = checkpoint_config(config, checkpoint)
    refused = combined.metadata.get("refused", {}).get(name)
    missing = dict(combined.missing)
    if refused:
        missing.update({b: f"{name}: adapter refused: {refused}" for b in combined.results if b not in missing})
    results = {b: {BASE_VARIANT: r.get(BASE_VARIANT), LAVENDER_VARIANT: r.get(name)}
               for b, r in combined.results.items()}
    predictions = {b: {BASE_VARIANT: p.get(BASE_VARIANT, {}), LAVENDER_VARIANT: p.get(name, {})}
                   for b, p in combined.predictions.items()}
    metadata = dict(combined.metadata)
    early = combined.early_stops.get(name)  # --stop-early: each checkpoint stops on its own
    metadata.pop("early_stops", None)
    metadata.pop("early_stop", None)
    if early is not None:
        metadata["early_stop"] = early.describe()
    metadata.update(
        label=own.label(), config=own.describe(), missing=dict(missing),
        fingerprints={"base": combined.metadata["fingerprints"]["base"], "adapter": fingerprint},
        predictions={b: {BASE_VARIANT: c.get(BASE_VARIANT), LAVENDER_VARIANT: c.get(name)}
                     for b, c in combined.metadata["predictions"].items()},
        checkpoint={**checkpoint.describe(), "refused": refused})
    return RunResults(config=own, results=results, missing=missing, predictions=predictions, metadata=metadata,
                      early_stop=early)


def _counts(count: dict[str, Any] | None) -> dict[str, Any]:
    if count is None:
        return {"generated": 0, "reused": 0}
    return {"generated": int(count.get("generated", 0)), "reused": int(count.get("reused", 0)),
            **{k: count[k] for k in ("read",) if k in count}}


def _series_metadata(config: RunConfig, checkpoints: tuple[Checkpoint, ...], combined: RunResults | None
                     ) -> dict[str, Any]:
    return {"checkpoints": [c.describe() for c in checkpoints], "gate_series": config.gate_series,
            "label": config.label(),
            "refused": dict(combined.metadata.get("refused", {})) if combined is not None else {}}


def _series_from_vlmeval(config: RunConfig, checkpoints: tuple[Checkpoint, ...]) -> SeriesResults:
    """--from-vlmeval with several --lavender-name: each checkpoint's files read and scored as a
    one-model run reads them (the base's files are read for each; no model, no GPU)."""
    from lavender_checks.run.collect import alpha_scope

    split = stop_early_split(config, checkpoints)
    runs = {c.name: collect_results(checkpoint_config(config, c), stop_early_split=split) for c in checkpoints}
    for name, run in runs.items():
        if run.early_stop is not None:
            run.early_stop.alpha_scope = alpha_scope(name, split, run.early_stop.alpha)
            run.metadata["early_stop"] = run.early_stop.describe()
    predictions: dict[str, dict[str, dict[str, Any]]] = {}
    for name, run in runs.items():
        for benchmark, per_variant in run.predictions.items():
            entry = predictions.setdefault(benchmark, {})
            entry.setdefault(BASE_VARIANT, {"generated": 0, "reused": 0,
                                            "read": len(per_variant.get(BASE_VARIANT, {}))})
            entry[name] = {"generated": 0, "reused": 0, "read": len(per_variant.get(LAVENDER_VARIANT, {}))}
    return SeriesResults(config, checkpoints, runs, predictions, _series_metadata(config, checkpoints, None))


def collect_run(config: RunConfig, **options: Any) -> RunResults | SeriesResults | None:
    """``collect_series`` for a series, else ``collect_results``."""
    series = series_of(config)
    if series:
        return collect_series(config, series, **options)
    return collect_results(config, **options)


# ----------------------------------------------------------------------------- verdicts


@dataclasses.dataclass
class CheckpointOutcome:
    """One checkpoint's run and verdicts; ``gated``: whether the exit status counts it."""

    checkpoint: Checkpoint
    run: RunResults
    outcome: GateOutcome
    gated: bool

    @property
    def refused(self) -> str | None:
        return self.run.metadata.get("checkpoint", {}).get("refused")

    @property
    def name(self) -> str:
        return self.checkpoint.name


def gate_checkpoint(run: RunResults, checkpoint: Checkpoint, *, gated: bool, reference: Any = None
                    ) -> CheckpointOutcome:
    """The per-checkpoint flow: one checkpoint's results (``checkpoint_run``, or a round's
    results so far) judged on their own, with their own bands."""
    return CheckpointOutcome(checkpoint, run, judge_run(run, reference), gated)


@dataclasses.dataclass
class SeriesStops:
    """``--stop-early`` in a series: each checkpoint's ``run.rounds.RoundsRecord``, in order
    (a refused checkpoint has none); ``gated``: the checkpoints the exit status counts."""

    records: dict[str, Any]
    gated: tuple[str, ...]

    @property
    def stopped(self) -> bool:
        """A checkpoint the exit status counts stopped: the run fails."""
        return any(record.stopped for name, record in self.records.items() if name in self.gated)

    def headline(self) -> str:
        return "\n".join(f"{name}: {record.headline()}" for name, record in self.records.items())


@dataclasses.dataclass
class SeriesOutcome:
    checkpoints: list[CheckpointOutcome]
    gate_series: str
    report: Path | None = None

    @property
    def early_stop(self) -> SeriesStops | None:
        records = {c.name: c.outcome.early_stop for c in self.checkpoints if c.outcome.early_stop is not None}
        if not records:
            return None
        return SeriesStops(records, tuple(c.name for c in self.checkpoints if c.gated))

    @property
    def stopped_early(self) -> bool:
        return self.early_stop is not None and self.early_stop.stopped

    @property
    def candidate(self) -> CheckpointOutcome:
        return self.checkpoints[-1]

    @property
    def noncomparable(self) -> dict:  # every checkpoint ran on the same data
        return self.candidate.outcome.noncomparable

    @property
    def passed(self) -> bool:
        return all(c.outcome.passed for c in self.checkpoints if c.gated)

    @property
    def verdicts(self) -> list:
        return self.candidate.outcome.verdicts

    def for_checkpoint(self, name: str) -> CheckpointOutcome:
        for checkpoint in self.checkpoints:
            if checkpoint.name == name:
                return checkpoint
        raise KeyError(f"no checkpoint {name!r} in this series")

    def first_passing(self) -> str | None:
        """The first checkpoint from which on every checkpoint's verdicts all pass."""
        from lavender_checks.gate.trend import first_passing

        return first_passing([(c.name, c.outcome.verdicts) for c in self.checkpoints])

    def table(self, only_problems: bool = False) -> str:
        """Each checkpoint's verdicts (gated ones in full, the others' problems), then the series."""
        lines = []
        for c in self.checkpoints:
            role = "gated" if c.gated else "not gated (--gate-series all gates it)"
            lines.append(f"--- {c.name} ({role})")
            if c.refused:  # every verdict missing for one reason: said once
                missing = sum(v.status == "missing" for v in c.outcome.verdicts)
                lines.append(f"{c.name}: adapter refused, its {missing} Lavender and gain verdicts "
                             f"are missing: {c.refused}")
            else:
                lines.append(c.outcome.table(only_problems=only_problems or not c.gated))
        lines += self.summary_lines()
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        first = self.first_passing()
        which = (f"the last checkpoint, {self.candidate.name}" if self.gate_series == "last"
                 else "every checkpoint")
        lines = [f"series of {len(self.checkpoints)}: {', '.join(c.name for c in self.checkpoints)}; "
                 f"the exit status judges {which} (--gate-series {self.gate_series})",
                 "first checkpoint from which every verdict passes: "
                 + (first if first else "none (the last checkpoint has verdicts that do not pass)")]
        failing = [c.name for c in self.checkpoints if c.gated and not c.outcome.passed]
        if failing:
            lines.append(f"gated checkpoints that did not pass: {', '.join(failing)}")
        return lines


def judge_series(series: SeriesResults, reference: Any = None) -> SeriesOutcome:
    reference = run_reference(series.config, reference)
    last = series.checkpoints[-1].name
    outcomes = [gate_checkpoint(series.runs[c.name], c, reference=reference,
                                gated=series.config.gate_series == "all" or c.name == last)
                for c in series.checkpoints]
    return SeriesOutcome(outcomes, series.config.gate_series)


def judge_any(run: RunResults | SeriesResults) -> GateOutcome | SeriesOutcome:
    return judge_series(run) if isinstance(run, SeriesResults) else judge_run(run)


def write_series_report(series: SeriesResults, outcome: SeriesOutcome, *, reports_root: Path = REPORTS,
                        keep: int | None = None) -> Path:
    """One report folder for the series: the candidate's report (its tables, flips, gains.png)
    with the trend table, a trend plot per benchmark and ``checkpoints`` in report.json."""
    from lavender_checks.gate.report import write_report

    candidate = outcome.candidate
    metadata = {**candidate.run.metadata, "series": series.metadata, "predictions": series.predictions}
    metadata.pop("early_stop", None)  # each checkpoint's is in its entry; the report leads with all of them
    trend = {"gate_series": outcome.gate_series, "candidate": candidate.name, "passed": outcome.passed,
             "first_passing": outcome.first_passing(),
             "checkpoints": [{"name": c.name, "path": str(c.checkpoint.path) if c.checkpoint.path else None,
                              "step": c.checkpoint.step, "gated": c.gated, "refused": c.refused,
                              "adapter_fingerprint": c.run.metadata.get("fingerprints", {}).get("adapter"),
                              "early_stop": c.run.metadata.get("early_stop"),
                              "verdicts": c.outcome.verdicts} for c in outcome.checkpoints]}
    outcome.report = Path(write_report(reports_root, None, candidate.outcome.reference, candidate.outcome.verdicts,
                                       candidate.run.results, metadata, series=trend))
    for c in outcome.checkpoints:
        c.outcome.report = outcome.report
    prune_reports(reports_root, keep=keep)
    return outcome.report


def write_any_report(run: RunResults | SeriesResults, outcome: GateOutcome | SeriesOutcome, *,
                     reports_root: Path = REPORTS, keep: int | None = None) -> Path:
    from lavender_checks.run.judge import write_run_report

    if isinstance(run, SeriesResults):
        return write_series_report(run, outcome, reports_root=reports_root, keep=keep)
    return write_run_report(run, outcome, reports_root=reports_root, keep=keep)


def refuse_write_reference(config: RunConfig) -> None:
    if series_of(config):
        raise RunInputError("--write-reference records one adapter's numbers: give one --lora "
                            "(or one --lavender-name), not a series")

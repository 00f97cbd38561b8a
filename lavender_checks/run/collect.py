"""Collecting a run's results: predictions generated through the store (``collect_results``)
or read from the files VLMEvalKit wrote (``--from-vlmeval``), scored both ways alike.

One run, as data (docs/architecture.md)::

    TSV frame -> run.predict (base, then Lavender: one weight copy, the base variant is the
    adapter-disabled model) -> vlmeval_io.prediction_frame -> vlmeval_io.roundtrip
    -> Benchmark.score

``--from-vlmeval DIR`` enters at ``vlmeval_io.read_prediction_file`` instead: the prediction
files VLMEvalKit wrote for both models are scored with no model and no GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavender_checks import __version__
from lavender_checks.benchmarks import Benchmark, ScoreResult
from lavender_checks.model import BASE_VARIANT, LAVENDER_VARIANT, VARIANTS, AdapterRefused
from lavender_checks.run.config import RunConfig, RunInputError
from lavender_checks.run.distributed import TorchrunShards
from lavender_checks.run.pair import LazyPair, load_model_pair, pair_identity
from lavender_checks.run.shards import Barrier, generate_shards


@dataclass
class RunResults:
    """What a run computed.

    results: benchmark -> {"base": ScoreResult | None, "lavender": ScoreResult | None}, for
        every benchmark of the run (None where a benchmark is missing) — what gate.judge takes.
    missing: benchmark -> why it has no result (e.g. its TSV is absent, naming the file).
    predictions: benchmark -> variant -> index -> raw prediction (the scored rows, in order).
    metadata: fingerprints, profile, data md5 and match, versions, prediction counts, timing.
    early_stop: with ``--stop-early``, what its rounds did (``run.rounds.RoundsRecord``); a
        run that stopped has no results (its benchmarks are not scored: the verdicts of the
        cases that failed come from the rounds).
    early_stops: with ``--stop-early``, the ``RoundsRecord`` of every adapter variant (a
        series' checkpoints each stop on their own: a stopped one has no predictions and no
        scores; ``run.series.checkpoint_run`` gives each checkpoint its own ``early_stop``).
    """

    config: RunConfig
    results: dict[str, dict[str, ScoreResult | None]]
    missing: dict[str, str]
    predictions: dict[str, dict[str, dict[Any, str]]]
    metadata: dict[str, Any]
    early_stop: Any = None
    early_stops: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def stopped_early(self) -> bool:
        return self.early_stop is not None and self.early_stop.stopped


def collect_results(config: RunConfig, *, pair: Any = None, load_pair: Callable[[], Any] | None = None,
                    shard: tuple[int, int] | None = None,
                    wait_for_shards: Barrier | TorchrunShards | None = None,
                    writer: str = "main", progress: Any = True,
                    variants: Sequence[str] = VARIANTS, stop_early_split: int = 1) -> RunResults | None:
    """Predictions (generated or read from VLMEvalKit files) and scores of both variants.

    pair / load_pair: the ModelPair (a loaded one, or a ``LazyPair``), or a function that
        loads it, called only when a prediction is to be generated (the pair's identity, read
        from its folders, decides what the store already holds); default: ``config``'s pair.
    shard: (i, n) — this process generates shard i of n of every benchmark (default
        ``config.shard``). Without ``wait_for_shards`` only shard i is scored.
    wait_for_shards: a ShardBarrier shared by the n processes: after its own shard this
        process also generates any shard no process has claimed, waits until every shard is
        in the store, and scores the union (the same results in every process). Under
        torchrun, a ``TorchrunShards``: each rank generates its own shard, rank 0 alone scores
        the union, and the other ranks get None.
    writer: this process's file name in the prediction store (one per process).
    progress: True, False or a ``run.progress.Bars`` (bars or lines per benchmark and variant).
    variants: what is generated and scored (a series: ``base`` and each checkpoint's name,
        run.series); a variant whose adapter the pair refuses (``model.AdapterRefused``) has
        no predictions and no scores, and ``metadata["refused"]`` says why.
    stop_early_split: with ``--stop-early``, how many adapters share the reference's
        ``stop_early_alpha`` (a series gated as a whole: ``--gate-series all``); each gets its share.
    """
    if config.from_vlmeval is not None:
        return _collect_from_vlmeval(config, stop_early_split)
    shard = shard if shard is not None else config.shard
    if wait_for_shards is not None:
        if shard is None:
            raise ValueError("wait_for_shards needs the shard this process generates")
        if wait_for_shards.count != shard[1]:
            raise ValueError(f"the barrier waits for {wait_for_shards.count} shards, not {shard[1]}")
    if pair is None:
        pair = LazyPair(pair_identity(config), load_pair or (lambda: load_model_pair(config)))
    return _collect_generated(config, pair, shard, wait_for_shards, writer, progress, tuple(variants),
                              stop_early_split)


@dataclass
class _LoadedBenchmark:
    bench: Benchmark
    full: Any  # data.BenchmarkData: the benchmark's whole TSV and its record
    selected: Any  # data.BenchmarkData: the rows this run scores (subset of `full`)
    tsv: Path


def _load_data(config: RunConfig, root: Path, shard: tuple[int, int] | None
               ) -> tuple[dict[str, _LoadedBenchmark], dict[str, str]]:
    """Frames of the benchmarks whose TSV is there (the rows to score: ``shard`` of the
    subset, or all of it); the others are missing, naming the file."""
    from lavender_checks.data import load_benchmark, subset

    if not root.is_dir():
        raise RunInputError(f"LMUData folder {root} does not exist")
    data: dict[str, _LoadedBenchmark] = {}
    missing: dict[str, str] = {}
    for bench in config.selected:
        tsv = root / bench.spec.tsv
        if not tsv.is_file():
            missing[bench.name] = f"{tsv} is a folder, not a TSV file" if tsv.exists() else f"{tsv} does not exist"
            continue
        loaded = load_benchmark(bench, root)
        if config.strict_data:
            _refuse_noncomparable(config, bench.name, loaded.provenance)
        selected = subset(loaded, bench, limit=config.limit, fraction=config.fraction, shard=shard)
        data[bench.name] = _LoadedBenchmark(bench=bench, full=loaded, selected=selected, tsv=tsv)
    if not data:
        raise RunInputError(f"none of the benchmark TSVs is in {root}: "
                            + "; ".join(missing.values()))
    return data, missing


def _take_locks(config: RunConfig, pair: Any, root: Path, profile: Any, engine: Any, store: Any,
                barrier: Barrier | TorchrunShards | None, variants: tuple[str, ...] = VARIANTS) -> None:
    """Lock the store key of every benchmark (whose TSV is there) and variant of the run. A
    key needs the pair's fingerprints and the TSV's md5 only: no weights, no TSV parsed."""
    from lavender_checks.run.predict import store_key

    keys: list[Any] = []

    def find_keys() -> None:
        if not root.is_dir():
            raise RunInputError(f"LMUData folder {root} does not exist")
        keys.extend(store_key(pair, bench, None, profile, variant, root, batch_invariant=engine.batch_invariant)
                    for bench in config.selected if (root / bench.spec.tsv).is_file() for variant in variants)

    if isinstance(barrier, TorchrunShards):
        barrier.check(find_keys, "store keys found")  # a rank that cannot stops every rank
        barrier.take_locks(keys, store)
        return
    find_keys()
    for key in keys:
        store.lock(key)


def _refuse_noncomparable(config: RunConfig, benchmark: str, record: Any) -> None:
    """--strict-data: a TSV that is not the reference's data (``record``: its data.Provenance)
    is an input error, before any work."""
    from lavender_checks.gate.verdicts import data_mismatch, load_reference

    why = data_mismatch(load_reference(config.reference_path()), benchmark, record.describe())
    if why:
        raise RunInputError(f"--strict-data: {why}; its scores are not comparable with the reference")


def _collect_generated(config: RunConfig, pair: Any, shard: tuple[int, int] | None,
                       barrier: Barrier | TorchrunShards | None, writer: str,
                       progress: Any, variants: tuple[str, ...] = VARIANTS, stop_early_split: int = 1
                       ) -> RunResults | None:
    from lavender_checks.data import subset
    from lavender_checks.engines import make_engine
    from lavender_checks.profiles import load_profile
    from lavender_checks.run.predict import predict_run
    from lavender_checks.run.store import PredictionStore

    started = time.time()
    # A row stored since this moment was generated by this run (whichever of its processes
    # stored it); one stored before, reused. Under -n N each process's own start: rows come
    # minutes after the processes start together.
    started_ns = time.time_ns()
    profile = load_profile(config.profile)
    for name in config.benchmarks:
        profile.for_benchmark(name)  # a benchmark the profile lacks is an error before any work
    root = config.lmu_root()
    # The processes sharing a barrier are one run: they share the store keys' locks.
    store = PredictionStore(config.store, run_id=barrier.run_id if barrier is not None else None)

    # Built over the (lazy) pair without touching its weights: an engine builds its model
    # state on its first generate.
    fast_config = None
    if not config.batch_invariant:
        from lavender_checks.engines.fast.config import FastGenConfig

        fast_config = FastGenConfig(invariant=False)
    engine = make_engine(config.engine, pair, batch_size=config.batch_size,
                         chunk_rows=config.chunk_rows, fast_config=fast_config)
    try:
        # The locks first, before any TSV is read or weights loaded: of two runs started
        # together on one store, the one started first gets them.
        _take_locks(config, pair, root, profile, engine, store, barrier, variants)
        # With a barrier every process scores the union of the shards; without one, its own shard.
        data, missing = _load_data(config, root, shard if barrier is None else None)
    except BaseException:
        store.release()
        raise

    refused: dict[str, str] = {}

    def predict(item: _LoadedBenchmark, rows, variant: str):
        if variant in refused:
            return None
        try:
            return predict_run(pair, engine, item.bench, rows, profile, variant, store,
                               lmu_root=root, writer=writer, progress=progress, run_started_ns=started_ns)
        except AdapterRefused as exc:  # a checkpoint of a series: the others go on
            refused[variant] = str(exc)
            return None

    def shard_frame(item: _LoadedBenchmark, index: int, count: int):
        return subset(item.full, item.bench, limit=config.limit, fraction=config.fraction,
                      shard=(index, count))

    def generate_shard(index: int, count: int) -> None:
        for item in data.values():
            part = shard_frame(item, index, count)
            for variant in variants:
                if len(part.frame):
                    predict(item, part, variant)

    def shard_work(index: int, count: int) -> list[tuple[Any, list]]:
        # The store key of every benchmark and variant, with the indices of shard index of count.
        from lavender_checks.run.predict import store_key

        return [(store_key(pair, item.bench, item.full, profile, variant, root,
                           batch_invariant=engine.batch_invariant),
                 shard_frame(item, index, count).frame["index"].tolist())
                for item in data.values() for variant in variants]

    predictions: dict[str, dict[str, dict[Any, str]]] = {name: {} for name in data}
    counts: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in data}
    generation_started = time.time()
    stops: dict[str, Any] = {}  # --stop-early: adapter variant -> RoundsRecord
    scored, counted = variants, {}
    # The tiny model gains nothing from intra-op threads and, on a busy machine, loses to
    # their synchronisation (figures in docs/speed.md).
    with (_torch_threads(1) if config.base_model is None else contextlib.nullcontext()), store:
        if config.stop_early:
            stops, rows_through = _generate_in_rounds(config, data, pair, engine, profile, store, root, writer,
                                                      progress, shard, barrier, variants, stop_early_split, refused)
            if isinstance(barrier, TorchrunShards) and not barrier.scores:
                return None  # rank 0 scores the union
            # An adapter whose rounds ended early is not scored: its verdicts come from the
            # rounds. Once every adapter's did (or was refused), neither is the base. Their
            # counts are of the rows their rounds used.
            ended = [v for v, record in stops.items() if not record.complete]
            going_on = [v for v in variants[1:] if v not in ended]
            scored = () if ended and all(v in refused for v in going_on) else (variants[0], *going_on)
            counted = {v: stops[v].rounds_done for v in ended}
            if not scored:
                counted[variants[0]] = max(record.rounds_done for record in stops.values())
        elif isinstance(barrier, TorchrunShards):
            barrier.share(generate_shard, shard_work, store)
            if not barrier.scores:
                return None  # rank 0 scores the union
        elif shard is not None and barrier is not None:
            generate_shards(shard, barrier, generate_shard)
        # With a barrier every shard is stored by now: this pass only reads the store.
        for name, item in data.items():
            for variant in scored:
                t0 = time.time()
                run = predict(item, item.selected, variant)
                if run is None:
                    continue
                predictions[name][variant] = run.predictions
                counts[name][variant] = _counts(run, time.time() - t0)
        for variant, rounds in counted.items():  # stored by now: read back for the counts only
            for name, rows in rows_through(rounds).items():
                run = predict(data[name], rows, variant) if len(rows.frame) else None
                if run is not None:
                    counts[name][variant] = _counts(run, None)
    generation_seconds = time.time() - generation_started

    if scored:
        results, scoring_seconds = _score_all(config, data, predictions, missing, variants)
    else:
        results, scoring_seconds = _not_scored(config, variants), 0.0
    metadata = {
        "mode": "generated",
        **_common_metadata(config, started),
        "models": pair.describe(),
        "fingerprints": {"base": pair.base_fingerprint, "adapter": pair.adapter_fingerprint},
        "engine": _describe_engine(config, engine),
        "profile": profile.describe(),
        "lmu_data": str(root),
        "data": {name: _with_score_caveats(_describe_data(item), results[name]) for name, item in data.items()},
        "missing": dict(missing),
        "predictions": counts,
        "refused": refused,
        "store": str(store.root),
        "writer": writer,
        "shard": list(shard) if shard is not None else None,
        "torchrun": barrier.describe() if isinstance(barrier, TorchrunShards) else None,
        # which physical GPU this process saw (conftest pins one per xdist worker)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "timing": {"generation_s": round(generation_seconds, 3), "scoring_s": round(scoring_seconds, 3),
                   "total_s": round(time.time() - started, 3)},
    }
    early = stops.get(LAVENDER_VARIANT) if variants == VARIANTS else None  # a series has one per checkpoint
    if early is not None:
        metadata["early_stop"] = early.describe()
    elif stops:
        metadata["early_stops"] = {name: record.describe() for name, record in stops.items()}
    return RunResults(config=config, results=results, missing=missing, predictions=predictions,
                      metadata=metadata, early_stop=early, early_stops=stops)


def _not_scored(config: RunConfig, variants: Sequence[str] = VARIANTS) -> dict[str, dict[str, ScoreResult | None]]:
    return {name: {variant: None for variant in variants} for name in config.benchmarks}


def _counts(run: Any, seconds: float | None) -> dict[str, Any]:
    """A ``PredictionRun``'s counts for ``metadata["predictions"]``: rows stored before the run
    started are reused, the others generated (by this process or another of the run)."""
    return {"rows": len(run.predictions), "reused": run.reused, "generated": run.generated,
            "recomputed": run.recomputed, "seconds": round(seconds, 3) if seconds is not None else None}


def _stop_early_plans(config: RunConfig, frames: Mapping[str, tuple[Benchmark, Any]],
                      dump_suffix: str | None, files: Mapping[str, Any] | None = None,
                      rows: Mapping[str, list] | None = None, judged: Sequence[str] = (LAVENDER_VARIANT,),
                      split: int = 1):
    """The rounds of every benchmark (``frames``: name -> (benchmark, whole data); ``rows``:
    name -> the rows to take, when fewer than the data's), longest answers first, and for
    each adapter variant of ``judged`` the looker that decides after each round
    (``run.rounds``), with the reference's alpha shared by ``split`` adapters."""
    from lavender_checks.gate.sequential import load_settings
    from lavender_checks.gate.verdicts import load_reference
    from lavender_checks.run.rounds import LONGEST_ANSWERS_FIRST, BenchmarkRounds, Looker, gate_cases

    reference = load_reference(config.reference_path())
    settings = load_settings()
    first = {name: i for i, name in enumerate(LONGEST_ANSWERS_FIRST)}
    names = sorted(frames, key=lambda name: first.get(name, len(first)))
    plans = [BenchmarkRounds.of(frames[name][0], frames[name][1], reference.gate.seed, dump_suffix)
             for name in names]
    if rows is not None:
        plans = [plan.restricted_to(rows[plan.name]) for plan in plans]
    cases = gate_cases(reference, names, config.gate_mode)
    alpha = reference.gate.stop_early_alpha / split
    lookers = {variant: Looker(plans, reference, cases, alpha, settings, files) for variant in judged}
    return plans, settings, lookers


def alpha_scope(checkpoint: str, split: int, alpha: float) -> str:
    """What a series checkpoint's stop-early alpha bounds (``RoundsRecord.alpha_scope``)."""
    if split > 1:
        return (f"{checkpoint}, its share of {alpha * split:g} over the {split} checkpoints "
                "--gate-series all gates")
    return f"{checkpoint} (each checkpoint of the series stops on its own)"


def _generate_in_rounds(config: RunConfig, data: Mapping[str, _LoadedBenchmark], pair: Any, engine: Any,
                        profile: Any, store: Any, root: Path, writer: str, progress: bool,
                        shard: tuple[int, int] | None, barrier: Barrier | TorchrunShards | None,
                        variants: tuple[str, ...], split: int, refused: dict[str, str]):
    """``--stop-early``: the run's rows in rounds (``run.rounds``), the base and every adapter
    variant still going (a series' checkpoints each stop on their own; the rounds end once
    every checkpoint the exit status counts has stopped); under -n N each process generates
    its share of every round and they meet after it, under torchrun rank 0 decides for all.
    ``refused`` gets the adapters the pair refuses. Returns each adapter variant's
    ``RoundsRecord``, and a function giving the rows (benchmark -> frame) of the first r
    rounds."""
    from lavender_checks.data import subset
    from lavender_checks.run.predict import predict_run, predict_together, store_key
    from lavender_checks.run.rounds import run_rounds_each

    base, adapters = variants[0], variants[1:]
    plans, settings, lookers = _stop_early_plans(
        config, {name: (item.bench, item.full) for name, item in data.items()}, profile.image_dump_suffix,
        judged=adapters, split=split)

    def part_of(plan, indices: list, index: int, count: int):
        part = plan.rows_frame(indices)
        return part if count == 1 else subset(part, plan.bench, shard=(index, count))

    # A process that generated a whole round has its predictions in hand; one that generated a
    # shard reads the round back from the store the processes share.
    produced: dict[str, dict[str, dict]] = {}

    def generate(rows: dict[str, list], judged: tuple[str, ...], index: int, count: int) -> None:
        for variant in (base, *judged):
            items = [(plan.bench, part) for plan in plans if rows[plan.name]
                     for part in [part_of(plan, rows[plan.name], index, count)] if len(part.frame)]
            if not items or variant in refused:
                continue
            try:
                runs = predict_together(pair, engine, items, profile, variant, store, lmu_root=root,
                                        writer=writer, progress=progress)
            except AdapterRefused as exc:  # a checkpoint of a series: the others go on
                refused[variant] = str(exc)
                continue
            if count == 1:
                for name, run in runs.items():
                    produced.setdefault(name, {})[variant] = run.predictions

    def work(rows: dict[str, list], judged: tuple[str, ...]):
        def of(index: int, count: int):
            return [(store_key(pair, plan.bench, data[plan.name].full, profile, variant, root,
                               batch_invariant=engine.batch_invariant),
                     part_of(plan, rows[plan.name], index, count).frame["index"].tolist())
                    for plan in plans for variant in (base, *judged) if variant not in refused]
        return of

    def do_round(number: int, rows: dict[str, list], judged: tuple[str, ...]) -> None:
        if isinstance(barrier, TorchrunShards):
            barrier.share(lambda i, n: generate(rows, judged, i, n), work(rows, judged), store)
        elif shard is not None and barrier is not None:
            generate_shards(shard, barrier.round(number), lambda i, n: generate(rows, judged, i, n))
        else:
            generate(rows, judged, 0, 1)

    def read_back(rows: dict[str, list], judged: tuple[str, ...]) -> dict[str, dict[str, dict]]:
        got: dict[str, dict[str, dict]] = {}
        for variant in (base, *judged):
            if variant in refused:
                continue
            try:
                for plan in plans:
                    if rows[plan.name]:
                        got.setdefault(plan.name, {})[variant] = predict_run(
                            pair, engine, plan.bench, plan.rows_frame(rows[plan.name]), profile, variant, store,
                            lmu_root=root, writer=writer, progress=False).predictions
            except AdapterRefused as exc:  # another process's share met the refusal
                refused[variant] = str(exc)
        return got

    def look(rows: dict[str, list], done: dict[str, int], judged: tuple[str, ...]):
        def here():
            got = dict(produced) if produced else read_back(rows, judged)
            produced.clear()  # (with judged empty the rounds go on for the base: nothing to look at)
            return {variant: lookers[variant].look(
                        {name: {BASE_VARIANT: per[base], LAVENDER_VARIANT: per[variant]} for name, per in got.items()},
                        done)
                    for variant in judged if variant not in refused}

        if isinstance(barrier, TorchrunShards):  # rank 0 holds every row: it decides for all
            decisions, error = None, None
            if barrier.scores:
                try:
                    decisions = here()
                except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised here
                    error = exc
            barrier.group.agree("stop-early decision taken", error)  # no rank waits on a failed one
            if error is not None:
                raise error
            return barrier.group.broadcast(decisions, "stop-early decision")
        return here()

    alphas = {variant: looker.alpha for variant, looker in lookers.items()}
    gated = adapters if config.gate_series == "all" else adapters[-1:]
    records = run_rounds_each(plans, settings, alphas, do_round, look, gated=gated)
    if adapters != (LAVENDER_VARIANT,):
        for variant, record in records.items():
            record.alpha_scope = alpha_scope(variant, split, record.alpha)

    def rows_through(rounds: int) -> dict[str, Any]:
        fraction = settings.rounds[rounds - 1]
        return {plan.name: plan.rows_frame(plan.indices(0, plan.units_through(fraction))) for plan in plans}

    return records, rows_through


def _describe_engine(config: RunConfig, engine: Any) -> dict[str, Any]:
    """What the engine says of itself (the fast one: its chunk size and every reason it handed
    requests to the batched engine), and the name asked for when it differs."""
    described = dict(engine.describe())
    if described.get("name") != config.engine:
        described["asked"] = config.engine
    return described


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score_all(config: RunConfig, data: Mapping[str, _LoadedBenchmark],
               predictions: Mapping[str, Mapping[str, Mapping[Any, str]]],
               missing: Mapping[str, str], variants: tuple[str, ...] = VARIANTS
               ) -> tuple[dict[str, dict[str, ScoreResult | None]], float]:
    from lavender_checks.vlmeval_io import prediction_frame, roundtrip

    t0 = time.time()
    results: dict[str, dict[str, ScoreResult | None]] = {}
    for name in config.benchmarks:
        if name in missing:
            results[name] = {variant: None for variant in variants}
            continue
        item = data[name]
        results[name] = {}
        for variant in variants:  # paired by construction: every variant predicted item.selected
            if variant not in predictions[name]:  # its adapter was refused
                results[name][variant] = None
                continue
            frame = roundtrip(prediction_frame(item.selected.frame, predictions[name][variant]))
            results[name][variant] = item.bench.score(frame, meta=item.full.frame)
    return results, time.time() - t0


def _check_paired(benchmark: str, indices: Mapping[str, list], sources: Mapping[str, str]) -> None:
    """Base and Lavender must cover the same rows: the comparison is paired."""
    base, lavender = (set(indices[v]) for v in VARIANTS)
    if base == lavender:
        return
    only_base, only_lavender = sorted(base - lavender, key=str), sorted(lavender - base, key=str)

    def some(values: list) -> str:
        shown = ", ".join(str(v) for v in values[:10])
        return shown + (f" and {len(values) - 10} more" if len(values) > 10 else "")

    parts = []
    if only_base:
        parts.append(f"{len(only_base)} row(s) only in {sources['base']} (index {some(only_base)})")
    if only_lavender:
        parts.append(f"{len(only_lavender)} row(s) only in {sources['lavender']} "
                     f"(index {some(only_lavender)})")
    raise RunInputError(
        f"{benchmark}: base and Lavender predictions cover different rows ({len(base)} vs "
        f"{len(lavender)}): " + "; ".join(parts) + ". The comparison is paired, row by row: "
        "give both models' predictions on the same rows (the same subset)."
    )


def _common_metadata(config: RunConfig, started: float) -> dict[str, Any]:
    return {
        "label": config.label(),
        "command": " ".join(sys.argv),
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "subset": {"limit": config.limit, "fraction": config.fraction,
                   "shard": list(config.shard) if config.shard else None},
        "config": config.describe(),
        "versions": versions(),
    }


def _describe_data(item: _LoadedBenchmark) -> dict[str, Any]:
    """The file's identity (md5 and whether it is VLMEvalKit's), the subset taken, the rows scored."""
    return {**item.selected.provenance.describe(), "scored_rows": len(item.selected.frame)}


def _with_score_caveats(info: dict[str, Any], entry: Mapping[str, ScoreResult | None]) -> dict[str, Any]:
    """``info`` plus, under ``noncomparable``, what the scorer said makes its numbers other
    than the metric the benchmark reports (``ScoreResult.noncomparable``), once; read by
    ``gate.verdicts.noncomparable``."""
    found = list(dict.fromkeys(r.noncomparable for r in entry.values() if r is not None and r.noncomparable))
    if found:
        info = {**info, "noncomparable": [*info.get("noncomparable", []), *found]}
    return info


def versions() -> dict[str, str | None]:
    """Versions of what a result depends on."""
    out: dict[str, str | None] = {"lavender-checks": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "numpy", "pandas", "openpyxl", "pillow"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


# ------------------------------------------------------------------------ from VLMEvalKit


def _collect_from_vlmeval(config: RunConfig, stop_early_split: int = 1) -> RunResults:
    """Both models' prediction files of every benchmark, read as VLMEvalKit's evaluate() reads
    them and scored; a benchmark whose files are absent is missing, saying where it looked.
    The benchmark TSV, when LMUData has it, checks the indices (and gives MMBench its answers,
    as in VLMEvalKit)."""
    from lavender_checks.benchmarks.signature import check_questions, check_signature
    from lavender_checks.benchmarks.vlmeval_common import integer_indices
    from lavender_checks.data import subset
    from lavender_checks.vlmeval_io import find_prediction_file, read_prediction_file

    started = time.time()
    work_dir = config.from_vlmeval
    if not work_dir.is_dir():
        raise RunInputError(f"--from-vlmeval {work_dir}: no such folder")
    names = {"base": config.base_name, "lavender": config.lavender_name}
    meta_root = _optional_lmu_root(config)

    results: dict[str, dict[str, ScoreResult | None]] = {}
    missing: dict[str, str] = {}
    predictions: dict[str, dict[str, dict[Any, str]]] = {}
    files: dict[str, dict[str, str]] = {}
    data_info: dict[str, Any] = {}
    read: dict[str, tuple[Benchmark, dict[str, Any], Any]] = {}  # --stop-early: scored after the rounds
    for bench in config.selected:
        benchmark = bench.name
        paths, absent = {}, []
        for variant in VARIANTS:
            try:
                paths[variant] = find_prediction_file(work_dir, names[variant], benchmark)
            except FileNotFoundError as exc:  # its message says where it looked
                absent.append(str(exc).replace(":\n  ", ": ").replace("\n  ", ", "))
        if absent:
            missing[benchmark] = "; ".join(absent)
        if not paths:
            results[benchmark] = {v: None for v in VARIANTS}
            continue
        # The variant whose file is there is scored and judged on its own; the other is missing.
        frames = {v: read_prediction_file(path) for v, path in paths.items()}
        for v in frames:  # a file of another benchmark is refused, naming what it looks like
            check_signature(frames[v], benchmark, str(paths[v]))
            with _naming_file(paths[v]):  # before --stop-early's rounds score parts of the file
                integer_indices(frames[v], benchmark)
        meta = _optional_meta(bench, meta_root)
        if meta is not None:
            for v in frames:  # as score --meta: a file of an edited TSV is refused
                check_questions(frames[v], meta.frame, str(paths[v]), str(meta_root / bench.spec.tsv))
        if meta is not None and config.strict_data:
            _refuse_noncomparable(config, benchmark, meta.provenance)
        file_problems, unchecked = ([], "") if meta is not None else _check_without_tsv(bench, frames, paths)
        whole = frames
        if config.limit is not None or config.fraction is not None:
            frames = {v: subset(f, bench, limit=config.limit, fraction=config.fraction)
                      for v, f in frames.items()}
        if len(frames) == len(VARIANTS):
            _check_paired(benchmark, {v: list(frames[v]["index"]) for v in VARIANTS},
                          {v: str(paths[v]) for v in VARIANTS})
        if config.stop_early and meta is not None and len(next(iter(frames.values()))) < len(meta.frame):
            # Files of part of the TSV are a subset, whose complete-run band is wider than the
            # one the rounds bound.
            raise RunInputError(f"--stop-early judges whole benchmarks: {paths[next(iter(frames))]} holds "
                                f"{len(next(iter(frames.values())))} of the {len(meta.frame)} rows of "
                                f"{bench.spec.tsv}; gate these files without --stop-early")
        if config.stop_early and len(frames) == len(VARIANTS):
            # Scored once the rounds are done (and only if the run did not stop).
            read[benchmark] = (bench, frames, meta)
            results[benchmark] = {v: None for v in VARIANTS}
        else:
            results[benchmark] = {v: _score_file(bench, frames[v], meta, paths[v])
                                  if v in frames else None for v in VARIANTS}
        if meta is None and whole is not frames:  # the files are the whole: a subset's bands widen
            for v in frames:
                results[benchmark][v].population = bench.population(next(iter(whole.values())))
        predictions[benchmark] = {v: dict(zip(frames[v]["index"].tolist(),
                                              frames[v]["prediction"].map(str).tolist()))
                                  for v in frames}
        files[benchmark] = {v: str(paths[v]) for v in frames}
        data_info[benchmark] = {"meta": meta.provenance.describe() if meta is not None else None,
                                "scored_rows": len(next(iter(frames.values())))}
        if file_problems:
            data_info[benchmark]["noncomparable"] = file_problems
        if unchecked:
            data_info[benchmark]["unchecked"] = unchecked
        data_info[benchmark] = _with_score_caveats(data_info[benchmark], results[benchmark])
    if not files:
        raise RunInputError(f"--from-vlmeval {work_dir}: no prediction files of "
                            f"{config.base_name} and {config.lavender_name}; "
                            + "; ".join(f"{b}: {r}" for b, r in missing.items()))
    early = _read_in_rounds(config, read, stop_early_split) if config.stop_early else None
    if early is not None and not early.stopped:
        for benchmark, (bench, frames, meta) in read.items():
            results[benchmark] = {v: _score_file(bench, frames[v], meta, files[benchmark][v])
                                  for v in VARIANTS}
            data_info[benchmark] = _with_score_caveats(data_info[benchmark], results[benchmark])
    metadata = {
        "mode": "from-vlmeval",
        **_common_metadata(config, started),
        "work_dir": str(work_dir),
        "models": names,
        "files": files,
        # read from the files: nothing generated, nothing from the store
        "predictions": {b: {v: {"generated": 0, "reused": 0, "read": len(rows)} for v, rows in per.items()}
                        for b, per in predictions.items()},
        "data": data_info,
        "missing": dict(missing),
        "timing": {"total_s": round(time.time() - started, 3)},
    }
    if early is not None:
        metadata["early_stop"] = early.describe()
    return RunResults(config=config, results=results, missing=missing, predictions=predictions,
                      metadata=metadata, early_stop=early,
                      early_stops={LAVENDER_VARIANT: early} if early is not None else {})


@contextlib.contextmanager
def _naming_file(path) -> Iterator[None]:
    """A file the scorers refuse is named in the error: they name the benchmark, row and
    column only, and a run reads two files (or more) of each benchmark."""
    from lavender_checks.benchmarks.vlmeval_common import ScoringInputError

    try:
        yield
    except ScoringInputError as exc:
        if str(path) in str(exc):
            raise
        raise ScoringInputError(f"{path}: {exc}") from exc


def _score_file(bench: Benchmark, frame, meta, path) -> ScoreResult:
    with _naming_file(path):
        return bench.score(frame, meta=meta.frame if meta is not None else None)


def _read_in_rounds(config: RunConfig, read: Mapping[str, tuple[Benchmark, dict[str, Any], Any]], split: int = 1):
    """``--stop-early --from-vlmeval``: the files' rows taken in the rounds a generated run
    takes (the TSV's images and units give the order when ``--lmu-data`` has the TSV; without
    it every row sharing a scoring unit is one draw unit), as if they were being generated."""
    from lavender_checks.run.rounds import run_rounds

    plans, settings, lookers = _stop_early_plans(
        config, {name: (bench, meta if meta is not None else frames["base"])
                 for name, (bench, frames, meta) in read.items()},
        None, files={name: (frames, meta.frame if meta is not None else None)
                     for name, (bench, frames, meta) in read.items()},
        rows={name: frames["base"]["index"].tolist() for name, (bench, frames, meta) in read.items()},
        split=split)
    looker = lookers[LAVENDER_VARIANT]
    cells = {name: {v: dict(zip(frames[v]["index"].astype(str), frames[v]["prediction"].tolist())) for v in VARIANTS}
             for name, (bench, frames, meta) in read.items()}

    def look(rows: dict[str, list], done: dict[str, int]):
        got = {name: {v: {index: cells[name][v][str(index)] for index in indices} for v in VARIANTS}
               for name, indices in rows.items() if indices}
        return looker.look(got, done)

    return run_rounds(plans, settings, looker.alpha, lambda number, rows: None, look)


def _check_without_tsv(bench: Benchmark, frames: Mapping[str, Any], paths: Mapping[str, Path]
                       ) -> tuple[list[str], str]:
    """What can be checked of the models' whole files without the benchmark's TSV: their row
    count against VLMEvalKit's (benchmarks.toml ``rows``) and, with both files there, that they
    ask the same question at each index (files of two different TSVs are refused, as ``score
    --meta`` refuses a file of an edited TSV). Returns why the files are not the whole benchmark
    (not comparable), and what could not be checked."""
    from lavender_checks.benchmarks.signature import check_questions

    benchmark, expected = bench.name, bench.spec.rows
    if len(frames) == len(VARIANTS):
        check_questions(frames["lavender"], frames["base"], str(paths["lavender"]), str(paths["base"]))
    variant, first = next(iter(frames.items()))
    problems = []
    if expected is not None and len(first) != expected:
        problems.append(f"{paths[variant]} has {len(first)} rows, VLMEvalKit's {benchmark} has "
                        f"{expected}: the files are not of the whole benchmark (no TSV was given to "
                        "check them against: --lmu-data)")
    unchecked = (f"no {bench.spec.tsv} in LMUData (--lmu-data): the files' questions, answers and "
                 f"indices were not checked against VLMEvalKit's {benchmark} TSV (md5 {bench.spec.md5}); "
                 f"checked: row count ({len(first)}"
                 + (f", VLMEvalKit's {expected}" if expected is not None else "")
                 + ("), the same questions in both files" if len(frames) == len(VARIANTS) else ")"))
    return problems, unchecked


def _optional_lmu_root(config: RunConfig) -> Path | None:
    """Where to find the TSVs that check a VLMEvalKit file's indices, if anywhere."""
    if config.lmu_data is not None:
        if not config.lmu_data.is_dir():
            raise RunInputError(f"--lmu-data {config.lmu_data}: no such folder")
        return config.lmu_data
    from lavender_checks.data import lmudata_root

    root = lmudata_root(None)
    return root if root.is_dir() else None  # no LMUData: the files are scored on their own


def _optional_meta(bench: Benchmark, root: Path | None):
    """The benchmark's TSV and its record (``data.BenchmarkData``), when LMUData has it."""
    if root is None or not (root / bench.spec.tsv).is_file():
        return None
    from lavender_checks.data import load_benchmark

    return load_benchmark(bench, root)

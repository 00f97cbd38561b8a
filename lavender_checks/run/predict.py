"""Predictions of one model variant on one benchmark, through the prediction store.

Rows whose prediction is already stored for the same request (same chat text and token
budget) are reused; the rest are generated batch by batch, each finished batch appended to
the store before the next one starts, so an interrupted run (Ctrl-C, a kill, a crash) keeps
what it finished and a rerun resumes from it.

The engine (``lavender_checks.engines``) decides how the frame is handed over (``Engine.plan``):
the batched engine takes batches of ``batch_size`` rows in frame order, the fast engine
chunks of rows grouped by ``data.image_key``. Either way the calls depend on the whole frame
only, so a resumed run cuts the same calls as an uninterrupted one. Images go as
zero-argument loaders with their ``image_key``; the engine opens them when it needs the
pixels. The engine reports rows as they finish, and each is appended to the store at once:
an interrupted run loses at most the rows in flight. Which engine made a stored prediction
is not part of the store key (both give the same greedy tokens on CPU), so either engine
resumes the other's store.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lavender_checks.benchmarks import Benchmark, get_benchmark
from lavender_checks.engines import Engine
from lavender_checks.engines.request import GenerationRequest
from lavender_checks.model import BASE_VARIANT
from lavender_checks.profiles import Profile
from lavender_checks.prompts import build_prompt, chat_text
from lavender_checks.run.store import Index, PredictionStore, StoreKey, request_sha

log = logging.getLogger(__name__)


@dataclass
class PredictionRun:
    """What ``predict_run`` did: the predictions for every row, and where they came from."""

    predictions: dict[Index, str]
    reused: int  # stored predictions of the same request
    recomputed: int  # stored, but made from another request (prompt or token budget changed)
    generated: int  # generated in this run (includes ``recomputed``)
    store_dir: Path


def predict_run(pair: Any, engine: Engine, benchmark: Benchmark | str, frame: Any,
                profile: Profile, variant: str, store: PredictionStore, *, lmu_root: str | Path,
                writer: str = "main", progress: Any = True, run_started_ns: int | None = None) -> PredictionRun:
    """Predictions for every row of ``frame``, reusing the store (module docstring).

    pair: the loaded model (its processor builds the prompts, its fingerprints key the
    store); engine: what generates the rows not stored yet; frame: the rows, a
    ``data.BenchmarkData`` (its record gives the TSV's md5 and which rows share an image) or
    a bare frame (the md5 of the TSV in ``lmu_root``, every row its own image).
    run_started_ns: when the run this call is part of started (``time.time_ns()``): a row
    stored since then counts as generated, not reused, whichever call or process of the run
    stored it (a run that reads back what its shards or rounds generated).
    """
    work = _prepare(pair, engine, benchmark, frame, profile, variant, store, Path(lmu_root), writer,
                    run_started_ns)
    _generate(pair, engine, [work], variant, progress, keyed=lambda work, index: index)
    return work.outcome()


def predict_together(pair: Any, engine: Engine, items: Sequence[tuple[Benchmark | str, Any]],
                     profile: Profile, variant: str, store: PredictionStore, *, lmu_root: str | Path,
                     writer: str = "main", progress: Any = True) -> dict[str, PredictionRun]:
    """``predict_run`` for several benchmarks' rows in one engine call per plan (the rows of
    ``items`` in their order: a round of ``--stop-early`` hands the benchmarks with the
    longest answers first, so that the short ones fill the batch while the long ones end).
    The engine's keys are (benchmark, index); each benchmark's rows go to its own store log."""
    works = [_prepare(pair, engine, benchmark, frame, profile, variant, store, Path(lmu_root), writer)
             for benchmark, frame in items]
    names = [work.bench.name for work in works]
    if len(set(names)) != len(names):
        raise ValueError(f"a benchmark is given twice: {', '.join(names)}")
    _generate(pair, engine, works, variant, progress, keyed=lambda work, index: (work.bench.name, index))
    return {work.bench.name: work.outcome() for work in works}


@dataclass
class _Work:
    """One benchmark's rows of a call: prompts, what the store holds, where new rows go."""

    bench: Benchmark
    data: Any  # data.BenchmarkData
    indices: list[Index]
    texts: dict[Index, str]
    wanted: dict[Index, str]  # index -> request sha
    log: Any  # store.PredictionLog
    predictions: dict[Index, str]
    reused: int
    recomputed: int
    image_key_of: Callable[[Index], str]
    loader: Callable[[Index], Callable[[], Any]]
    max_new_tokens: int
    clean_up_spaces: bool
    generated: int = 0
    stored_by_this_run: int = 0  # found stored, but stored since the run started

    def outcome(self) -> PredictionRun:
        return PredictionRun(predictions={index: self.predictions[index] for index in self.indices},
                             reused=self.reused - self.stored_by_this_run, recomputed=self.recomputed,
                             generated=self.generated + self.stored_by_this_run, store_dir=self.log.directory)


def _prepare(pair: Any, engine: Engine, benchmark: Benchmark | str, frame: Any, profile: Profile,
             variant: str, store: PredictionStore, lmu_root: Path, writer: str,
             run_started_ns: int | None = None) -> _Work:
    from lavender_checks.data import BenchmarkData, image_key, load_image

    data = frame if isinstance(frame, BenchmarkData) else BenchmarkData(frame)
    frame: pd.DataFrame = data.frame

    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    prompting = profile.for_benchmark(bench.name)
    if not profile.add_special_tokens or profile.do_sample:
        # The engines call the processor as VLMEvalKit does (tokenizer BOS added) and
        # decode greedily; a profile asking otherwise cannot be honoured.
        raise ValueError(
            f"{profile.path}: profile {profile.name!r} asks for add_special_tokens="
            f"{profile.add_special_tokens}, do_sample={profile.do_sample}; generation supports "
            "only add_special_tokens=true (VLMEvalKit's call) with greedy decoding"
        )
    dump = profile.image_dump_suffix  # the pixels VLMEvalKit's revision feeds the model

    # Prompts need no pixels; leaving out the base64 column keeps these row copies small.
    rows = frame.drop(columns=["image"], errors="ignore").to_dict("records")
    indices = [_index_of(row, bench.name, position) for position, row in enumerate(rows)]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{bench.name}: the frame repeats an index; each row needs its own")
    texts = {index: chat_text(pair.processor, build_prompt(bench, row, profile))
             for index, row in zip(indices, rows)}
    wanted = {index: request_sha(text, prompting.max_new_tokens) for index, text in texts.items()}

    prediction_log = store.log(store_key(pair, bench, data, profile, variant, lmu_root,
                                         batch_invariant=engine.batch_invariant), writer=writer)
    stored = prediction_log.existing()
    reusable = prediction_log.matching(wanted)
    predictions: dict[Index, str] = {index: reusable[index].prediction
                                     for index in indices if index in reusable}
    recomputed = sum(1 for index in indices if index in stored and index not in reusable)
    if recomputed:
        log.warning("%s/%s: %d stored predictions were made from another prompt or token budget "
                    "and are generated again", bench.name, variant, recomputed)
    return _Work(
        bench=bench, data=data, indices=indices, texts=texts, wanted=wanted, log=prediction_log,
        predictions=predictions, reused=len(reusable.keys() & set(indices)), recomputed=recomputed,
        stored_by_this_run=0 if run_started_ns is None else sum(
            1 for index in indices if index in reusable and reusable[index].time_ns >= run_started_ns),
        # Each row's image identity, worked out once (the fast engine groups rows by it).
        image_key_of=functools.cache(lambda index: image_key(data, index, dump)),
        # The engine opens each image when it needs it, from a loader bound to its row (a full
        # benchmark's images do not fit in memory).
        loader=lambda index: functools.partial(load_image, data, index, bench, lmu_root, dump),
        max_new_tokens=prompting.max_new_tokens, clean_up_spaces=profile.clean_up_tokenization_spaces,
    )


def _generate(pair: Any, engine: Engine, works: list[_Work], variant: str, progress: Any,
              keyed: Callable[[_Work, Index], Any]) -> None:
    """Generate every row of ``works`` the store does not hold, storing each as it finishes."""
    owner: dict[Any, tuple[_Work, Index]] = {keyed(work, index): (work, index)
                                              for work in works for index in work.indices}
    keys = list(owner)

    def image_of(key: Any) -> str:
        work, index = owner[key]
        # Image identities are per benchmark: "12.png" of MMBench is not "12.png" of MME.
        return work.image_key_of(index) if len(works) == 1 else f"{work.bench.name}/{work.image_key_of(index)}"

    batches = engine.plan(keys, image_of)
    todo = [[key for key in batch if owner[key][1] not in owner[key][0].predictions] for batch in batches]
    todo = [batch for batch in todo if batch]
    missing = sum(len(batch) for batch in todo)
    for work in works:
        work.generated = sum(1 for batch in todo for key in batch if owner[key][0] is work)
        log.info("%s/%s: %d of %d predictions stored, %d to generate (store %s)", work.bench.name, variant,
                 len(work.predictions), len(work.indices), work.generated, work.log.directory)

    if missing and getattr(pair, "adapter_fingerprints", None):  # a series' pair (no load to ask)
        pair.check_variant(variant)  # a refused checkpoint: model.AdapterRefused
    label = works[0].bench.name if len(works) == 1 else "+".join(w.bench.name for w in works)
    bar = _progress_bar(f"{label} {variant}", missing, sum(len(w.indices) for w in works), progress)
    try:
        for batch in todo:
            requests = [
                GenerationRequest(
                    key=key, text=work.texts[index], images=[work.loader(index)],
                    max_new_tokens=work.max_new_tokens, image_key=image_of(key),
                    clean_up_spaces=work.clean_up_spaces,
                )
                for key in batch for work, index in [owner[key]]
            ]

            def keep(finished: list[tuple[Any, str]]) -> None:
                finished = list(finished)
                strangers = [key for key, _ in finished if key not in owner]
                if strangers:
                    raise RuntimeError(f"{label}/{variant}: generation returned keys that "
                                       f"were not asked for: {strangers[:5]}")
                for work in works:
                    mine = [(owner[key][1], prediction) for key, prediction in finished if owner[key][0] is work]
                    if mine:
                        work.log.append((index, prediction, work.wanted[index]) for index, prediction in mine)
                        work.predictions.update(mine)
                if bar is not None:
                    bar.update(len(finished))

            generated = engine.generate(requests, variant, on_finish=keep)
            unseen = [(k, v) for k, v in generated.items() if owner[k][1] not in owner[k][0].predictions]
            if unseen:  # an engine that reports no rows as they finish: store its results here
                keep(unseen)
            lost = [key for key in batch if owner[key][1] not in owner[key][0].predictions]
            if lost:
                raise RuntimeError(f"{label}/{variant}: no prediction came back for {lost}")
    except KeyboardInterrupt:
        for work in works:
            log.warning("%s/%s: interrupted; %d of %d predictions are stored and a rerun resumes "
                        "from them", work.bench.name, variant, len(work.predictions), len(work.indices))
        raise
    finally:
        if bar is not None:
            bar.close()


def store_key(pair: Any, bench: Benchmark, data: Any, profile: Profile, variant: str,
              lmu_root: str | Path, *, batch_invariant: bool = True) -> StoreKey:
    """Where the predictions of ``variant`` on ``bench`` are stored; ``data``: rows of its TSV,
    a ``data.BenchmarkData`` (its record gives the TSV's md5), or a bare frame or None (the
    md5 of the TSV in ``lmu_root``: a run's keys are known before any TSV is read).

    Below float32, an engine that is not batch-invariant makes predictions that depend on how
    the run was cut: they are kept apart, so that a batch-invariant run never resumes from
    them (nor they from it)."""
    from lavender_checks.data import BenchmarkData

    compute = _compute_of(pair)
    if compute and not batch_invariant and not compute.endswith("float32"):
        compute += "-batch-dependent"
    return StoreKey(
        base_fingerprint=pair.base_fingerprint,
        adapter_fingerprint=None if variant == BASE_VARIANT else _adapter_fingerprint(pair, variant),
        benchmark=bench.name,
        tsv_md5=_tsv_md5(data.provenance if isinstance(data, BenchmarkData) else None, bench,
                         Path(lmu_root)),
        profile_name=profile.name,
        profile_fingerprint=profile.fingerprint,
        compute=compute,
    )


def _adapter_fingerprint(pair: Any, variant: str) -> str | None:
    """The fingerprint of the adapter that computes ``variant``: a series' pair has one per
    checkpoint (``adapter_fingerprints``), any other pair one."""
    per_variant = getattr(pair, "adapter_fingerprints", None)
    if per_variant:
        return per_variant[variant]
    return pair.adapter_fingerprint


def _compute_of(pair: Any) -> str:
    """"cuda-bfloat16", "cpu-float32", ...: what the pair computes on ("" when unknown)."""
    device, dtype = getattr(pair, "device", None), getattr(pair, "dtype", None)
    if device is None or dtype is None:
        return ""
    return f"{getattr(device, 'type', device)}-{str(dtype).removeprefix('torch.')}"


def _index_of(row: Mapping[str, Any], benchmark: str, position: int) -> Index:
    if "index" not in row:
        raise KeyError(f"{benchmark}: frame row {position} has no 'index' column")
    value = row["index"]
    if isinstance(value, str):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{benchmark}: frame row {position}, column 'index': {value!r} is not "
                         "an int or a str") from None


def _tsv_md5(record: Any, bench: Benchmark, lmu_root: Path) -> str:
    """The md5 ``data.load_benchmark`` recorded (``record``), else that of the TSV in ``lmu_root``."""
    from lavender_checks.data import file_md5

    if record is not None:
        return record.md5

    return file_md5(lmu_root / bench.spec.tsv)


def _progress_bar(label: str, total: int, rows: int, progress: Any):
    """``progress``: True, False or a ``run.progress.Bars`` (that module's docstring)."""
    from lavender_checks.run.progress import resolve

    bars = resolve(progress)
    return bars(label, total, rows) if bars is not None else None

"""Predictions of one model variant on one benchmark, through the prediction store.

Rows whose prediction is already stored for the same request (same chat text and token
budget) are reused; the rest are generated batch by batch, each finished batch appended to
the store before the next one starts, so an interrupted run (Ctrl-C, a kill, a crash) keeps
what it finished and a rerun resumes from it.

Batches are cut from the whole frame in its row order, not from the rows still missing, so a
resumed run batches the remaining rows exactly as an uninterrupted run would have (batched
greedy decoding can depend on which rows share a batch).

With ``engine="fast"`` (``fastgen.py``, through ``ModelPair.generate``) the frame is handed
over in chunks of up to ``chunk_rows`` rows instead, cut after grouping the rows by
``data.image_key`` and never inside a group: the engine computes vision features once per
distinct image it is given, so the rotations of an MMBench question (whose circular copies
come after all main rows in file order) and the questions of one DocVQA page must share a
chunk. Images go as zero-argument loaders with their ``image_key``, opened on the engine's
threads while the model computes, once per image. The engine reports rows as they finish, and each is appended to the store at once:
an interrupted run loses at most the rows in flight. Which engine made a stored prediction is not part of the
store key (both give the same greedy tokens on CPU), so either engine resumes the other's
store.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lavender_checks.benchmarks import Benchmark, get_benchmark
from lavender_checks.model import DEFAULT_ENGINE, ENGINES, FAST_ENGINE, GENERATE_ENGINE
from lavender_checks.run.store import Index, PredictionStore, StoreKey, request_sha
from lavender_checks.profiles import Profile
from lavender_checks.prompts import build_prompt, chat_text, clean_up_tokenization

log = logging.getLogger(__name__)

BASE_VARIANT = "base"
# Rows handed to the fast engine at a time: more than any benchmark here has, so each
# benchmark and variant is one call and its batch drains once (docs/speed.md). The engine
# stores rows as they finish and holds only the images it is preprocessing, so a large
# chunk costs neither resumability nor memory.
DEFAULT_CHUNK_ROWS = 8192


@dataclass
class PredictionRun:
    """What ``predict_run`` did: the predictions for every row, and where they came from."""

    predictions: dict[Index, str]
    reused: int  # stored predictions of the same request
    recomputed: int  # stored, but made from another request (prompt or token budget changed)
    generated: int  # generated in this run (includes ``recomputed``)
    store_dir: Path


def predict(pair: Any, benchmark: Benchmark | str, frame: pd.DataFrame, profile: Profile,
            variant: str, store: PredictionStore, *, lmu_root: str | Path, batch_size: int = 8,
            writer: str = "main", progress: bool = True, engine: str = DEFAULT_ENGINE,
            chunk_rows: int | None = None) -> dict[Index, str]:
    """Predictions for every row of ``frame`` (index -> prediction), reusing the store."""
    return predict_run(pair, benchmark, frame, profile, variant, store, lmu_root=lmu_root,
                       batch_size=batch_size, writer=writer, progress=progress, engine=engine,
                       chunk_rows=chunk_rows).predictions


def predict_run(pair: Any, benchmark: Benchmark | str, frame: pd.DataFrame, profile: Profile,
                variant: str, store: PredictionStore, *, lmu_root: str | Path,
                batch_size: int = 8, writer: str = "main", progress: bool = True,
                engine: str = DEFAULT_ENGINE, chunk_rows: int | None = None) -> PredictionRun:
    """Predictions for every row of ``frame``, reusing the store (module docstring).

    engine: "generate": batches of ``batch_size`` rows in frame order, images opened per
    batch, ``pair.generate`` called as before engines existed. "fast" (default): chunks of
    ``chunk_rows`` rows (default ``DEFAULT_CHUNK_ROWS``) grouped by image, images as loaders,
    ``pair.generate(..., engine="fast")``.
    """
    from lavender_checks.data import image_key, load_image
    from lavender_checks.engines.batched import GenerationRequest

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; engines: {', '.join(ENGINES)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    fast = engine_of(pair, engine) == FAST_ENGINE
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    prompting = profile.for_benchmark(bench.name)
    if not profile.add_special_tokens or profile.do_sample:
        # generation.py calls the processor as VLMEvalKit does (tokenizer BOS added) and
        # decodes greedily; a profile asking otherwise cannot be honoured.
        raise ValueError(
            f"{profile.path}: profile {profile.name!r} asks for add_special_tokens="
            f"{profile.add_special_tokens}, do_sample={profile.do_sample}; generation supports "
            "only add_special_tokens=true (VLMEvalKit's call) with greedy decoding"
        )
    lmu_root = Path(lmu_root)
    dump = profile.image_dump_suffix  # the pixels VLMEvalKit's revision feeds the model

    # Prompts need no pixels; leaving out the base64 column keeps these row copies small.
    rows = frame.drop(columns=["image"], errors="ignore").to_dict("records")
    indices = [_index_of(row, bench.name, position) for position, row in enumerate(rows)]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{bench.name}: the frame repeats an index; each row needs its own")
    texts = {index: chat_text(pair.processor, build_prompt(bench, row, profile))
             for index, row in zip(indices, rows)}
    wanted = {index: request_sha(text, prompting.max_new_tokens) for index, text in texts.items()}

    key = StoreKey(
        base_fingerprint=pair.base_fingerprint,
        adapter_fingerprint=None if variant == BASE_VARIANT else pair.adapter_fingerprint,
        benchmark=bench.name,
        tsv_md5=_tsv_md5(frame, bench, lmu_root),
        profile_name=profile.name,
        profile_fingerprint=profile.fingerprint,
        compute=_compute_of(pair),
    )
    prediction_log = store.log(key, writer=writer)
    stored = prediction_log.existing()
    reusable = prediction_log.matching(wanted)
    predictions: dict[Index, str] = {index: reusable[index].prediction
                                     for index in indices if index in reusable}
    recomputed = sum(1 for index in indices if index in stored and index not in reusable)
    if recomputed:
        log.warning("%s/%s: %d stored predictions were made from another prompt or token budget "
                    "and are generated again", bench.name, variant, recomputed)

    if fast:
        # Each row's image identity, worked out once: it cuts the chunks and goes with the request.
        image_keys = {index: image_key(frame, index, dump) for index in indices}
        # By image, never cutting one; the chunks depend on the whole frame only, so a resumed
        # run cuts the same ones.
        batches = pack_groups(indices, image_keys.__getitem__, chunk_rows or DEFAULT_CHUNK_ROWS)
    else:
        batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    todo = [[index for index in batch if index not in predictions] for batch in batches]
    todo = [batch for batch in todo if batch]
    missing = sum(len(batch) for batch in todo)
    log.info("%s/%s: %d of %d predictions stored, %d to generate (store %s)", bench.name, variant,
             len(predictions), len(indices), missing, prediction_log.directory)

    bar = _progress_bar(missing, f"{bench.name} {variant}", progress)
    try:
        for batch in todo:
            # Images are opened per batch (a full benchmark's images do not fit in memory);
            # the fast engine opens them itself, from a loader bound to its row.
            requests = [
                GenerationRequest(
                    key=index,
                    text=texts[index],
                    images=[functools.partial(load_image, frame, index, bench, lmu_root, dump) if fast
                            else load_image(frame, index, bench, lmu_root, dump)],
                    max_new_tokens=prompting.max_new_tokens,
                    image_key=image_keys[index] if fast else None,
                )
                for index in batch
            ]

            def keep(finished: Iterable[tuple[Index, str]] | Mapping[Index, str]) -> None:
                # generation.py reports [(key, prediction), ...]; a mapping is taken too.
                finished = list(finished.items() if isinstance(finished, Mapping) else finished)
                if profile.clean_up_tokenization_spaces:
                    finished = [(index, clean_up_tokenization(text)) for index, text in finished]
                strangers = [index for index, _ in finished if index not in wanted]
                if strangers:
                    raise RuntimeError(f"{bench.name}/{variant}: generation returned keys that "
                                       f"were not asked for: {strangers[:5]}")
                prediction_log.append((index, prediction, wanted[index])
                                      for index, prediction in finished)
                predictions.update(finished)
                if bar is not None:
                    bar.update(len(finished))

            # The default engine's call is the one a pair without engines takes.
            engine_option = {"engine": engine} if fast else {}
            generated = pair.generate(requests, variant, batch_size=batch_size, on_batch=keep,
                                      progress=False, **engine_option)
            unseen = [(k, v) for k, v in generated.items() if k not in predictions]
            if unseen:  # a generator that reports no batches: store its results here
                keep(unseen)
            lost = [index for index in batch if index not in predictions]
            if lost:
                raise RuntimeError(f"{bench.name}/{variant}: no prediction came back for {lost}")
    except KeyboardInterrupt:
        log.warning("%s/%s: interrupted; %d of %d predictions are stored and a rerun resumes "
                    "from them", bench.name, variant, len(predictions), len(indices))
        raise
    finally:
        if bar is not None:
            bar.close()

    return PredictionRun(
        predictions={index: predictions[index] for index in indices},
        reused=len(reusable.keys() & set(indices)),
        recomputed=recomputed,
        generated=missing,
        store_dir=prediction_log.directory,
    )


def engine_of(pair: Any, asked: str) -> str:
    """The engine a run with ``pair`` uses when ``asked`` is asked for: a pair whose
    ``generate`` takes no ``engine`` keyword (one written before engines, a test double) is
    run as batched generate."""
    import inspect

    try:
        parameters = inspect.signature(pair.generate).parameters.values()
    except (TypeError, ValueError):
        return GENERATE_ENGINE
    takes_engine = any(p.name == "engine" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return asked if takes_engine else GENERATE_ENGINE


def pack_groups(items: Iterable[Any], group_of: Callable[[Any], Any], chunk_rows: int) -> list[list[Any]]:
    """``items`` grouped by ``group_of(item)`` and packed into chunks of at most ``chunk_rows``.

    Groups come in the order of their first item, items within a group in their order. A
    chunk is never cut inside a group (a group larger than ``chunk_rows`` is a chunk of its
    own), so the rows of one image are always handed to the fast engine together and their
    vision features are computed once.
    """
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    chunks: list[list[Any]] = []
    for group in groups.values():
        if chunks and len(chunks[-1]) + len(group) <= chunk_rows:
            chunks[-1].extend(group)
        else:
            chunks.append(list(group))
    return chunks


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


def _tsv_md5(frame: pd.DataFrame, bench: Benchmark, lmu_root: Path) -> str:
    """The md5 ``data.load_benchmark_frame`` recorded, else that of the TSV in ``lmu_root``."""
    md5 = frame.attrs.get("tsv_md5")
    if md5:
        return str(md5)
    from lavender_checks.data import file_md5

    return file_md5(lmu_root / bench.spec.tsv)


def _progress_bar(total: int, label: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="row")

"""The main job: predictions of base and Lavender on the benchmarks, scores, gate, report.

One run, as data (docs/architecture.md)::

    TSV frame -> run.predict (base, then Lavender: one weight copy, the base variant is the
    adapter-disabled model) -> vlmeval_io.prediction_frame -> vlmeval_io.roundtrip
    -> Benchmark.score -> gate.judge -> report.write_report

``--from-vlmeval DIR`` enters at ``vlmeval_io.read_prediction_file`` instead: the prediction
files VLMEvalKit wrote for both models are scored with no model and no GPU.

Several processes can share the generation (pytest-xdist workers, one GPU each): each one
generates one shard of every benchmark into the shared prediction store, a file barrier
(``ShardBarrier``) waits until every shard is there, and every process then scores the union,
so all of them hold the same results.

``lavender-checks run`` (``add_arguments``, ``main``) and the pytest options of ``conftest.py``
are declared once, in ``RUN_OPTIONS``.

``--engine fast`` generates with the fast greedy engine (``engines.fast``) instead of batched
``model.generate`` (``--engine generate``); ``make_engine`` turns the name into an engine. The engine decides how fast predictions come, not what they are (on CPU
both give the same tokens), so it is not part of the run label, the snapshot names or the
prediction store's key; the run metadata records it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lavender_checks import FIXTURES, REPORTS, __version__
from lavender_checks.benchmarks import ScoreResult, benchmark_names, get_benchmark
from lavender_checks.engines import DEFAULT_ENGINE, FAST_ENGINE, engine_names
from lavender_checks.model import VARIANTS

GATE_MODES = ("reproduce", "no-regression")
DEFAULT_PROFILE = "seed-report"
MINI_LMUDATA = FIXTURES / "lmudata-mini"
# The built-in default gates the tiny pair against its own numbers (the chain reproduces
# itself); real weights are gated against the seed reproduction report.
TINY_REFERENCE = FIXTURES / "reported" / "tiny-mini.toml"
SEED_REFERENCE = FIXTURES / "reported" / "seed-report.toml"
# The model names of the seed report's VLMEvalKit run (its `--model` arguments).
DEFAULT_BASE_NAME = "llama_vision_base"
DEFAULT_LAVENDER_NAME = "llama_vision_lavender"
DEFAULT_BATCH_SIZE = 8


class RunInputError(ValueError):
    """Options, folders or files that a run cannot use; the message says what and where."""


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Paths left None take their defaults."""

    base_model: Path | None = None  # None: the built-in tiny pair
    lora: Path | None = None
    lmu_data: Path | None = None  # None: fixtures/lmudata-mini for the tiny pair, else $LMUData
    benchmarks: tuple[str, ...] = field(default_factory=lambda: tuple(benchmark_names()))
    profile: str = DEFAULT_PROFILE
    reference: Path | None = None  # None: tiny-mini.toml for the tiny pair, else seed-report.toml
    gate_mode: str = "reproduce"
    limit: int | None = None  # N resampling units of every benchmark, drawn per stratum (data.subset)
    fraction: float | None = None  # a fraction of every benchmark's units, per stratum
    batch_size: int = DEFAULT_BATCH_SIZE
    store: Path | None = None  # None: the prediction store's default folder
    device: str | None = None  # None: CPU for the tiny pair, else CUDA when there is one
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA (model.load_pair)
    from_vlmeval: Path | None = None  # a VLMEvalKit work dir: score its files, load no model
    base_name: str = DEFAULT_BASE_NAME  # VLMEvalKit model names inside from_vlmeval
    lavender_name: str = DEFAULT_LAVENDER_NAME
    shard: tuple[int, int] | None = None  # (i, n): generate and score shard i of n only
    # How predictions are generated; not what they are, so not part of label().
    engine: str = DEFAULT_ENGINE
    chunk_rows: int | None = None  # rows per fast-engine call; None: the fast engine's default
    # Data that is not what the reference was measured on (gate.verdicts.noncomparable):
    strict_data: bool = False  # refuse it before any work
    allow_noncomparable: bool = False  # gate it anyway (the report still says so first)

    def __post_init__(self) -> None:
        for name in ("base_model", "lora", "lmu_data", "reference", "store", "from_vlmeval"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        self._check()

    def _check(self) -> None:
        if (self.base_model is None) != (self.lora is None):
            raise RunInputError("--base-model and --lora go together: give both (real weights) "
                                "or neither (the built-in tiny pair)")
        if self.from_vlmeval is not None and self.base_model is not None:
            raise RunInputError("--from-vlmeval scores the prediction files VLMEvalKit wrote and "
                                "loads no model: drop --base-model/--lora, or drop --from-vlmeval")
        if not self.benchmarks:
            raise RunInputError("no benchmark selected")
        known = benchmark_names()
        unknown = [b for b in self.benchmarks if b not in known]
        if unknown:
            raise RunInputError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise RunInputError(f"a benchmark is named twice: {', '.join(self.benchmarks)}")
        if self.gate_mode not in GATE_MODES:
            raise RunInputError(f"unknown gate mode {self.gate_mode!r}; modes: {', '.join(GATE_MODES)}")
        if self.limit is not None and self.fraction is not None:
            raise RunInputError("--limit and --fraction both pick a subset: give one of them")
        if self.limit is not None and self.limit < 1:
            raise RunInputError(f"--limit must be at least 1, got {self.limit}")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise RunInputError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.batch_size < 1:
            raise RunInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard is not None:
            index, count = self.shard
            if not (count >= 1 and 0 <= index < count):
                raise RunInputError(f"shard {index} of {count} does not exist (0 <= i < n)")
        if self.engine not in engine_names():
            raise RunInputError(f"unknown engine {self.engine!r}; engines: {', '.join(engine_names())}")
        if self.chunk_rows is not None:
            if self.engine != FAST_ENGINE:
                raise RunInputError("--chunk-rows sets how many rows the fast engine is handed at a "
                                    "time: it needs --engine fast")
            if self.chunk_rows < 1:
                raise RunInputError(f"--chunk-rows must be at least 1, got {self.chunk_rows}")
        for name in ("base_name", "lavender_name"):
            if not getattr(self, name):
                raise RunInputError(f"--{name.replace('_', '-')} must not be empty")
        if self.from_vlmeval is not None and self.base_name == self.lavender_name:
            raise RunInputError(f"--base-name and --lavender-name are both {self.base_name!r}: "
                                "a model cannot be compared with itself")

    @property
    def builtin_model(self) -> bool:
        """The built-in tiny pair runs (no weights given, no VLMEvalKit folder)."""
        return self.base_model is None and self.from_vlmeval is None

    def lmu_root(self) -> Path:
        """The LMUData folder: --lmu-data, else the mini benchmarks for the tiny pair, else
        VLMEvalKit's own resolution ($LMUData, then ~/LMUData)."""
        if self.lmu_data is not None:
            return self.lmu_data
        if self.builtin_model:
            return MINI_LMUDATA
        from lavender_checks.data import lmudata_root

        return Path(lmudata_root(None))

    @property
    def default_device_kind(self) -> str:
        # The tiny pair runs on the CPU unless told otherwise: its recorded numbers and
        # snapshots were made there, in float32, and a GPU (bfloat16) decodes other tokens.
        return "cpu" if self.base_model is None else "cuda"

    @property
    def device_kind(self) -> str:
        return self.device.split(":")[0] if self.device else self.default_device_kind

    def reference_path(self) -> Path:
        if self.reference is not None:
            return self.reference
        return TINY_REFERENCE if self.builtin_model else SEED_REFERENCE

    def label(self) -> str:
        """A short name of what is run, for run ids and snapshot names.

        The tiny pair on the mini benchmarks is ``tiny-mini``; real weights are named by
        their folders (``<base>+<lora>``); a subset adds ``-limitN`` / ``-fractionF``.
        """
        if self.from_vlmeval is not None:
            model = f"vlmeval-{self.base_name}+{self.lavender_name}"
        elif self.base_model is None:
            model = "tiny"
        else:
            model = f"{self.base_model.name}+{self.lora.name}"
        mini = _same_path(self.lmu_data, MINI_LMUDATA) if self.lmu_data is not None else self.builtin_model
        parts = [model, "mini" if mini else "lmudata"]
        if self.limit is not None:
            parts.append(f"limit{self.limit}")
        if self.fraction is not None:
            parts.append(f"fraction{self.fraction:g}")
        if self.shard is not None:
            parts.append(f"shard{self.shard[0]}of{self.shard[1]}")
        if self.device_kind != self.default_device_kind:
            parts.append(self.device_kind)  # other hardware, other greedy tokens
        if self.dtype is not None:
            parts.append(self.dtype)
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))

    def describe(self) -> dict[str, Any]:
        """Plain data for reports."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        data["reference"] = str(self.reference_path())
        data["label"] = self.label()
        return data


def _same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# --------------------------------------------------------------------- options (CLI and pytest)


# (flag, argparse keyword arguments). Shared by `lavender-checks run` and pytest
# (`conftest.py`), whose `addoption` takes the same keywords.
RUN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--base-model", dict(type=Path, metavar="DIR", default=None,
                          help="Hugging Face folder of Llama-3.2-11B-Vision-Instruct (with --lora); "
                               "default: the built-in tiny pair")),
    ("--lora", dict(type=Path, metavar="DIR", default=None,
                    help="the Lavender LoRA adapter folder (with --base-model)")),
    ("--lmu-data", dict(type=Path, metavar="DIR", default=None,
                        help="the LMUData folder with the benchmark TSVs; default: "
                             "fixtures/lmudata-mini for the tiny pair, else $LMUData or ~/LMUData")),
    ("--benchmark", dict(dest="benchmarks", action="append", metavar="NAME", default=None,
                         help="run only this benchmark (repeatable); default: all of "
                              + ", ".join(benchmark_names()))),
    ("--profile", dict(metavar="NAME|FILE", default=DEFAULT_PROFILE,
                       help=f"run profile (fixtures/profiles/NAME.toml or a path); default {DEFAULT_PROFILE}")),
    ("--reference", dict(type=Path, metavar="FILE", default=None,
                         help="reference numbers to gate against; default: "
                              "fixtures/reported/tiny-mini.toml for the tiny pair, else seed-report.toml")),
    ("--gate", dict(dest="gate_mode", choices=GATE_MODES, default="reproduce",
                    help="reproduce: every number within its band; no-regression: the gain and "
                         "Lavender may also be better (default reproduce)")),
    ("--limit", dict(type=int, metavar="N", default=None,
                     help="only N units of every benchmark (questions, MMBench circular groups, "
                          "MME image pairs), drawn at random stratum by stratum")),
    ("--fraction", dict(type=float, metavar="F", default=None,
                        help="only a fraction F of every benchmark's units, in every stratum")),
    ("--batch-size", dict(type=int, metavar="N", default=DEFAULT_BATCH_SIZE,
                          help=f"generation batch size (default {DEFAULT_BATCH_SIZE})")),
    ("--from-vlmeval", dict(type=Path, metavar="DIR", default=None,
                            help="score the prediction files of a VLMEvalKit work dir instead of "
                                 "generating (no model, no GPU)")),
    ("--base-name", dict(metavar="NAME", default=DEFAULT_BASE_NAME,
                         help=f"VLMEvalKit model name of the base model (default {DEFAULT_BASE_NAME})")),
    ("--lavender-name", dict(metavar="NAME", default=DEFAULT_LAVENDER_NAME,
                             help=f"VLMEvalKit model name of Lavender (default {DEFAULT_LAVENDER_NAME})")),
    ("--store", dict(type=Path, metavar="DIR", default=None,
                     help="the prediction store (default reports/store); a rerun reuses it")),
    ("--device", dict(metavar="DEVICE", default=None,
                      help="torch device for the model (default: cpu for the built-in tiny pair, "
                           "else cuda when available)")),
    ("--dtype", dict(choices=("float32", "bfloat16", "float16"), default=None,
                     help="weights and compute dtype (default: float32 on CPU, bfloat16 on CUDA)")),
    ("--engine", dict(choices=engine_names(), default=DEFAULT_ENGINE,
                      help=f"generation engine: {FAST_ENGINE} (the default: rows leave the batch as they "
                           "finish, vision once per image, CUDA graphs; docs/speed.md) or generate "
                           "(batched model.generate)")),
    ("--chunk-rows", dict(type=int, metavar="N", default=None,
                          help="with --engine fast: rows handed to the engine at a time, grouped by "
                               "image (default: a whole benchmark); an interrupted run keeps every "
                               "finished row")),
    ("--strict-data", dict(action="store_true", default=False,
                           help="refuse, before any work, a TSV that is not the one the reference's "
                                "numbers came from (VLMEvalKit's: md5, row count)")),
    ("--allow-noncomparable", dict(action="store_true", default=False,
                                   help="gate a run on such data anyway (without it the run fails, "
                                        "saying why)")),
)

# Where reports go; not part of what a run computes, so not a RunConfig field.
REPORTS_OPTION = ("--reports", dict(type=Path, metavar="DIR", default=REPORTS,
                                    help=f"where <run-id>/ reports are written (default {REPORTS})"))

# The RunConfig field each option sets (its argparse dest).
_OPTION_FIELDS = {flag: kwargs.get("dest", flag[2:].replace("-", "_")) for flag, kwargs in RUN_OPTIONS}


def add_run_options(add: Callable[..., Any]) -> None:
    """Declare the run options and ``--reports`` with ``add`` (argparse's ``add_argument`` or
    pytest's ``addoption``)."""
    for flag, kwargs in (*RUN_OPTIONS, REPORTS_OPTION):
        add(flag, **kwargs)


def config_from_options(get: Callable[[str], Any]) -> RunConfig:
    """A RunConfig from parsed options; ``get(dest)`` reads one (argparse or pytest)."""
    values = {dest: get(dest) for dest in _OPTION_FIELDS.values()}
    if values["benchmarks"] is None:
        values.pop("benchmarks")
    return RunConfig(**values)


# ------------------------------------------------------------------------------- results


@dataclass
class RunResults:
    """What a run computed.

    results: benchmark -> {"base": ScoreResult | None, "lavender": ScoreResult | None}, for
        every benchmark of the run (None where a benchmark is missing) — what gate.judge takes.
    missing: benchmark -> why it has no result (e.g. its TSV is absent, naming the file).
    predictions: benchmark -> variant -> index -> raw prediction (the scored rows, in order).
    metadata: fingerprints, profile, data md5 and match, versions, prediction counts, timing.
    """

    config: RunConfig
    results: dict[str, dict[str, ScoreResult | None]]
    missing: dict[str, str]
    predictions: dict[str, dict[str, dict[Any, str]]]
    metadata: dict[str, Any]


def collect_results(config: RunConfig, *, pair: Any = None, load_pair: Callable[[], Any] | None = None,
                    shard: tuple[int, int] | None = None, wait_for_shards: ShardBarrier | None = None,
                    writer: str = "main", progress: bool = True) -> RunResults:
    """Predictions (generated or read from VLMEvalKit files) and scores of both variants.

    pair / load_pair: the loaded ModelPair, or a function that loads it (called only once
        data is checked and this process's shard is claimed); default: load from ``config``.
    shard: (i, n) — this process generates shard i of n of every benchmark (default
        ``config.shard``). Without ``wait_for_shards`` only shard i is scored.
    wait_for_shards: a ShardBarrier shared by the n processes: after its own shard this
        process also generates any shard no process has claimed, waits until every shard is
        in the store, and scores the union (the same results in every process).
    writer: this process's file name in the prediction store (one per process).
    """
    if config.from_vlmeval is not None:
        return _collect_from_vlmeval(config)
    shard = shard if shard is not None else config.shard
    if wait_for_shards is not None:
        if shard is None:
            raise ValueError("wait_for_shards needs the shard this process generates")
        if wait_for_shards.count != shard[1]:
            raise ValueError(f"the barrier waits for {wait_for_shards.count} shards, not {shard[1]}")
    if pair is None and load_pair is None:
        load_pair = lambda: load_model_pair(config)  # noqa: E731
    return _collect_generated(config, pair, load_pair, shard, wait_for_shards, writer, progress)


def load_model_pair(config: RunConfig):
    """The base model with the adapter, one weight copy (the tiny pair by default)."""
    from lavender_checks.model import load_pair

    if config.base_model is None:
        from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

        checkpoints = ensure_tiny_checkpoints()
        return load_pair(checkpoints.base, checkpoints.adapter, device=config.device or "cpu",
                         dtype=config.dtype)
    for flag, path in (("--base-model", config.base_model), ("--lora", config.lora)):
        if not path.is_dir():
            raise RunInputError(f"{flag} {path}: no such folder")
    return load_pair(config.base_model, config.lora, device=config.device, dtype=config.dtype)


@dataclass
class _BenchmarkData:
    full: Any  # the benchmark's whole TSV frame
    selected: Any  # the rows this run scores (subset of `full`)
    tsv: Path


def _load_data(config: RunConfig, root: Path, shard: tuple[int, int] | None
               ) -> tuple[dict[str, _BenchmarkData], dict[str, str]]:
    """Frames of the benchmarks whose TSV is there (the rows to score: ``shard`` of the
    subset, or all of it); the others are missing, naming the file."""
    from lavender_checks.data import load_benchmark_frame, subset

    if not root.is_dir():
        raise RunInputError(f"LMUData folder {root} does not exist")
    data: dict[str, _BenchmarkData] = {}
    missing: dict[str, str] = {}
    for name in config.benchmarks:
        bench = get_benchmark(name)
        tsv = root / bench.spec.tsv
        if not tsv.is_file():
            missing[name] = f"{tsv} does not exist"
            continue
        full = load_benchmark_frame(bench, root)
        if config.strict_data:
            _refuse_noncomparable(config, name, full)
        selected = subset(full, bench, limit=config.limit, fraction=config.fraction, shard=shard)
        data[name] = _BenchmarkData(full=full, selected=selected, tsv=tsv)
    if not data:
        raise RunInputError(f"none of the benchmark TSVs is in {root}: "
                            + "; ".join(missing.values()))
    return data, missing


def _refuse_noncomparable(config: RunConfig, benchmark: str, frame) -> None:
    """--strict-data: a TSV that is not the reference's data is an input error, before any work."""
    from lavender_checks.data import provenance
    from lavender_checks.gate.verdicts import data_mismatch, load_reference

    why = data_mismatch(load_reference(config.reference_path()), benchmark, provenance(frame))
    if why:
        raise RunInputError(f"--strict-data: {why}; its scores are not comparable with the reference")


def _collect_generated(config: RunConfig, pair: Any, load_pair: Callable[[], Any] | None,
                       shard: tuple[int, int] | None, barrier: ShardBarrier | None,
                       writer: str, progress: bool) -> RunResults:
    from lavender_checks.data import subset
    from lavender_checks.run.store import PredictionStore
    from lavender_checks.profiles import load_profile
    from lavender_checks.engines import make_engine
    from lavender_checks.run.predict import predict_run

    started = time.time()
    profile = load_profile(config.profile)
    for name in config.benchmarks:
        profile.for_benchmark(name)  # a benchmark the profile lacks is an error before any work
    root = config.lmu_root()
    # With a barrier every process scores the union of the shards; without one, its own shard.
    data, missing = _load_data(config, root, shard if barrier is None else None)
    store = PredictionStore(config.store)

    def the_pair():
        nonlocal pair
        if pair is None:
            pair = load_pair()
        return pair

    engine = None

    def the_engine():  # where the run's engine name becomes an engine
        nonlocal engine
        if engine is None:
            engine = make_engine(config.engine, the_pair(), batch_size=config.batch_size,
                                 chunk_rows=config.chunk_rows)
        return engine

    def predict(name: str, frame, variant: str):
        return predict_run(the_pair(), the_engine(), get_benchmark(name), frame, profile, variant,
                           store, lmu_root=root, writer=writer, progress=progress)

    def generate_shard(index: int, count: int) -> None:
        for name, item in data.items():
            frame = subset(item.full, name, limit=config.limit, fraction=config.fraction,
                           shard=(index, count))
            for variant in VARIANTS:
                if len(frame):
                    predict(name, frame, variant)

    predictions: dict[str, dict[str, dict[Any, str]]] = {name: {} for name in data}
    counts: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in data}
    generation_started = time.time()
    # The tiny model gains nothing from intra-op threads and, on a busy machine, loses
    # several times over to their synchronisation (measured: 20 s with one thread against
    # 35-180 s with two on this project's 2-core machine).
    with _torch_threads(1) if config.base_model is None else contextlib.nullcontext():
        if shard is not None and barrier is not None:
            _generate_shards(shard, barrier, generate_shard, the_pair)
        # With a barrier every shard is stored by now: this pass only reads the store.
        for name, item in data.items():
            for variant in VARIANTS:
                t0 = time.time()
                run = predict(name, item.selected, variant)
                predictions[name][variant] = run.predictions
                counts[name][variant] = {"rows": len(run.predictions), "reused": run.reused,
                                         "generated": run.generated, "recomputed": run.recomputed,
                                         "seconds": round(time.time() - t0, 3)}
    generation_seconds = time.time() - generation_started

    results, scoring_seconds = _score_all(config, data, predictions, missing)
    the_model = the_pair()
    metadata = {
        "mode": "generated",
        **_common_metadata(config, started),
        "models": the_model.describe(),
        "fingerprints": {"base": the_model.base_fingerprint, "adapter": the_model.adapter_fingerprint},
        "engine": _describe_engine(config, the_engine()),
        "profile": profile.describe(),
        "lmu_data": str(root),
        "data": {name: _describe_data(item) for name, item in data.items()},
        "missing": dict(missing),
        "predictions": counts,
        "store": str(store.root),
        "writer": writer,
        "shard": list(shard) if shard is not None else None,
        # which physical GPU this process saw (conftest pins one per xdist worker)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "timing": {"generation_s": round(generation_seconds, 3), "scoring_s": round(scoring_seconds, 3),
                   "total_s": round(time.time() - started, 3)},
    }
    return RunResults(config=config, results=results, missing=missing, predictions=predictions,
                      metadata=metadata)


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


def _generate_shards(shard: tuple[int, int], barrier: ShardBarrier,
                     generate: Callable[[int, int], None], the_pair: Callable[[], Any]) -> None:
    own, count = shard
    # Claimed before the model loads, so that a faster process does not take it meanwhile;
    # the load runs inside `working`, whose heartbeat covers a slow load and whose failure
    # record stops the other processes at once.
    if barrier.claim(own):
        with barrier.working(own):
            the_pair()
            generate(own, count)
    # A shard no process has claimed (its process runs other tests, or never started) is
    # generated here rather than waited for.
    for other in range(count):
        if other != own and barrier.claim(other):
            with barrier.working(other):
                generate(other, count)
    barrier.wait()


def _score_all(config: RunConfig, data: Mapping[str, _BenchmarkData],
               predictions: Mapping[str, Mapping[str, Mapping[Any, str]]],
               missing: Mapping[str, str]) -> tuple[dict[str, dict[str, ScoreResult | None]], float]:
    from lavender_checks.vlmeval_io import prediction_frame, roundtrip

    t0 = time.time()
    results: dict[str, dict[str, ScoreResult | None]] = {}
    for name in config.benchmarks:
        if name in missing:
            results[name] = {variant: None for variant in VARIANTS}
            continue
        bench = get_benchmark(name)
        item = data[name]
        results[name] = {}
        for variant in VARIANTS:  # paired by construction: both variants predicted item.selected
            frame = roundtrip(prediction_frame(item.selected, predictions[name][variant]))
            results[name][variant] = bench.score(frame, meta=item.full)
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


def _describe_data(item: _BenchmarkData) -> dict[str, Any]:
    """The file's identity (md5 and whether it is VLMEvalKit's) and the rows scored."""
    from lavender_checks.data import provenance

    return {**provenance(item.selected), "scored_rows": len(item.selected)}


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


def _collect_from_vlmeval(config: RunConfig) -> RunResults:
    """Both models' prediction files of every benchmark, read as VLMEvalKit's evaluate() reads
    them and scored; a benchmark whose files are absent is missing, saying where it looked.
    The benchmark TSV, when LMUData has it, checks the indices (and gives MMBench its answers,
    as in VLMEvalKit)."""
    from lavender_checks.data import provenance, subset
    from lavender_checks.benchmarks.signature import check_signature
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
    for benchmark in config.benchmarks:
        bench = get_benchmark(benchmark)
        paths, absent = {}, []
        for variant in VARIANTS:
            try:
                paths[variant] = find_prediction_file(work_dir, names[variant], benchmark)
            except FileNotFoundError as exc:  # its message says where it looked
                absent.append(str(exc).replace(":\n  ", ": ").replace("\n  ", ", "))
        if absent:
            missing[benchmark] = "; ".join(absent)
            results[benchmark] = {v: None for v in VARIANTS}
            continue
        frames = {v: read_prediction_file(paths[v]) for v in VARIANTS}
        for v in VARIANTS:  # a file of another benchmark is refused, naming what it looks like
            check_signature(frames[v], benchmark, str(paths[v]))
        meta = _optional_meta(bench, meta_root)
        if meta is not None and config.strict_data:
            _refuse_noncomparable(config, benchmark, meta)
        whole = frames
        if config.limit is not None or config.fraction is not None:
            frames = {v: subset(f, bench, limit=config.limit, fraction=config.fraction)
                      for v, f in frames.items()}
        _check_paired(benchmark, {v: list(frames[v]["index"]) for v in VARIANTS},
                      {v: str(paths[v]) for v in VARIANTS})
        results[benchmark] = {v: bench.score(frames[v], meta=meta) for v in VARIANTS}
        if meta is None and whole is not frames:  # the files are the whole: a subset's bands widen
            for v in VARIANTS:
                results[benchmark][v].population = bench.population(whole["base"])
        predictions[benchmark] = {v: dict(zip(frames[v]["index"].tolist(),
                                              frames[v]["prediction"].map(str).tolist()))
                                  for v in VARIANTS}
        files[benchmark] = {v: str(paths[v]) for v in VARIANTS}
        data_info[benchmark] = {"meta": provenance(meta) if meta is not None else None,
                                "scored_rows": len(frames["base"])}
    if len(missing) == len(config.benchmarks):
        raise RunInputError(f"--from-vlmeval {work_dir}: no prediction files of "
                            f"{config.base_name} and {config.lavender_name}; "
                            + "; ".join(f"{b}: {r}" for b, r in missing.items()))
    metadata = {
        "mode": "from-vlmeval",
        **_common_metadata(config, started),
        "work_dir": str(work_dir),
        "models": names,
        "files": files,
        "data": data_info,
        "missing": dict(missing),
        "timing": {"total_s": round(time.time() - started, 3)},
    }
    return RunResults(config=config, results=results, missing=missing, predictions=predictions,
                      metadata=metadata)


def _optional_lmu_root(config: RunConfig) -> Path | None:
    """Where to find the TSVs that check a VLMEvalKit file's indices, if anywhere."""
    if config.lmu_data is not None:
        if not config.lmu_data.is_dir():
            raise RunInputError(f"--lmu-data {config.lmu_data}: no such folder")
        return config.lmu_data
    from lavender_checks.data import lmudata_root

    root = lmudata_root(None)
    return root if root.is_dir() else None  # no LMUData: the files are scored on their own


def _optional_meta(bench: Any, root: Path | None):
    if root is None or not (root / bench.spec.tsv).is_file():
        return None
    from lavender_checks.data import load_benchmark_frame

    return load_benchmark_frame(bench, root)


# ---------------------------------------------------------------------------- shard barrier


class ShardTimeout(RuntimeError):
    """A shard that another process claimed shows no sign of life."""


class ShardFailed(RuntimeError):
    """Another process failed while generating a shard."""


class ShardBarrier:
    """Shares the generation of ``count`` shards among processes through files in one folder.

    ``<shard>.claim`` is created exclusively by the process that generates the shard (so no
    shard is generated twice) and touched every few seconds while it works; ``<shard>.done``
    or ``<shard>.failed`` (with the error) is written when it ends. ``wait`` returns once
    every shard is done; it raises when a shard failed, or when a claimed shard shows no sign
    of life for ``stall_timeout`` seconds (its process died: the predictions it stored are
    kept, and a rerun resumes from them).
    """

    def __init__(self, directory: str | Path, count: int, owner: str, *,
                 stall_timeout: float = 600.0, poll: float = 0.5, heartbeat: float = 5.0):
        if count < 1:
            raise ValueError(f"a barrier needs at least one shard, got {count}")
        self.directory = Path(directory)
        self.count = count
        self.owner = owner
        self.stall_timeout = stall_timeout
        self.poll = poll
        self.heartbeat = heartbeat
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str | int, suffix: str) -> Path:
        return self.directory / f"{name}.{suffix}"

    def claim(self, name: str | int) -> bool:
        """True for exactly one caller per name, across processes."""
        try:
            fd = os.open(self._path(name, "claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"owner": self.owner, "pid": os.getpid()}) + "\n")
        return True

    def owner_of(self, name: str | int) -> str:
        try:
            return json.loads(self._path(name, "claim").read_text())["owner"]
        except (OSError, ValueError, KeyError):
            return "an unknown process"

    @contextlib.contextmanager
    def working(self, shard: int) -> Iterator[None]:
        """Generate ``shard`` inside this block: a heartbeat runs, and the outcome is recorded."""
        claim = self._path(shard, "claim")
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                with contextlib.suppress(OSError):
                    os.utime(claim)

        thread = threading.Thread(target=beat, name=f"shard-{shard}-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        except BaseException as exc:
            self._write(self._path(shard, "failed"), f"{type(exc).__name__}: {exc}")
            raise
        else:
            self._write(self._path(shard, "done"), self.owner)
        finally:
            stop.set()
            thread.join()

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def wait(self) -> None:
        """Return once every shard is done."""
        waiting_since = time.time()
        while True:
            pending = []
            for shard in range(self.count):
                if self._path(shard, "done").is_file():
                    continue
                failed = self._path(shard, "failed")
                if failed.is_file():
                    raise ShardFailed(
                        f"shard {shard} of {self.count} failed in {self.owner_of(shard)}: "
                        f"{failed.read_text(encoding='utf-8').strip()} (see that process's output; "
                        f"barrier folder {self.directory})"
                    )
                claim = self._path(shard, "claim")
                try:
                    silent = time.time() - claim.stat().st_mtime
                    who = f"claimed by {self.owner_of(shard)}"
                except FileNotFoundError:
                    silent = time.time() - waiting_since
                    who = "claimed by no process"
                if silent > self.stall_timeout:
                    raise ShardTimeout(
                        f"shard {shard} of {self.count}, {who}, has shown no sign of life for "
                        f"{silent:.0f} s (limit {self.stall_timeout:g} s; barrier folder "
                        f"{self.directory}); its process probably died: see its output. The "
                        "predictions it stored are kept, and a rerun resumes from them."
                    )
                pending.append(shard)
            if not pending:
                return
            time.sleep(self.poll)


# ---------------------------------------------------------------------------- gate and report


@dataclass
class GateOutcome:
    reference: Any  # gate.Reference
    verdicts: list  # gate.Verdict, in the reference's order
    report: Path | None = None
    noncomparable: dict = field(default_factory=dict)  # benchmark -> why its data is not the reference's

    @property
    def passed(self) -> bool:
        return all(v.status == "pass" for v in self.verdicts)

    def verdict(self, row_id: str, quantity: str):
        """The verdict of one reference row's quantity ("base", "lavender" or "gain")."""
        for verdict in self.verdicts:
            if verdict.row_id == row_id and verdict.quantity == quantity:
                return verdict
        raise KeyError(f"no verdict for {row_id} {quantity} (reference {self.reference.path})")

    def table(self, only_problems: bool = False) -> str:
        from lavender_checks.gate.verdicts import summary_table

        return summary_table(self.verdicts, only_problems=only_problems)


def judge_run(run: RunResults, reference: Any = None) -> GateOutcome:
    """Verdicts of every reference row (``reference``: a loaded gate.Reference, else the
    run's reference file)."""
    from lavender_checks.gate.verdicts import judge, load_reference, noncomparable

    reference = reference if reference is not None else load_reference(run.config.reference_path())
    return GateOutcome(reference, judge(reference, run.results, mode=run.config.gate_mode,
                                          missing_reasons=run.missing),
                       noncomparable=noncomparable(reference, run.metadata))


def write_run_report(run: RunResults, outcome: GateOutcome, *, reports_root: Path = REPORTS) -> Path:
    """``reports_root/<new run id>/`` (report.md, report.json, gains.png, flips.jsonl)."""
    from lavender_checks.gate.report import write_report

    outcome.report = Path(write_report(reports_root, None, outcome.reference, outcome.verdicts,
                                       run.results, run.metadata))
    return outcome.report


# ------------------------------------------------------------------------- recorded references


def write_reference(run: RunResults, path: str | Path, *, template: str | Path = SEED_REFERENCE,
                    description: str = "") -> Path:
    """Record this run's numbers as a reference file (the schema of ``fixtures/reported``).

    The rows are the template's (the same tables, labels and metrics), their numbers this
    run's, each printed to 2 decimals as a report prints them (delta = the difference of the
    printed numbers); [gate] and [derived] are the template's. A row this run did not measure
    is an error: a reference holds no number that was not computed.
    """
    from lavender_checks.gate.verdicts import load_reference

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
        "lmu_data_md5": {b: d.get("md5") for b, d in meta.get("data", {}).items()},
        "greedy": True,
        "template": _repo_relative(template_ref.path),
    }
    gate = template_ref.gate
    lines = [
        f"# Reference numbers recorded by `lavender-checks run --write-reference` from {_repo_relative(template_ref.path)}'s rows.",
        "# Schema: see fixtures/reported/seed-report.toml.",
        "",
        "[run]",
        *(f"{key} = {_toml_value(value)}" for key, value in settings.items() if value is not None),
        "",
        "[gate]",
        f"confidence = {gate.confidence!r}",
        f"n_resamples = {gate.n_resamples}",
        f"seed = {gate.seed}",
        f"consistency_tolerance = {gate.consistency_tolerance!r}",
        "",
        "[gate.floor]",
        *(f"{unit} = {value!r}" for unit, value in gate.floors.items()),
    ]
    for benchmark, derived in template_ref.derived.items():
        lines += ["", f"[derived.{benchmark}]",
                  *(f"{name} = {_toml_value(list(parts))}" for name, parts in derived.items())]
    for row, base, lavender in rows:
        lines += ["", "[[row]]", f"table = {_toml_value(row.table)}"]
        if row.subtable is not None:
            lines.append(f"subtable = {_toml_value(row.subtable)}")
        lines += [f"label = {_toml_value(row.label)}", f"benchmark = {_toml_value(row.benchmark)}",
                  f"metric = {_toml_value(row.metric)}", f"unit = {_toml_value(row.unit)}",
                  f"base = {base:.2f}", f"lavender = {lavender:.2f}",
                  f"delta = {round(lavender - base, 2) + 0.0:.2f}"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    load_reference(path)  # what was written reads back as a valid reference
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()
                                if v is not None) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _repo_relative(path: Path) -> str:
    from lavender_checks import REPO_ROOT

    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    add_run_options(parser.add_argument)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (transformers' included); only the verdicts that did not pass")
    parser.add_argument("--write-reference", type=Path, metavar="FILE", default=None,
                        help="record this run's numbers as a reference file (the rows of --reference, "
                             "default seed-report.toml) instead of gating it")


def input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit status 2), as opposed to a failing gate or a bug."""
    from lavender_checks.benchmarks import UnknownBenchmark
    from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
    from lavender_checks.data import DataError
    from lavender_checks.gate.verdicts import ReferenceFileError
    from lavender_checks.model import ModelLoadError
    from lavender_checks.run.store import PredictionStoreError
    from lavender_checks.profiles import ProfileError
    from lavender_checks.vlmeval_io import PredictionFileError

    return (RunInputError, UnknownBenchmark, ScoringInputError, DataError, ReferenceFileError,
            ModelLoadError, PredictionStoreError, ProfileError, PredictionFileError)


def _quiet_library_progress() -> None:
    """--quiet: transformers' and huggingface_hub's progress bars (loading weights) off too."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def main(args) -> int:
    try:
        config = config_from_options(lambda dest: getattr(args, dest))
    except RunInputError as exc:
        print(f"lavender-checks run: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:
        _quiet_library_progress()
    if args.write_reference is not None:
        return _record_reference(config, args)
    try:
        from lavender_checks.gate.verdicts import load_reference

        reference = load_reference(config.reference_path())  # a bad file fails before any work
        run = collect_results(config, progress=not args.quiet)
        outcome = judge_run(run, reference)
        path = write_run_report(run, outcome, reports_root=args.reports)
    except input_errors() as exc:
        print(f"lavender-checks run: {exc}", file=sys.stderr)
        return 2
    from lavender_checks.gate.verdicts import noncomparable_notice

    print(outcome.table(only_problems=args.quiet))
    for benchmark, reason in run.missing.items():
        print(f"missing {benchmark}: {reason}")
    print(f"report: {path}")
    problems = outcome.noncomparable
    if problems:  # last, where a reader looks first
        print(noncomparable_notice(problems, config.allow_noncomparable))
    return 0 if outcome.passed and (not problems or config.allow_noncomparable) else 1


TINY_REFERENCE_DESCRIPTION = (
    "The built-in tiny pair's own numbers on the mini benchmarks (fixtures/lmudata-mini), "
    "recorded with the seed report's profile. They say nothing about Llama-3.2-11B-Vision or "
    "Lavender: the default gate uses them to check that the whole chain (data, prompts, "
    "generation, store, scoring, gate) reproduces itself."
)


def _record_reference(config: RunConfig, args) -> int:
    from lavender_checks.gate.verdicts import load_reference

    template = config.reference or SEED_REFERENCE
    description = TINY_REFERENCE_DESCRIPTION if config.builtin_model and config.lmu_data is None else ""
    try:
        load_reference(template)
        run = collect_results(config, progress=not args.quiet)
        path = write_reference(run, args.write_reference, template=template, description=description)
    except input_errors() as exc:
        print(f"lavender-checks run: {exc}", file=sys.stderr)
        return 2
    print(f"reference: {path}")
    return 0

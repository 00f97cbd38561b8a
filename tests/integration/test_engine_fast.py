"""``--engine fast``: the fast greedy engine as a run's engine.

On the tiny model on CPU a run with the fast engine computes exactly what a run with the
batched engine computes (predictions and scores, every mini benchmark, both variants);
either engine resumes a store the other one filled without generating a stored row again;
what the fast engine cannot take goes to the batched engine. With stand-in engines (the real
engines' plans, answers at once): the run groups rows by image, never cuts a chunk inside a
group, binds one loader per row, stores rows as they are reported, and leaves the batched
engine's batches as they were.

The engines are compared with each other, never with recorded strings: the tiny model's
outputs are not fixed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from lavender_checks import FIXTURES, engines
from lavender_checks.benchmarks import benchmark_names
from lavender_checks.data import BenchmarkData, image_key, load_benchmark, load_image
from lavender_checks.engines import batched as generation
from lavender_checks.engines import make_engine, register_engine
from lavender_checks.engines.batched import BatchedEngine
from lavender_checks.engines.fast import FastEngine
from lavender_checks.engines.fast.config import DEFAULT_CHUNK_ROWS, FastGenConfig
from lavender_checks.engines.request import GenerationRequest
from lavender_checks.model import VARIANTS
from lavender_checks.profiles import load_profile
from lavender_checks.run import pipeline
from lavender_checks.run.collect import collect_results
from lavender_checks.run.config import SEED_REFERENCE, RunConfig, RunInputError, config_from_options
from lavender_checks.run.judge import judge_run, write_run_report
from lavender_checks.run.predict import predict_run
from lavender_checks.run.store import PredictionStore
from tests.helpers import chat, lazily_opened, sample_image

MINI = FIXTURES / "lmudata-mini"
FAST_LOGGER = "lavender_checks.engines.fast"


class Stop(RuntimeError):
    """Ends a run in the middle, as a kill would (after what was reported is stored)."""


class Recording:
    """An engine that passes every call on to ``engine`` and records it: the keys asked, and
    the keys reported back. With ``stop_after`` it raises ``Stop`` once that many rows have
    been reported (and stored by the run)."""

    def __init__(self, engine, stop_after: int | None = None):
        self.engine = engine
        self.name = engine.name
        self.batch_invariant = engine.batch_invariant
        self.stop_after = stop_after
        self.calls: list[list] = []
        self.reported: list = []

    def plan(self, keys, image_key_of):
        return self.engine.plan(keys, image_key_of)

    def describe(self):
        return self.engine.describe()

    def generate(self, requests, variant, on_finish=None):
        self.calls.append([r.key for r in requests])

        def report(finished):
            on_finish(finished)
            self.reported.extend(key for key, _ in finished)
            if self.stop_after is not None and len(self.reported) >= self.stop_after:
                raise Stop(f"stopped after {len(self.reported)} rows")

        return self.engine.generate(requests, variant, on_finish=report)

    @property
    def asked(self) -> list:
        return [key for keys in self.calls for key in keys]


# ----------------------------------------------------------------------- the same run, faster


def test_a_fast_engine_run_computes_what_a_batched_engine_run_computes(tiny_pair, tmp_path, monkeypatch):
    runs, recorders = {}, {}
    real = engines.make_engine

    def recording(name, pair, **options):  # the engine the run makes from its name, recorded
        recorders[name] = Recording(real(name, pair, **options))
        return recorders[name]

    monkeypatch.setattr(engines, "make_engine", recording)
    for engine, chunk_rows in (("generate", None), ("fast", 20)):
        config = RunConfig(store=tmp_path / engine, engine=engine, chunk_rows=chunk_rows)
        runs[engine] = collect_results(config, pair=tiny_pair, progress=False)
    default, fast = runs["generate"], runs["fast"]

    assert set(fast.predictions) == set(benchmark_names())
    for benchmark in benchmark_names():
        for variant in VARIANTS:
            assert fast.predictions[benchmark][variant] == default.predictions[benchmark][variant], (
                f"{benchmark}/{variant}")
            assert fast.results[benchmark][variant].metrics == default.results[benchmark][variant].metrics
    # A comparison worth making: the tiny model says different things on different rows.
    said = [p for bench in default.predictions.values() for v in bench.values() for p in v.values()]
    assert len(set(said)) >= 5

    # Each engine really did the work: every row asked of it, none handed over.
    rows = sum(len(v) for bench in default.predictions.values() for v in bench.values())
    assert isinstance(recorders["fast"].engine, FastEngine)
    assert isinstance(recorders["generate"].engine, BatchedEngine)
    assert len(recorders["fast"].asked) == len(recorders["generate"].asked) == rows
    assert recorders["fast"].engine.fallbacks == []
    assert recorders["fast"].engine.generator.last_stats.rows > 0

    # The engine is recorded, but it does not name the run.
    engine = dict(fast.metadata["engine"])
    environment, numerics = engine.pop("environment"), engine.pop("numerics")
    assert engine == {"name": "fast", "chunk_rows": 20, "fallbacks": [], "batch_invariant": True}
    # what a bf16 snapshot depends on besides the inputs, recorded to explain a changed one
    assert {"torch", "cuda", "transformers", "peft", "gpu"} <= set(environment) and environment["gpu"] is None
    assert numerics["decode_rows"] == 128 and numerics["prefill_rows"] == 8
    assert default.metadata["engine"] == {"name": "generate"}
    assert fast.metadata["config"]["engine"] == "fast"
    assert fast.metadata["label"] == default.metadata["label"] == "tiny-mini"


# ----------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("first, second", [("generate", "fast"), ("fast", "generate")])
def test_either_engine_resumes_a_store_the_other_filled(tiny_pair, tmp_path, first, second):
    benchmark = "MMBench_DEV_EN"  # rotations of one image: the fast engine's chunks regroup rows
    loaded = load_benchmark(benchmark, MINI)
    frame = loaded.frame[loaded.frame["index"] % 1_000_000 < 6]  # six questions with their rotations
    profile = load_profile("seed-report")

    def run(engine, store, stop_after=None):
        recorder = Recording(make_engine(engine, tiny_pair, batch_size=4, chunk_rows=8 if engine == "fast" else None),
                             stop_after=stop_after)
        return recorder, predict_run(tiny_pair, recorder, benchmark, BenchmarkData(frame, loaded.provenance),
                                     profile, "lavender",
                                     PredictionStore(store), lmu_root=MINI, progress=False)

    with pytest.raises(Stop):
        run(first, tmp_path / "store", stop_after=1)  # stops after its first report
    stored = {key for key in frame["index"]
              if key in PredictionStore(tmp_path / "store").log(_only_key(tmp_path / "store")).existing()}
    assert 0 < len(stored) < len(frame)

    resumed, outcome = run(second, tmp_path / "store")
    assert set(resumed.asked) == set(frame["index"]) - stored  # no stored row generated again
    assert len(resumed.asked) == len(set(resumed.asked))
    assert (outcome.reused, outcome.generated, outcome.recomputed) == (len(stored), len(frame) - len(stored), 0)

    _, whole = run(first, tmp_path / "whole")
    assert outcome.predictions == whole.predictions


def _only_key(store: Path):
    import json

    from lavender_checks.run.store import StoreKey

    (key_file,) = store.rglob("key.json")
    return StoreKey(**json.loads(key_file.read_text()))


# ------------------------------------------------------------------------------------ fallback


def _text_only(processor, key: str) -> GenerationRequest:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "how many bars are there"}]}],
        add_generation_prompt=True)
    return GenerationRequest(key=key, text=text, images=[], max_new_tokens=12)


def _two_images(processor, key: str) -> GenerationRequest:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "which chart is larger"}]}],
        add_generation_prompt=True)
    return GenerationRequest(key=key, text=text, images=[sample_image(1), sample_image(2)], max_new_tokens=12)


def _one_image(processor, key: str, seed: int) -> GenerationRequest:
    return GenerationRequest(key=key, text=chat(processor, "what is the total amount shown", bool(seed % 2)),
                             images=[sample_image(seed)], max_new_tokens=12)


@pytest.fixture()
def pair(tiny_pair):
    return tiny_pair


def _spy_on_default_engine(monkeypatch) -> list[list[GenerationRequest]]:
    calls = []
    real = generation.generate

    def spy(pair, requests, variant, **options):
        calls.append(list(requests))
        return real(pair, requests, variant, **options)

    monkeypatch.setattr(generation, "generate", spy)
    return calls


@pytest.mark.parametrize("odd_one, reason", [(_text_only, "has 0 images"), (_two_images, "has 2 images")])
def test_a_request_without_exactly_one_image_goes_to_the_default_engine(pair, monkeypatch, caplog, odd_one, reason):
    requests = [_one_image(pair.processor, "a", 3), odd_one(pair.processor, "odd"), _one_image(pair.processor, "b", 4)]
    expected = generation.generate(pair, requests, "lavender", batch_size=2, progress=False)
    calls = _spy_on_default_engine(monkeypatch)
    reported = []
    engine = FastEngine(pair, batch_size=2)
    with caplog.at_level(logging.WARNING, logger=FAST_LOGGER):
        got = engine.generate(requests, "lavender", on_finish=reported.extend)
    assert got == expected and dict(reported) == expected
    assert [r.key for call in calls for r in call] == ["a", "odd", "b"]
    assert any(reason in fallback for fallback in engine.fallbacks)
    assert engine.describe()["fallbacks"] == engine.fallbacks
    assert f"'odd' {reason}" in caplog.text


def test_a_generation_setting_the_fast_engine_cannot_reproduce_goes_to_the_default_engine(pair, monkeypatch, caplog):
    requests = [_one_image(pair.processor, f"r{i}", 10 + i) for i in range(5)]
    opened = []

    lazy = lazily_opened(requests, opened)
    calls = _spy_on_default_engine(monkeypatch)
    engine = FastEngine(pair, batch_size=2)
    plain = engine.generate(lazy, "base")
    assert engine.generator is not None and calls == []

    # Forbid every row's first token (a logits processor the fast engine lacks): the answers must change.
    first_tokens = sorted({ids[0] for ids in engine.generator.generate_ids(requests, "base").values()})
    config = pair.base_model.generation_config
    before = config.suppress_tokens
    monkeypatch.setattr(config, "suppress_tokens", first_tokens)
    expected = generation.generate(pair, requests, "base", batch_size=2, progress=False)
    assert expected != plain
    calls.clear()
    opened.clear()
    with caplog.at_level(logging.WARNING, logger=FAST_LOGGER):
        got = engine.generate(lazy, "base")
    assert got == expected
    assert engine.generator is None
    assert len(engine.fallbacks) == 1 and "suppress_tokens" in engine.fallbacks[0]
    assert "suppress_tokens" in caplog.text
    # The loaders were opened call by call, each request once, and generate saw images. One
    # row per call: the store keeps these rows as the batch-invariant engine's.
    assert [len(call) for call in calls] == [1, 1, 1, 1, 1] and sorted(opened) == sorted(r.key for r in requests)

    # The throughput mode is stored apart (not batch-invariant): its fallback keeps its batches.
    throughput = FastEngine(pair, batch_size=2, fast_config=FastGenConfig(invariant=False))
    calls.clear()
    assert throughput.generate(lazy, "base") == expected
    assert [len(call) for call in calls] == [2, 2, 1]
    assert all(not callable(image) for call in calls for r in call for image in r.images)

    # The setting gone, the fast engine is built again and used: no call to the default engine.
    monkeypatch.setattr(config, "suppress_tokens", before)
    calls.clear()
    assert engine.generate(lazy, "base") == plain
    assert engine.generator is not None and calls == []


def test_an_unknown_engine_is_refused(pair):
    with pytest.raises(ValueError, match="unknown generation engine 'slow'"):
        make_engine("slow", pair)


# -------------------------------------------------------------------- the run, with stand-ins


class StandInProcessor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<user>" + "".join(p.get("text", "<|image|>") for p in messages[0]["content"]) + "<assistant>"


class StandInPair:
    """What a run reads of a pair: its processor and fingerprints."""

    def __init__(self):
        self.processor = StandInProcessor()
        self.base_fingerprint, self.adapter_fingerprint = "b" * 64, "a" * 64

    def describe(self):
        return {"stand_in": True}


class Answering:
    """Answers at once and records each call: its keys and images. ``one_by_one`` reports rows
    one at a time, as the fast engine does when they finish apart."""

    def __init__(self, pair=None, *, one_by_one: bool = False, stop_after: int | None = None, **options):
        super().__init__(pair if pair is not None else StandInPair(), **options)
        self.calls: list[dict] = []
        self.one_by_one = one_by_one
        self.stop_after = stop_after
        self.reported = 0

    def generate(self, requests, variant, on_finish=None):
        self.calls.append({"keys": [r.key for r in requests], "images": [r.images for r in requests],
                           "image_keys": [r.image_key for r in requests]})
        out = {r.key: f"answer {r.key}" for r in requests}
        pieces = [[item] for item in out.items()] if self.one_by_one else [list(out.items())]
        for piece in pieces:
            on_finish(piece)
            self.reported += len(piece)
            if self.stop_after is not None and self.reported >= self.stop_after:
                raise Stop("stopped")
        return out


class FastPlan(Answering, FastEngine):
    """The fast engine's chunks, answered at once."""


class BatchedPlan(Answering, BatchedEngine):
    """The batched engine's batches, answered at once."""


register_engine("answers-fast", FastPlan)


def _predict(engine, benchmark, store):
    return predict_run(engine.pair, engine, benchmark, load_benchmark(benchmark, MINI),
                       load_profile("seed-report"), "lavender", PredictionStore(store), lmu_root=MINI,
                       progress=False)


@pytest.mark.parametrize("name, chunk_rows", [("MMBench_DEV_EN", 7), ("MME", 5), ("DocVQA_VAL", 10)])
def test_fast_chunks_keep_an_images_rows_together_with_one_loader_per_row(tmp_path, name, chunk_rows):
    data = load_benchmark(name, MINI)
    frame = data.frame
    engine = FastPlan(chunk_rows=chunk_rows, batch_size=3)
    run = _predict(engine, name, tmp_path / "store")

    chunks = [call["keys"] for call in engine.calls]
    asked = [key for chunk in chunks for key in chunk]
    assert sorted(asked) == sorted(frame["index"]) and run.predictions == {i: f"answer {i}" for i in frame["index"]}
    keys = {index: image_key(data, index) for index in frame["index"]}
    chunk_of_image = {}
    for number, chunk in enumerate(chunks):
        assert len(chunk) <= chunk_rows
        for index in chunk:
            assert chunk_of_image.setdefault(keys[index], number) == number  # one chunk per image
    # Groups in the order of their first row, rows within a group in frame order.
    firsts = list(dict.fromkeys(keys[index] for index in frame["index"]))
    assert list(dict.fromkeys(keys[index] for index in asked)) == firsts
    positions = {index: p for p, index in enumerate(frame["index"])}
    for key in firsts:
        rows = [index for index in asked if keys[index] == key]
        assert rows == sorted(rows, key=positions.get)

    # Every image is a loader, bound to its own row: it gives that row's pixels; the request
    # carries the row's image key.
    for call in engine.calls:
        for index, images, key in zip(call["keys"], call["images"], call["image_keys"]):
            assert len(images) == 1 and callable(images[0]) and key == keys[index]
            assert images[0]().tobytes() == load_image(data, index, name, MINI).tobytes()


def test_mmbench_rotations_share_a_chunk_that_frame_order_would_split(tmp_path):
    frame = load_benchmark("MMBench_DEV_EN", MINI).frame
    engine = FastPlan(batch_size=8)
    _predict(engine, "MMBench_DEV_EN", tmp_path / "store")
    assert len(engine.calls) == 1 and len(engine.calls[0]["keys"]) == len(frame) <= DEFAULT_CHUNK_ROWS
    first_chunk = FastPlan(chunk_rows=8, batch_size=8)
    _predict(first_chunk, "MMBench_DEV_EN", tmp_path / "other")
    assert first_chunk.calls[0]["keys"][:4] == [0, 1_000_000, 2_000_000, 3_000_000]


def test_the_batched_engine_batches_as_before(tmp_path):
    frame = load_benchmark("MMBench_DEV_EN", MINI).frame
    engine = BatchedPlan(batch_size=8)
    run = _predict(engine, "MMBench_DEV_EN", tmp_path / "store")
    order = list(frame["index"])
    assert [call["keys"] for call in engine.calls] == [order[i:i + 8] for i in range(0, len(order), 8)]
    assert run.generated == len(frame)


def test_fast_rows_are_stored_as_they_are_reported(tmp_path):
    stopped = FastPlan(one_by_one=True, stop_after=5, batch_size=8)
    with pytest.raises(Stop):
        _predict(stopped, "DocVQA_VAL", tmp_path / "store")
    assert len(stopped.calls) == 1 and len(stopped.calls[0]["keys"]) == 24  # all in one chunk...
    rerun = BatchedPlan(batch_size=8)
    outcome = _predict(rerun, "DocVQA_VAL", tmp_path / "store")
    assert outcome.reused == 5  # ... and the five rows reported before the stop were kept
    assert sorted(k for call in rerun.calls for k in call["keys"]) == sorted(stopped.calls[0]["keys"][5:])


def test_a_bad_chunk_size_or_engine_is_refused():
    with pytest.raises(ValueError, match="chunk_rows must be at least 1"):
        make_engine("fast", StandInPair(), chunk_rows=0)
    with pytest.raises(ValueError, match="unknown generation engine 'slow'"):
        make_engine("slow", StandInPair())
    with pytest.raises(ValueError, match="built in"):
        register_engine("fast", FastPlan)


# ------------------------------------------------------------------------- options and config


def test_engine_options_reach_the_config_and_do_not_name_the_run():
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    args = parser.parse_args(["--engine", "fast", "--chunk-rows", "64", "--limit", "3"])
    config = config_from_options(lambda dest: getattr(args, dest))
    assert (config.engine, config.chunk_rows) == ("fast", 64)
    assert config.label() == RunConfig(limit=3).label() == "tiny-mini-limit3"
    assert config.describe()["engine"] == "fast"
    default = config_from_options(lambda dest: getattr(parser.parse_args([]), dest))
    assert (default.engine, default.chunk_rows) == ("fast", None)  # the fast engine is the default
    with pytest.raises(SystemExit):
        parser.parse_args(["--engine", "slow"])
    assert default.batch_invariant  # the fast engine's batch-invariant mode is the default
    args = parser.parse_args(["--no-batch-invariance"])
    assert not config_from_options(lambda dest: getattr(args, dest)).batch_invariant


@pytest.mark.parametrize("options, message", [
    (dict(engine="slow"), "unknown engine 'slow'"),
    (dict(engine="generate", chunk_rows=64), "--chunk-rows .* needs --engine fast"),
    (dict(engine="fast", chunk_rows=0), "--chunk-rows must be at least 1"),
    (dict(engine="generate", batch_invariant=False), "--no-batch-invariance .* needs --engine fast"),
])
def test_bad_engine_options_are_refused(options, message):
    with pytest.raises(RunInputError, match=message):
        RunConfig(**options)


def test_the_report_names_the_engine_used_and_the_one_asked_for(tmp_path):
    config = RunConfig(store=tmp_path / "store", engine="answers-fast", benchmarks=("ChartQA_TEST",),
                       reference=SEED_REFERENCE)
    run = collect_results(config, pair=StandInPair(), progress=False)
    described = {k: v for k, v in run.metadata["engine"].items() if k not in ("environment", "numerics")}
    assert described == {"name": "fast", "chunk_rows": DEFAULT_CHUNK_ROWS, "fallbacks": [],
                         "batch_invariant": True, "asked": "answers-fast"}
    path = write_run_report(run, judge_run(run), reports_root=tmp_path / "reports")
    report = (Path(path) / "report.md").read_text(encoding="utf-8")
    assert "- engine:\n" in report and "  - name: `fast`" in report


def test_a_broken_image_mid_run_names_its_row_and_the_finished_rows_stay_stored(tiny_checkpoints, tmp_path):
    """The fast engine opens an image only when it encodes it, so a broken one surfaces in the
    middle of a run: the error names file, row and column, and what finished before it is kept."""
    import base64
    import json
    import shutil
    import warnings

    import pandas as pd

    from lavender_checks.data import DataError
    from lavender_checks.engines.fast.config import FastGenConfig
    from lavender_checks.model import load_pair
    from lavender_checks.run.store import StoreKey

    root = tmp_path / "lmudata"
    root.mkdir()
    tsv = root / "DocVQA_VAL.tsv"
    shutil.copy(MINI / "DocVQA_VAL.tsv", tsv)
    table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    broken = table["index"].iloc[12]
    table.loc[12, "image"] = base64.b64encode(b"no picture here" * 8).decode()
    table.to_csv(tsv, sep="\t", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the md5 no longer matches the official file's
        frame = load_benchmark("DocVQA_VAL", root)

    pair = load_pair(tiny_checkpoints.base, tiny_checkpoints.adapter, device="cpu")
    # two slots: rows finish and are stored one by one
    engine = make_engine("fast", pair, fast_config=FastGenConfig(max_slots=2, prep_threads=1))
    store = PredictionStore(tmp_path / "store")
    with pytest.raises(DataError) as err:
        predict_run(pair, engine, "DocVQA_VAL", frame, load_profile("seed-report"), "lavender", store,
                    lmu_root=root, progress=False)
    message = str(err.value)
    assert str(tsv) in message and f"index {broken}" in message and "column 'image'" in message
    (key_file,) = (tmp_path / "store").rglob("key.json")
    kept = store.log(StoreKey(**json.loads(key_file.read_text()))).existing()
    before = {str(i) for i in frame.frame["index"].iloc[:12]}
    # every row before the broken one but those still in the 2 slots when it came up
    assert {str(i) for i in kept} <= before and len(kept) >= 12 - 2

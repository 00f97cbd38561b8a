"""The resumable prediction store: append/resume, torn lines, several writers, prompt hashes,
profile versions, and export to VLMEvalKit's prediction file."""

import functools
import json
import re
import warnings

import pandas as pd
import pytest

from lavender_checks.run.store import (
    IgnoredPredictionsWarning,
    PredictionStore,
    PredictionStoreError,
    StoreKey,
    export_vlmeval,
    request_sha,
)

SHA_A = request_sha("prompt A", 512)
SHA_B = request_sha("prompt B", 512)


def make_key(**changes):
    fields = dict(base_fingerprint="b" * 64, adapter_fingerprint="a" * 64, benchmark="MME",
                  tsv_md5="b36b43c3f09801f5d368627fb92187c3", profile_name="seed-report",
                  profile_fingerprint="f" * 64)
    fields.update(changes)
    return StoreKey(**fields)


def predictions_of(log):
    return {index: record.prediction for index, record in log.existing().items()}


def test_request_sha_covers_text_and_token_budget():
    assert request_sha("prompt A", 512) == SHA_A
    assert request_sha("prompt A", 128) != SHA_A
    assert request_sha("prompt A ", 512) != SHA_A


def test_append_then_a_new_reader_resumes(tmp_path):
    store = PredictionStore(tmp_path)
    log = store.log(make_key())
    assert log.existing() == {}
    assert log.append([(1, "Yes", SHA_A), (2, " no\n", SHA_A)]) == 2
    log.append([(3, "", SHA_A)])
    # A fresh store object (as after a restart) sees every appended line, text kept verbatim.
    again = PredictionStore(tmp_path).log(make_key())
    assert predictions_of(again) == {1: "Yes", 2: " no\n", 3: ""}
    assert again.existing()[2].prompt_sha == SHA_A
    assert json.loads((again.directory / "key.json").read_text())["benchmark"] == "MME"


def test_each_batch_is_on_disk_when_append_returns(tmp_path):
    log = PredictionStore(tmp_path).log(make_key())
    log.append([(7, "first", SHA_A)])
    lines = log.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == [7]


def test_numpy_and_string_indices(tmp_path):
    import numpy as np

    log = PredictionStore(tmp_path).log(make_key())
    log.append([(np.int64(5), "x", SHA_A), ("q-7", "y", SHA_A)])
    assert predictions_of(log) == {5: "x", "q-7": "y"}


def test_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path):
    log = PredictionStore(tmp_path).log(make_key())
    log.append([(1, "a", SHA_A), (2, "b", SHA_A)])
    with log.path.open("ab") as fh:  # a process killed in the middle of writing a line
        fh.write(b'{"index": 3, "predic')
    assert predictions_of(log) == {1: "a", 2: "b"}
    log.append([(3, "c", SHA_A)])
    assert predictions_of(log) == {1: "a", 2: "b", 3: "c"}
    assert len(log.path.read_text().splitlines()) == 3


def test_damaged_complete_last_line_is_ignored(tmp_path):
    log = PredictionStore(tmp_path).log(make_key())
    log.append([(1, "a", SHA_A)])
    with log.path.open("ab") as fh:  # e.g. zeros left by a crash after the newline was counted
        fh.write(b"\x00\x00\x00\n")
    assert predictions_of(log) == {1: "a"}
    restarted = PredictionStore(tmp_path).log(make_key())
    restarted.append([(2, "b", SHA_A)])
    assert predictions_of(log) == {1: "a", 2: "b"}


def test_damaged_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    log = PredictionStore(tmp_path).log(make_key())
    log.append([(1, "a", SHA_A)])
    with log.path.open("ab") as fh:
        fh.write(b"not json\n")
    log2 = PredictionStore(tmp_path).log(make_key(), writer="other")
    log2.append([(9, "z", SHA_A)])
    # Written by hand after a valid line, then more lines: not a torn write, so refuse.
    with log.path.open("ab") as fh:
        fh.write(json.dumps({"index": 2, "prediction": "b", "prompt_sha": SHA_A,
                             "time_ns": 1}).encode() + b"\n")
    with pytest.raises(PredictionStoreError, match=re.escape(f"{log.path}, line 2")):
        log.existing()
    assert log.path.read_text().count("\n") == 3  # nothing was removed


def test_writers_union_and_no_duplicate_index(tmp_path):
    store = PredictionStore(tmp_path)
    gw0 = store.log(make_key(), writer="gw0")
    gw1 = store.log(make_key(), writer="gw1")
    gw0.append([(1, "a", SHA_A), (2, "b", SHA_A)])
    gw1.append([(3, "c", SHA_A)])
    gw1.append([(2, "b", SHA_A)])  # the same row written twice, alike: once
    reader = store.log(make_key())
    assert predictions_of(reader) == {1: "a", 2: "b", 3: "c"}
    assert sorted(p.name for p in reader.writer_files()) == ["gw0.jsonl", "gw1.jsonl"]
    assert len(reader.records()) == 4


def test_a_row_stored_twice_with_different_predictions_is_refused_naming_file_and_row(tmp_path):
    store = PredictionStore(tmp_path)
    store.log(make_key(), writer="gw0").append([(1, "a", SHA_A), (2, "Yes", SHA_A)])
    store.log(make_key(), writer="gw1").append([(2, "No", SHA_A)])
    reader = store.log(make_key())
    with pytest.raises(PredictionStoreError) as raised:
        reader.matching({1: SHA_A, 2: SHA_A})
    message = str(raised.value)
    assert f"{reader.directory / 'gw1.jsonl'}, line 1: row 2 holds 'No'" in message
    assert f"{reader.directory / 'gw0.jsonl'}, line 2 holds 'Yes'" in message
    with pytest.raises(PredictionStoreError):
        reader.existing()


def test_matching_prefers_the_wanted_prompt(tmp_path):
    log = PredictionStore(tmp_path).log(make_key())
    log.append([(1, "from A", SHA_A), (2, "from A", SHA_A)])
    log.append([(1, "from B", SHA_B)])
    assert predictions_of(log) == {1: "from B", 2: "from A"}
    matched = log.matching({1: SHA_A, 2: SHA_B, 3: SHA_A})
    assert {i: r.prediction for i, r in matched.items()} == {1: "from A"}


def test_base_predictions_are_keyed_without_the_adapter(tmp_path):
    store = PredictionStore(tmp_path)
    base = make_key(adapter_fingerprint=None)
    store.log(base).append([(1, "base answer", SHA_A)])
    assert predictions_of(store.log(make_key(adapter_fingerprint=None))) == {1: "base answer"}
    assert predictions_of(store.log(make_key(adapter_fingerprint="c" * 64))) == {}
    assert predictions_of(store.log(make_key(base_fingerprint="d" * 64, adapter_fingerprint=None))) == {}


def test_other_profile_version_is_ignored_with_a_warning(tmp_path):
    store = PredictionStore(tmp_path)
    store.log(make_key(profile_fingerprint="1" * 64)).append([(1, "old", SHA_A)])
    with pytest.warns(IgnoredPredictionsWarning, match="seed-report") as caught:
        newer = store.log(make_key(profile_fingerprint="2" * 64))
    assert newer.existing() == {}
    assert len(newer.ignored) == 1 and str(newer.ignored[0]) in str(caught[0].message)
    # Another profile (not another version of this one) is simply a different store.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.log(make_key(profile_name="vlmevalkit")).existing() == {}
        assert store.log(make_key(profile_fingerprint="1" * 64)).existing()[1].prediction == "old"


def test_shortened_folder_name_clash_is_refused(tmp_path):
    store = PredictionStore(tmp_path)
    store.log(make_key(base_fingerprint="b" * 12 + "0" * 52)).append([(1, "x", SHA_A)])
    with pytest.raises(PredictionStoreError, match="clash"):
        store.log(make_key(base_fingerprint="b" * 12 + "1" * 52))


def test_bad_writer_name(tmp_path):
    with pytest.raises(ValueError, match="writer name"):
        PredictionStore(tmp_path).log(make_key(), writer="../escape")


def test_non_string_prediction_is_refused_and_nothing_written(tmp_path):
    log = PredictionStore(tmp_path).log(make_key())
    with pytest.raises(TypeError, match="index 2"):
        log.append([(1, "ok", SHA_A), (2, None, SHA_A)])
    assert log.existing() == {}


# -- through predict_run, with a stand-in model and engine: what is reused, what is generated

class TemplateProcessor:
    """Stands in for the processor: the chat text is the prompt text with a marker."""

    def apply_chat_template(self, conversation, add_generation_prompt, tokenize):
        parts = conversation[0]["content"]
        return "|".join(p.get("text", "<image>") for p in parts)


class EchoPair:
    """Stands in for a ModelPair: a prediction names the variant, adapter and question end."""

    def __init__(self, adapter="a" * 64, interrupt_after=None):
        self.processor = TemplateProcessor()
        self.base_fingerprint = "b" * 64
        self.adapter_fingerprint = adapter
        self.calls = []
        self.interrupt_after = interrupt_after

    def generate(self, requests, variant, on_finish):
        """What its engine (``EchoEngine``) answers."""
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append([r.key for r in requests])
        adapter = "none" if variant == "base" else self.adapter_fingerprint[:1]
        finished = [(r.key, f"{variant}/{adapter}/{r.max_new_tokens}/{r.text[-12:]}") for r in requests]
        on_finish(finished)
        return dict(finished)


def echo_engine(pair, batch_size):
    from lavender_checks.engines.batched import BatchedEngine

    class EchoEngine(BatchedEngine):
        """The batched engine's batches (frame order, ``batch_size`` rows), answered by the pair."""

        def generate(self, requests, variant, on_finish=None):
            assert len(requests) <= self.batch_size
            return self.pair.generate(requests, variant, on_finish)

    return EchoEngine(pair, batch_size=batch_size)


@functools.cache
def _mini_mme():
    from lavender_checks import FIXTURES
    from lavender_checks.data import load_benchmark

    return load_benchmark("MME", FIXTURES / "lmudata-mini")


@pytest.fixture(scope="module")
def mme_frame():
    return _mini_mme().frame.head(10)


def run(pair, frame, store, profile="seed-report", variant="lavender", batch_size=4, recorded=True,
        **kwargs):
    """predict_run over ``frame`` with the mini MME file's record (``recorded``) or none."""
    from lavender_checks import FIXTURES
    from lavender_checks.data import BenchmarkData
    from lavender_checks.profiles import load_profile
    from lavender_checks.run.predict import predict_run

    profile = load_profile(profile) if isinstance(profile, str) else profile
    rows = BenchmarkData(frame, _mini_mme().provenance) if recorded else frame
    return predict_run(pair, echo_engine(pair, batch_size), "MME", rows, profile, variant, store,
                       lmu_root=FIXTURES / "lmudata-mini", progress=False, **kwargs)


def test_rerun_reuses_everything(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    first = run(EchoPair(), mme_frame, store)
    assert (first.reused, first.generated, first.recomputed) == (0, 10, 0)
    assert list(first.predictions) == mme_frame["index"].tolist()
    pair = EchoPair()
    again = run(pair, mme_frame, store)
    assert pair.calls == [] and again.predictions == first.predictions
    assert (again.reused, again.generated) == (10, 0)


def test_batches_follow_frame_order_and_resume_keeps_them(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    pair = EchoPair()
    run(pair, mme_frame.head(5), store)  # a partial run: rows 0..4
    assert pair.calls == [[0, 1, 2, 3], [4]]
    resumed = EchoPair()
    result = run(resumed, mme_frame, store)
    # Batches are cut from the whole frame: [4..7] keeps its place, so 5..7 is what is left of it.
    assert resumed.calls == [[5, 6, 7], [8, 9]]
    assert result.reused == 5 and result.generated == 5


def test_changed_prompt_is_recomputed_and_counted(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    run(EchoPair(), mme_frame, store)
    changed = mme_frame.copy()
    changed.loc[changed["index"] == 3, "question"] = "Is this a different question? Please answer yes or no."
    pair = EchoPair()
    result = run(pair, changed, store)
    assert pair.calls == [[3]]
    assert (result.reused, result.recomputed, result.generated) == (9, 1, 1)
    assert result.predictions[3].endswith("yes or no.")
    assert "different" not in run(EchoPair(), mme_frame, store).predictions[3]  # old prompt: old answer


def test_another_profile_is_another_store(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    run(EchoPair(), mme_frame, store, profile="seed-report")
    # Not reused, and not counted as recomputed: the seed-report predictions stay valid.
    result = run(EchoPair(), mme_frame, store, profile="vlmevalkit")
    assert (result.reused, result.recomputed, result.generated) == (0, 0, 10)
    assert result.predictions[0].startswith("lavender/a/128/")


def test_older_profile_version_is_not_reused(tmp_path, mme_frame):
    from lavender_checks.profiles import PROFILES_DIR, load_profile

    store = PredictionStore(tmp_path)
    run(EchoPair(), mme_frame, store)
    edited = tmp_path / "seed-report.toml"
    edited.write_text((PROFILES_DIR / "seed-report.toml").read_text().replace(
        "[benchmarks.MME]\nsource = \"dataset\"\nimage_first = true\nmax_new_tokens = 512",
        "[benchmarks.MME]\nsource = \"dataset\"\nimage_first = true\nmax_new_tokens = 64"))
    with pytest.warns(IgnoredPredictionsWarning):
        result = run(EchoPair(), mme_frame, store, profile=load_profile(edited))
    assert (result.reused, result.generated) == (0, 10)


def test_base_predictions_are_reused_for_a_new_adapter(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    run(EchoPair(adapter="a" * 64), mme_frame, store, variant="base")
    run(EchoPair(adapter="a" * 64), mme_frame, store, variant="lavender")
    new_adapter = EchoPair(adapter="c" * 64)
    base = run(new_adapter, mme_frame, store, variant="base")
    assert base.reused == 10 and new_adapter.calls == []
    lavender = run(new_adapter, mme_frame, store, variant="lavender")
    assert lavender.generated == 10 and lavender.predictions[0].startswith("lavender/c/")


def test_interrupt_keeps_finished_batches(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(EchoPair(interrupt_after=2), mme_frame, store)
    pair = EchoPair()
    result = run(pair, mme_frame, store)
    assert result.reused == 8 and pair.calls == [[8, 9]]


def test_images_go_to_the_engine_as_loaders_of_their_rows(tmp_path, mme_frame, monkeypatch):
    """The run opens no image itself (a whole benchmark's images do not fit in memory): each
    request carries a loader bound to its row, which the engine opens when it needs it."""
    import lavender_checks.data as data

    loaded = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda frame, index, *a: loaded.append(index) or real(frame, index, *a))
    pair = EchoPair()
    seen = []
    original = pair.generate

    def generate(requests, *args, **kwargs):
        seen.extend(requests)
        return original(requests, *args, **kwargs)

    pair.generate = generate
    run(pair, mme_frame, PredictionStore(tmp_path))
    assert loaded == [] and len(pair.calls) == 3
    for request in seen:
        (image,) = request.images
        assert callable(image) and image().tobytes() == real(mme_frame, request.key, "MME").tobytes()
    assert loaded == [r.key for r in seen]


def test_profile_that_generation_cannot_honour_is_refused(tmp_path, mme_frame):
    from lavender_checks.profiles import PROFILES_DIR, load_profile

    edited = tmp_path / "no-bos.toml"
    edited.write_text((PROFILES_DIR / "seed-report.toml").read_text().replace(
        "add_special_tokens = true", "add_special_tokens = false"))
    with pytest.raises(ValueError, match="add_special_tokens"):
        run(EchoPair(), mme_frame, PredictionStore(tmp_path), profile=load_profile(edited))


def test_export_is_read_back_by_vlmeval_io(tmp_path, mme_frame):
    from lavender_checks.vlmeval_io import read_prediction_file

    predictions = run(EchoPair(), mme_frame, PredictionStore(tmp_path / "store")).predictions
    predictions[1] = "N/A"  # VLMEvalKit's xlsx round trip turns this into NaN
    path = export_vlmeval(mme_frame, predictions, tmp_path / "work", "tiny_lavender", "MME")
    assert path == tmp_path / "work" / "tiny_lavender_MME.xlsx"
    back = read_prediction_file(path)
    assert back["index"].tolist() == mme_frame["index"].tolist()
    assert "image" not in back.columns
    assert back["prediction"][0] == predictions[0]
    assert pd.isna(back["prediction"][1])
    assert back["question"].tolist() == mme_frame["question"].tolist()


def test_frame_without_recorded_md5_uses_the_tsv_md5(tmp_path, mme_frame):
    store = PredictionStore(tmp_path)
    first = run(EchoPair(), mme_frame, store)
    again = run(EchoPair(), mme_frame, store, recorded=False)
    assert again.reused == 10 and again.store_dir == first.store_dir


def test_keys_that_were_not_asked_for_are_refused(tmp_path, mme_frame):
    class Stranger(EchoPair):
        def generate(self, requests, variant, on_finish):
            on_finish([(999_999, "from nowhere")])
            return {999_999: "from nowhere"}

    with pytest.raises(RuntimeError, match="not asked for: \\[999999\\]"):
        run(Stranger(), mme_frame, PredictionStore(tmp_path))


def test_predictions_of_other_hardware_or_dtype_live_apart(tmp_path):
    from lavender_checks.run.store import PredictionStore, StoreKey

    common = dict(base_fingerprint="b" * 64, adapter_fingerprint=None, benchmark="MME",
                  tsv_md5="0" * 32, profile_name="seed-report", profile_fingerprint="f" * 64)
    store = PredictionStore(tmp_path)
    cpu = store.log(StoreKey(**common, compute="cpu-float32"))
    cuda = store.log(StoreKey(**common, compute="cuda-bfloat16"))
    cpu.append([(1, "Yes", "sha")])
    assert cpu.directory != cuda.directory
    assert cuda.existing() == {}
    assert cpu.existing()[1].prediction == "Yes"


@pytest.mark.parametrize("dtype, apart", [("bfloat16", True), ("float16", True), ("float32", False)])
def test_batch_dependent_predictions_are_stored_apart_below_float32(mme_frame, dtype, apart):
    from lavender_checks import FIXTURES
    from lavender_checks.benchmarks import get_benchmark
    from lavender_checks.profiles import load_profile
    from lavender_checks.run.predict import store_key

    pair = EchoPair()
    pair.device, pair.dtype = "cuda", dtype
    keys = {invariant: store_key(pair, get_benchmark("MME"), mme_frame, load_profile("seed-report"), "lavender",
                                 FIXTURES / "lmudata-mini", batch_invariant=invariant)
            for invariant in (True, False)}
    assert keys[True].compute == f"cuda-{dtype}"
    assert (keys[True].relative_dir() != keys[False].relative_dir()) is apart


def test_a_run_keys_its_store_by_whether_its_engine_is_batch_invariant(tmp_path, mme_frame):
    from lavender_checks.engines import make_engine
    from lavender_checks.engines.fast import FastEngine
    from lavender_checks.engines.fast.config import FastGenConfig

    pair = EchoPair()
    assert make_engine("generate", pair).batch_invariant is False
    assert make_engine("fast", pair).batch_invariant is True  # the default mode
    assert FastEngine(pair, fast_config=FastGenConfig(invariant=False)).batch_invariant is False

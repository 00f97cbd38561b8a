"""Prompts as VLMEvalKit's llama_vision builds them: template or dataset prompt, message order,
chat template and post-processing; snapshots of the exact text for the mini benchmarks."""

import math

import pytest

from lavender_checks.benchmarks import Benchmark, get_benchmark
from lavender_checks.profiles import load_profile
from lavender_checks.prompts import Prompt, build_prompt, chat_text, messages

DOCVQA_HEAD = ("Read the text in the image carefully and answer the question with the text as seen "
               "exactly in the image.")


class RecordingBenchmark(Benchmark):
    """A benchmark whose dataset prompt shows which row it was given."""

    def dataset_prompt(self, row):
        return f"dataset prompt for {row['index']}"

    def score(self, predictions, meta=None):  # pragma: no cover - not used here
        raise NotImplementedError


def recording(name):
    return RecordingBenchmark(get_benchmark(name).spec)


def test_template_replaces_question_and_keeps_braces():
    profile = load_profile("vlmevalkit")
    row = {"index": 3, "question": "What is {x} in {0}?"}
    prompt = build_prompt(recording("DocVQA_VAL"), row, profile)
    assert prompt.text.startswith(DOCVQA_HEAD)
    assert prompt.text.endswith("phrase.\n Question: What is {x} in {0}?")
    assert prompt.image_first is False


def test_chartqa_uses_the_11b_prompt():
    prompt = build_prompt(recording("ChartQA_TEST"), {"index": 1, "question": "How many bars?"},
                          load_profile("seed-report"))
    assert prompt.text.endswith(' "FINAL ANSWER:". The question is: How many bars?'
                                "<cot_start>Let's think step by step.")
    assert not prompt.image_first


def test_nan_question_reads_nan_as_vlmevalkit_formats_it():
    prompt = build_prompt(recording("DocVQA_VAL"), {"index": 1, "question": math.nan},
                          load_profile("vlmevalkit"))
    assert prompt.text.endswith("Question: nan")


def test_missing_question_column_names_benchmark_and_row():
    with pytest.raises(KeyError, match="DocVQA_VAL row 17.*'question'"):
        build_prompt(recording("DocVQA_VAL"), {"index": 17}, load_profile("vlmevalkit"))


@pytest.mark.parametrize("name", ["MMBench_DEV_EN", "MME"])
def test_dataset_prompt_comes_from_the_benchmark_with_image_first(name):
    prompt = build_prompt(recording(name), {"index": 42, "question": "ignored"}, load_profile("vlmevalkit"))
    assert prompt == Prompt("dataset prompt for 42", image_first=True)


def test_messages_follow_the_prompt_order():
    assert messages(Prompt("q", image_first=False)) == [
        {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image"}]}]
    assert messages(Prompt("q", image_first=True)) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]


class TemplateRecorder:
    def __init__(self, result="text"):
        self.calls = []
        self.result = result

    def apply_chat_template(self, conversation, **kwargs):
        self.calls.append((conversation, kwargs))
        return self.result


def test_chat_text_asks_for_the_generation_prompt_only():
    processor = TemplateRecorder()
    assert chat_text(processor, Prompt("q", True)) == "text"
    conversation, kwargs = processor.calls[0]
    assert conversation == messages(Prompt("q", True))
    assert kwargs == {"add_generation_prompt": True, "tokenize": False}


def test_chat_text_refuses_token_ids():
    with pytest.raises(TypeError, match="expected str"):
        chat_text(TemplateRecorder(result=[1, 2, 3]), Prompt("q", True))


# -- snapshots: the exact text for one row of each mini benchmark under each profile ---------

# One row per benchmark; MMBench's has a hint, so every line of its prompt shows.
SNAPSHOT_ROWS = {"DocVQA_VAL": 1, "ChartQA_TEST": 0, "MMBench_DEV_EN": 1, "MME": 0}


@pytest.fixture(scope="module")
def tiny_processor():
    from transformers import AutoProcessor

    from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

    return AutoProcessor.from_pretrained(ensure_tiny_checkpoints().base)


@pytest.fixture(scope="module")
def mini_rows():
    from lavender_checks import FIXTURES
    from lavender_checks.data import load_benchmark_frame

    rows = {}
    for name, index in SNAPSHOT_ROWS.items():
        frame = load_benchmark_frame(name, FIXTURES / "lmudata-mini")
        rows[name] = frame[frame["index"] == index].drop(columns=["image"]).iloc[0].to_dict()
    return rows


@pytest.fixture
def json_snapshot(snapshot):
    from syrupy.extensions.json import JSONSnapshotExtension

    return snapshot.with_defaults(extension_class=JSONSnapshotExtension)


@pytest.mark.parametrize("profile_name", ["seed-report", "vlmevalkit"])
@pytest.mark.parametrize("bench_name", list(SNAPSHOT_ROWS))
def test_prompt_and_chat_text_snapshot(bench_name, profile_name, tiny_processor, mini_rows, json_snapshot):
    profile = load_profile(profile_name)
    row = mini_rows[bench_name]
    prompt = build_prompt(get_benchmark(bench_name), row, profile)
    text = chat_text(tiny_processor, prompt)
    # The chat text is the prompt with the image placed as the profile says.
    image_then_text = f"<|image|>{prompt.text}" if prompt.image_first else f"{prompt.text}<|image|>"
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + image_then_text
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert json_snapshot == {
        "benchmark": bench_name,
        "profile": profile_name,
        "index": int(row["index"]),
        "image_first": prompt.image_first,
        "max_new_tokens": profile.for_benchmark(bench_name).max_new_tokens,
        "prompt": prompt.text,
        "chat_text": text,
    }


def test_clean_up_tokenization_matches_transformers_4_rules():
    from lavender_checks.engines.request import clean_up_tokenization

    assert clean_up_tokenization("Yes .") == "Yes."
    assert clean_up_tokenization("It is n't , is it ?") == "It isn't, is it?"
    assert clean_up_tokenization("I 'm sure they 're right ' ok") == "I'm sure they're right'ok"
    assert clean_up_tokenization(" leading and trailing ") == " leading and trailing "
    # transformers still ships the rule set (used by remote code): it is the oracle here.
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    for text in ["A .", "1 , 2 ! 3 ?", "we 've it 's", "x ' y", "no change", "  . ,"]:
        assert clean_up_tokenization(text) == PreTrainedTokenizerBase.clean_up_tokenization(None, text)


def test_both_profiles_ask_for_the_transformers_4_decode_clean_up():
    from lavender_checks.profiles import load_profile

    for name in ("seed-report", "vlmevalkit"):
        profile = load_profile(name)
        assert profile.clean_up_tokenization_spaces is True
        assert profile.describe()["decoding"]["clean_up_tokenization_spaces"] is True


def test_an_opened_request_keeps_every_field_but_its_images():
    import dataclasses

    from lavender_checks.engines.request import GenerationRequest, opened

    request = GenerationRequest(key="k", text="t", images=[lambda: "pixels", "open"], max_new_tokens=7,
                                image_key="img", clean_up_spaces=True)
    done = opened(request)
    assert done.images == ["pixels", "open"]
    for f in dataclasses.fields(GenerationRequest):
        if f.name != "images":
            assert getattr(done, f.name) == getattr(request, f.name), f.name
    plain = GenerationRequest(key="p", text="t", images=["open"])
    assert opened(plain) is plain

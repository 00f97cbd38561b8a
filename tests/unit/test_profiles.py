"""Run profiles: the two shipped profiles hold VLMEvalKit's prompts and the runs' decoding;
malformed profiles are refused with the file and key named."""

import json

import pytest

from lavender_checks.profiles import PROFILES_DIR, BenchmarkPrompting, ProfileError, available_profiles, load_profile

BENCHMARKS = ["DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME"]

# Transcribed independently from the VLMEvalKit behaviour spec, section 2.1.
DOCVQA_PROMPT = (
    "Read the text in the image carefully and answer the question with the text as seen exactly "
    "in the image. For yes/no questions, just respond Yes or No. If the answer is numeric, just "
    "respond with the number and nothing else. If the answer has multiple words, just respond "
    "with the words and absolutely nothing else. Never respond in a sentence or a phrase.\n"
    " Question: {question}"
)
CHARTQA_11B_PROMPT = (
    "You are provided a chart image and will be asked a question. You have to think through your "
    "answer and provide a step-by-step solution. Once you have the solution, write the final "
    'answer in at most a few words at the end with the phrase "FINAL ANSWER:". The question is: '
    "{question}<cot_start>Let's think step by step."
)
REFERENCE_REVISION = "e8e78f05f3080fe28154f2130321f17951c3be94"


def test_shipped_profiles_are_listed():
    assert {"seed-report", "vlmevalkit"} <= set(available_profiles())


@pytest.mark.parametrize("name", ["seed-report", "vlmevalkit"])
def test_profiles_follow_vlmevalkit_prompts(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.vlmevalkit_revision == REFERENCE_REVISION
    assert profile.do_sample is False
    assert profile.add_special_tokens is True  # VLMEvalKit's double BOS
    assert list(profile.benchmarks) == BENCHMARKS
    assert profile.for_benchmark("DocVQA_VAL").template == DOCVQA_PROMPT
    assert profile.for_benchmark("ChartQA_TEST").template == CHARTQA_11B_PROMPT
    for custom in ("DocVQA_VAL", "ChartQA_TEST"):
        p = profile.for_benchmark(custom)
        assert (p.source, p.image_first) == ("template", False)  # text before image
    for dataset in ("MMBench_DEV_EN", "MME"):
        p = profile.for_benchmark(dataset)
        assert (p.source, p.template, p.image_first) == ("dataset", None, True)
    assert "Instruct" in profile.description and "greed" in profile.description


def test_token_budgets():
    seed = load_profile("seed-report")
    stock = load_profile("vlmevalkit")
    assert {b: seed.for_benchmark(b).max_new_tokens for b in BENCHMARKS} == dict.fromkeys(BENCHMARKS, 512)
    assert {b: stock.for_benchmark(b).max_new_tokens for b in BENCHMARKS} == {
        "DocVQA_VAL": 512, "ChartQA_TEST": 512, "MMBench_DEV_EN": 128, "MME": 128}


def test_fingerprint_is_stable_and_tells_profiles_apart():
    assert load_profile("seed-report").fingerprint == load_profile("seed-report").fingerprint
    assert load_profile("seed-report").fingerprint != load_profile("vlmevalkit").fingerprint
    assert len(load_profile("seed-report").fingerprint) == 64


def _copy(tmp_path, text, name="custom"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _seed_text():
    return (PROFILES_DIR / "seed-report.toml").read_text(encoding="utf-8")


def test_load_by_path_gives_the_same_profile(tmp_path):
    path = _copy(tmp_path, _seed_text())
    assert load_profile(path).fingerprint == load_profile("seed-report").fingerprint
    assert load_profile(str(path)).path == path


@pytest.mark.parametrize("old,new", [
    ("Never respond in a sentence or a phrase.", "Never respond in a sentence or phrase."),
    ("[benchmarks.MME]\nsource = \"dataset\"\nimage_first = true\nmax_new_tokens = 512",
     "[benchmarks.MME]\nsource = \"dataset\"\nimage_first = true\nmax_new_tokens = 511"),
    ("[benchmarks.MME]\nsource = \"dataset\"\nimage_first = true",
     "[benchmarks.MME]\nsource = \"dataset\"\nimage_first = false"),
    ("add_special_tokens = true", "add_special_tokens = false"),
])
def test_any_change_to_prompts_or_decoding_changes_the_fingerprint(tmp_path, old, new):
    text = _seed_text()
    assert old in text
    changed = load_profile(_copy(tmp_path, text.replace(old, new, 1)))
    assert changed.fingerprint != load_profile("seed-report").fingerprint


def test_description_does_not_change_the_fingerprint(tmp_path):
    text = _seed_text().replace("The run of the seed reproduction report", "The seed report's run", 1)
    assert load_profile(_copy(tmp_path, text)).fingerprint == load_profile("seed-report").fingerprint


def test_unknown_name_lists_available_profiles():
    with pytest.raises(ProfileError) as err:
        load_profile("no-such-profile")
    assert "no-such-profile" in str(err.value)
    assert "seed-report" in str(err.value) and "vlmevalkit" in str(err.value)


def test_missing_benchmark_is_a_clear_error():
    with pytest.raises(ProfileError, match=r"no \[benchmarks\.TextVQA_VAL\] table.*DocVQA_VAL"):
        load_profile("vlmevalkit").for_benchmark("TextVQA_VAL")


@pytest.mark.parametrize("old,new,message", [
    ("max_new_tokens = 512\n\n[benchmarks.ChartQA_TEST]", "\n[benchmarks.ChartQA_TEST]",
     r"missing key 'benchmarks\.DocVQA_VAL\.max_new_tokens'"),
    ("max_new_tokens = 512", 'max_new_tokens = "512"',
     r"'benchmarks\.DocVQA_VAL\.max_new_tokens' must be int"),
    ("max_new_tokens = 512", "max_new_tokens = true",
     r"'benchmarks\.DocVQA_VAL\.max_new_tokens' must be int"),
    ("max_new_tokens = 512", "max_new_tokens = 0",
     r"'benchmarks\.DocVQA_VAL\.max_new_tokens' must be at least 1"),
    ("Question: {question}", "Question: {q}", r"'benchmarks\.DocVQA_VAL\.template' must contain"),
    ('DocVQA_VAL]\nsource = "template"', 'DocVQA_VAL]\nsource = "model"',
     r"'benchmarks\.DocVQA_VAL\.source' must be one of"),
    ("do_sample = false", "do_sample = true", r"'decoding\.do_sample' is true"),
    ("image_first = false", "image_first = false\nimage_frist = true",
     r"unknown key\(s\) in \[benchmarks\.DocVQA_VAL\]: image_frist"),
    ('vlmevalkit_revision = "', 'vlmevalkit_revision = 1\n#"', r"'vlmevalkit_revision' must be str"),
    ("[decoding]", "[decoding\n", r"not valid TOML"),
])
def test_malformed_profile_names_file_and_key(tmp_path, old, new, message):
    text = _seed_text()
    assert old in text
    path = _copy(tmp_path, text.replace(old, new, 1), name="broken")
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "absent.toml")


def test_a_folder_given_as_profile_is_named_as_a_folder(tmp_path):
    with pytest.raises(ProfileError, match="is a folder, not a profile file") as err:
        load_profile(tmp_path)
    assert "does not exist" not in str(err.value)


def test_describe_is_plain_data():
    profile = load_profile("vlmevalkit")
    described = json.loads(json.dumps(profile.describe()))
    assert described["fingerprint"] == profile.fingerprint
    assert described["benchmarks"]["MME"] == {"source": "dataset", "template": None,
                                              "image_first": True, "max_new_tokens": 128}
    assert described["decoding"] == {"do_sample": False, "add_special_tokens": True,
                                     "clean_up_tokenization_spaces": True}
    assert isinstance(profile.for_benchmark("MME"), BenchmarkPrompting)


def test_image_dump_suffix_is_data_and_checked(tmp_path):
    from lavender_checks import FIXTURES
    from lavender_checks.profiles import ProfileError, load_profile

    for name in ("seed-report", "vlmevalkit"):
        assert load_profile(name).image_dump_suffix == ".png"
    text = (FIXTURES / "profiles" / "seed-report.toml").read_text()
    older = tmp_path / "older.toml"
    older.write_text(text.replace('dump_suffix = ".png"', 'dump_suffix = ".jpg"'))
    assert load_profile(older).image_dump_suffix == ".jpg"
    assert load_profile(older).fingerprint != load_profile("seed-report").fingerprint
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('dump_suffix = ".png"', 'dump_suffix = ".bmp"'))
    with pytest.raises(ProfileError, match=r"bad\.toml.*images\.dump_suffix"):
        load_profile(bad)

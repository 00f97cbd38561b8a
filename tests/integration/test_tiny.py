"""The offline tiny Mllama: deterministic build, cache behaviour, tokenizer/processor/chat
template faithful to Llama 3.2 Vision, the two model constraints, adapters, short outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavender_checks import REPO_ROOT
from lavender_checks.engines.batched import generate
from lavender_checks.synthetic import tiny
from tests.helpers import make_requests

# vlmevalkit-behaviour.md section 2.2, character for character.
TEXT_FIRST = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|image|><|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
IMAGE_FIRST = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{prompt}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_is_deterministic(tiny_checkpoints, tmp_path):
    again = tiny.ensure_tiny_checkpoints(tmp_path)
    first, second = _files(tiny_checkpoints.root), _files(again.root)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert again.root.name == tiny_checkpoints.root.name  # same stamp, same folder name


def test_existing_build_is_reused_and_a_new_stamp_rebuilds(tiny_checkpoints, monkeypatch):
    root = tiny_checkpoints.root.parent

    def must_not_build(folder):
        raise AssertionError("rebuilt although a build with the same stamp exists")

    monkeypatch.setattr(tiny, "_build_all", must_not_build)
    assert tiny.ensure_tiny_checkpoints(root) == tiny_checkpoints

    built = []
    monkeypatch.setattr(tiny, "_build_all", lambda folder: built.append(folder))
    stamp = tiny._build_stamp()
    monkeypatch.setattr(tiny, "_build_stamp", lambda: dict(stamp, format=-1))
    other = tiny.ensure_tiny_checkpoints(root)
    assert len(built) == 1 and other.root != tiny_checkpoints.root
    assert json.loads((other.root / "stamp.json").read_text())["format"] == -1


def test_losing_a_build_race_keeps_the_winners_build(tmp_path, monkeypatch):
    """Two builders: the other one renames its folder into place while this one builds."""
    real_build = tiny._build_all
    calls = []

    def build_while_another_finishes(folder):
        calls.append(folder)
        real_build(folder)
        if len(calls) == 1:
            (tmp_path / "winner-built").write_text("")
            tiny.ensure_tiny_checkpoints(tmp_path)  # the other process, finishing first

    monkeypatch.setattr(tiny, "_build_all", build_while_another_finishes)
    result = tiny.ensure_tiny_checkpoints(tmp_path)
    assert len(calls) == 2
    assert (result.root / "stamp.json").is_file() and result.base.is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".building-")] == []


@pytest.mark.slow
def test_two_processes_building_at_once_agree(tmp_path):
    code = (
        "import sys; from pathlib import Path; from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints; "
        "print(ensure_tiny_checkpoints(Path(sys.argv[1])).root)"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        for _ in range(2)
    ]
    roots = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(roots) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(roots.pop()).name]


def test_chat_template_gives_llama32_vision_strings(tiny_pair):
    processor = tiny_pair.processor
    prompt = "Question: What is shown?\nOptions:\nA. cat\nB. dog\nPlease select the correct answer from the options above. \n"
    text_first = [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]
    image_first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    assert processor.apply_chat_template(text_first, add_generation_prompt=True) == TEXT_FIRST.format(prompt=prompt)
    assert processor.apply_chat_template(image_first, add_generation_prompt=True) == IMAGE_FIRST.format(prompt=prompt)
    # Without an image the real template adds the system block with its date line.
    no_image = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], add_generation_prompt=True)
    assert no_image.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n")


def test_processor_call_gives_double_bos_like_vlmevalkit(tiny_pair):
    processor = tiny_pair.processor
    tok = processor.tokenizer
    text = IMAGE_FIRST.format(prompt="Is there a dog?")
    from tests.helpers import sample_image

    ids = processor(images=[[sample_image(1)]], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[:3] == [bos, bos, tok.convert_tokens_to_ids("<|start_header_id|>")]
    single = processor(images=[[sample_image(1)]], text=[text], add_special_tokens=False, return_tensors="pt")
    assert single["input_ids"][0].tolist()[:2] == [bos, tok.convert_tokens_to_ids("<|start_header_id|>")]


def test_tokenizer_round_trips_prompts_and_has_llama_special_tokens(tiny_pair):
    tok = tiny_pair.processor.tokenizer
    text = "Read the text in the image.\n Question: What is the total?  Yes/No, 1/8/93, 45%, A. cat\n\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = {name: tok.convert_tokens_to_ids(name) for name in tiny.LLAMA3_SPECIAL_TOKENS + (tiny.IMAGE_TOKEN,)}
    assert len(set(ids.values())) == len(ids) and tok.unk_token_id not in ids.values()
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.eos_token == "<|eot_id|>"
    # Special tokens follow the trained vocabulary in Llama 3's order.
    assert ids["<|eot_id|>"] - ids["<|begin_of_text|>"] == 128009 - 128000
    assert ids["<|finetune_right_pad_id|>"] - ids["<|begin_of_text|>"] == 128004 - 128000


def test_tiny_config_keeps_the_real_shape_of_things(tiny_pair):
    config = tiny_pair.base_model.config
    text, vision = config.text_config, config.vision_config
    tok = tiny_pair.processor.tokenizer
    # <|image|> is the first id past the text vocabulary, as 128256 is in Llama 3.2 Vision.
    assert config.image_token_index == text.vocab_size == tok.convert_tokens_to_ids("<|image|>") == len(tok) - 1
    # Constraint (a): the pad id lies inside the (vocab + 8)-row embedding.
    assert text.pad_token_id < tiny_pair.base_model.get_input_embeddings().num_embeddings
    # Constraint (b): the projector reads the last hidden state plus each intermediate one.
    assert vision.vision_output_dim == vision.hidden_size * (len(vision.intermediate_layers_indices) + 1)
    assert text.cross_attention_layers and vision.num_global_layers >= 1 and vision.max_num_tiles == 4
    gen = tiny_pair.base_model.generation_config
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert gen.eos_token_id == eos and gen.pad_token_id == text.pad_token_id
    assert gen.do_sample is True  # like the real checkpoint: generation must force greedy itself
    assert sum(p.numel() for p in tiny_pair.base_model.parameters() if p.requires_grad is False) < 1_000_000


def test_config_records_the_weights_digest(tiny_checkpoints):
    """The base fingerprint reads config.json, not tensor bytes: the digest in it makes two
    builds that differ only in weight values (say, another answer calibration) differ."""
    import hashlib

    config = json.loads((tiny_checkpoints.base / "config.json").read_text())
    weights = (tiny_checkpoints.base / "model.safetensors").read_bytes()
    assert config["tiny_weights_sha256"] == hashlib.sha256(weights).hexdigest()


def test_adapter_files(tiny_checkpoints):
    from safetensors.torch import load_file

    current = load_file(tiny_checkpoints.adapter / "adapter_model.safetensors")
    old = load_file(tiny_checkpoints.adapter_old_layout / "adapter_model.safetensors")
    other = load_file(tiny_checkpoints.adapter_other_base / "adapter_model.safetensors")
    config = json.loads((tiny_checkpoints.adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    assert all(t.abs().sum() > 0 for k, t in current.items() if ".lora_B." in k)
    towers = {("vision" if ".vision_model." in k else "cross" if ".cross_attn." in k else "self") for k in current}
    assert towers == {"vision", "cross", "self"}
    assert all(k.startswith("base_model.model.model.") for k in current)
    assert all(k.startswith(("base_model.model.language_model.model.", "base_model.model.vision_model.")) for k in old)
    assert sorted(t.shape for t in old.values()) == sorted(t.shape for t in current.values())
    assert other.keys() == current.keys() and any(other[k].shape != current[k].shape for k in current)


def test_mismatched_and_inert_adapter_helpers(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    mismatched = load_file(tiny.write_mismatched_adapter(tiny_checkpoints.adapter, tmp_path / "mm") / "adapter_model.safetensors")
    assert any(".qx_proj." in k for k in mismatched) and not any(".q_proj." in k for k in mismatched)
    inert = load_file(tiny.write_inert_adapter(tiny_checkpoints.adapter, tmp_path / "inert") / "adapter_model.safetensors")
    assert all(t.abs().sum() == 0 for k, t in inert.items() if ".lora_B." in k)
    assert any(t.abs().sum() > 0 for k, t in inert.items() if ".lora_A." in k)


def test_greedy_generations_answer_in_one_token_then_stop(tiny_pair):
    """On prompts unlike the benchmarks' (random word lists) the tiny model still answers
    with one of its answers and then EOS, almost always."""
    requests = make_requests(tiny_pair.processor, 24, seed=3, max_new_tokens=(200,))
    tok = tiny_pair.processor.tokenizer
    answers = {answer for kind in tiny.ANSWERS.values() for answer in kind}
    outputs = []
    for variant in ("base", "lavender"):
        outputs += generate(tiny_pair, requests, variant, progress=False).values()
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in outputs]
    assert max(lengths) < 40, sorted(lengths)  # the length penalty ends any runaway
    assert sum(p in answers for p in outputs) >= 0.8 * len(outputs), outputs


def test_answer_and_marker_words_are_single_tokens(tiny_pair):
    tok = tiny_pair.processor.tokenizer
    for words in list(tiny.ANSWERS.values()) + list(tiny.PROMPT_MARKERS.values()):
        for word in words:
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def _mini_benchmark_results(pair, name: str) -> dict:
    """Both variants of the tiny pair on one mini benchmark, scored (as the runner does it)."""
    from lavender_checks import FIXTURES
    from lavender_checks.benchmarks import get_benchmark
    from lavender_checks.data import load_benchmark_frame, load_image
    from lavender_checks.engines.request import GenerationRequest
    from lavender_checks.profiles import load_profile
    from lavender_checks.prompts import build_prompt, chat_text
    from lavender_checks.vlmeval_io import prediction_frame, roundtrip

    root = FIXTURES / "lmudata-mini"
    bench, profile = get_benchmark(name), load_profile("seed-report")
    frame = load_benchmark_frame(bench, root)
    requests = [
        GenerationRequest(key=row["index"], text=chat_text(pair.processor, build_prompt(bench, row, profile)),
                          images=[load_image(frame, row["index"], bench, root)], max_new_tokens=16)
        for row in frame.drop(columns=["image"]).to_dict("records")
    ]
    results = {}
    for variant in ("base", "lavender"):
        predictions = generate(pair, requests, variant, progress=False)
        results[variant] = bench.score(roundtrip(prediction_frame(frame, predictions)), meta=frame)
    return results


@pytest.fixture(scope="module")
def mini_results(tiny_pair):
    return {name: _mini_benchmark_results(tiny_pair, name) for name in ("MME", "MMBench_DEV_EN")}


def test_mme_answers_are_yes_or_no_and_vary(mini_results):
    for variant, result in mini_results["MME"].items():
        samples = result.samples
        assert samples["prediction"].isin(["Yes", "No"]).mean() >= 0.9, (variant, samples["prediction"].tolist())
        extracted = samples["extracted"].value_counts()
        assert extracted.get("Yes", 0) >= 0.2 * len(samples) and extracted.get("No", 0) >= 0.2 * len(samples), (variant, extracted)
        assert 0 < result.metrics["total"] < 2800  # neither all wrong nor all right (max 2800)


def test_mmbench_answers_are_option_letters_and_vary(mini_results):
    for variant, result in mini_results["MMBench_DEV_EN"].items():
        samples = result.samples
        assert samples["prediction"].isin(list("ABCD")).mean() >= 0.9, (variant, samples["prediction"].tolist())
        extracted = samples["extracted"].dropna()  # a letter among the row's options
        assert len(extracted) >= 0.8 * len(samples) and extracted.nunique() >= 3, (variant, extracted.value_counts())


def test_the_adapter_changes_some_mini_benchmark_answers(mini_results):
    for name, results in mini_results.items():
        base, lavender = (results[v].samples.set_index("index")["prediction"] for v in ("base", "lavender"))
        changed = int((base != lavender.loc[base.index]).sum())
        assert 0.05 * len(base) <= changed <= 0.5 * len(base), (name, changed, len(base))

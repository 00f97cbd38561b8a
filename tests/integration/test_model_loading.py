"""load_pair: the tiny checkpoints load through the real path; every integrity failure is a
ModelLoadError that says what is wrong and where."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lavender_checks.model import ModelLoadError, adapter_logit_change, fixed_probe_inputs, load_pair, read_pair_identity
from lavender_checks.synthetic import tiny


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_tiny_pair_loads_through_load_pair(tiny_pair, tiny_checkpoints):
    info = tiny_pair.describe()
    assert tiny_pair.has_adapter and tiny_pair.device == torch.device("cpu") and tiny_pair.dtype == torch.float32
    assert info["base_path"] == str(tiny_checkpoints.base) and info["adapter_path"] == str(tiny_checkpoints.adapter)
    assert info["lora_modules_applied"] == 14
    assert info["lora_modules_by_tower"] == {"vision": 6, "text_self_attention": 4, "text_cross_attention": 4, "other": 0}
    assert info["adapter_key_layout"] == "current" and info["adapter_logit_change"] > 0
    assert len(info["base_fingerprint"]) == 64 and len(info["adapter_fingerprint"]) == 64
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert tiny_pair.processor.tokenizer.padding_side == "left"
    json.dumps(info)  # report-ready


def test_fingerprints_follow_the_files(tiny_pair, tiny_checkpoints, tmp_path):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    same = load_pair(base, None, check_logits=False)
    assert same.base_fingerprint == tiny_pair.base_fingerprint  # not the path: the content
    _edit_json(base / "config.json", initializer_range=0.5)
    assert load_pair(base, None).base_fingerprint != tiny_pair.base_fingerprint

    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in tensors if ".lora_B." in k)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    changed = load_pair(tiny_checkpoints.base, adapter)
    assert changed.adapter_fingerprint != tiny_pair.adapter_fingerprint
    assert changed.base_fingerprint == tiny_pair.base_fingerprint


def test_the_identity_read_without_weights_is_the_loaded_pairs(tiny_pair, tiny_checkpoints, tmp_path, monkeypatch):
    import lavender_checks.model as model

    monkeypatch.setattr(model, "_load_base_model", lambda *a: pytest.fail("weights were loaded"))
    identity = read_pair_identity(tiny_checkpoints.base, tiny_checkpoints.adapter, device="cpu")
    assert (identity.base_fingerprint, identity.adapter_fingerprint) == \
        (tiny_pair.base_fingerprint, tiny_pair.adapter_fingerprint)
    assert (identity.device, identity.dtype) == (tiny_pair.device, tiny_pair.dtype)
    assert identity.describe()["adapter_path"] == str(tiny_checkpoints.adapter)
    assert read_pair_identity(tiny_checkpoints.base, device="cpu").adapter_fingerprint is None
    # the folders get load_pair's checks
    with pytest.raises(ModelLoadError, match="adapter folder .* does not exist"):
        read_pair_identity(tiny_checkpoints.base, tmp_path / "nowhere", device="cpu")
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    (base / "config.json").unlink()
    with pytest.raises(ModelLoadError):
        read_pair_identity(base, tiny_checkpoints.adapter, device="cpu")


def test_old_transformers_key_layout_loads_completely(tiny_pair, tiny_checkpoints):
    old = load_pair(tiny_checkpoints.base, tiny_checkpoints.adapter_old_layout)
    assert old.adapter_key_layout == "transformers<4.52 (remapped)"
    assert old.lora_modules_by_tower == tiny_pair.lora_modules_by_tower
    new_state = {k: v for k, v in tiny_pair.model.state_dict().items() if "lora_" in k}
    old_state = {k: v for k, v in old.model.state_dict().items() if "lora_" in k}
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)
    assert old.adapter_logit_change == tiny_pair.adapter_logit_change


def test_base_variant_equals_plain_base_model_logits(tiny_pair, tiny_base_pair):
    inputs = fixed_probe_inputs(tiny_pair.processor, tiny_pair.device)
    with torch.inference_mode():
        with tiny_pair.variant("base") as model:
            disabled = model(**inputs).logits
        plain = tiny_base_pair.model(**inputs).logits
        with tiny_pair.variant("lavender") as model:
            adapted = model(**inputs).logits
    assert torch.equal(disabled, plain)
    assert not torch.allclose(adapted, plain)
    assert adapter_logit_change(tiny_pair) == float((adapted - plain).abs().max())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_checkpoints):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_pair(tiny_checkpoints.base, None, device="cuda")


# ---------------------------------------------------------------------------------------
# Base folder errors


def test_missing_base_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_pair(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_base_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pair(tmp_path / "empty")


def test_not_an_mllama_checkpoint_names_the_model_type(tiny_checkpoints, tmp_path):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    _edit_json(base / "config.json", model_type="llama")
    with pytest.raises(ModelLoadError, match=r"model_type is 'llama', expected 'mllama'"):
        load_pair(base)


def test_pickle_weights_need_allow_pickle(tiny_checkpoints, tmp_path):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    from safetensors.torch import load_file

    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="only safetensors are read. Convert them once") as err:
        load_pair(base)
    assert "allow_pickle" not in str(err.value)  # no command offers it
    pair = load_pair(base, tiny_checkpoints.adapter, allow_pickle=True)
    assert pair.lora_modules_applied == 14


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "empty"])
def test_corrupted_base_weights_name_the_file(tiny_checkpoints, tmp_path, damage):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) - 100], "garbage_header": data[:8] + b"#" * 64 + data[72:], "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="corrupted safetensors") as err:
        load_pair(base)
    assert str(weights) in str(err.value)


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_pair(base)


def test_model_folder_code_is_never_run(tiny_checkpoints, tmp_path):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    marker = tmp_path / "code-ran"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import MllamaForConditionalGeneration as Evil\n")
    _edit_json(base / "config.json", auto_map={"AutoModelForImageTextToText": "evil.Evil"})
    _edit_json(base / "processor_config.json", auto_map={"AutoProcessor": "evil.Evil"})
    try:
        load_pair(base, None, check_logits=False)
    except ModelLoadError:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Adapter errors


def test_missing_adapter_folder(tiny_checkpoints, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter folder .* does not exist"):
        load_pair(tiny_checkpoints.base, tmp_path / "nowhere")


def test_adapter_folder_without_adapter_config(tiny_checkpoints):
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_pair(tiny_checkpoints.base, tiny_checkpoints.base)


def test_adapter_for_another_base_explains_the_shape_mismatch(tiny_checkpoints):
    with pytest.raises(ModelLoadError, match="base model of another shape") as err:
        load_pair(tiny_checkpoints.base, tiny_checkpoints.adapter_other_base)
    assert "size mismatch" in str(err.value) and "q_proj" in str(err.value)


def test_adapter_keys_matching_no_module_are_listed(tiny_checkpoints, tmp_path):
    adapter = tiny.write_mismatched_adapter(tiny_checkpoints.adapter, tmp_path / "mismatched")
    with pytest.raises(ModelLoadError, match="match no module") as err:
        load_pair(tiny_checkpoints.base, adapter)
    assert "qx_proj.lora_A.weight" in str(err.value)


def test_target_modules_without_weights_are_a_partial_load(tiny_checkpoints, tmp_path):
    """peft only warns when the config targets modules the file has no weights for."""
    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    _edit_json(adapter / "adapter_config.json", target_modules=["k_proj", "q_proj", "v_proj"])
    with pytest.raises(ModelLoadError, match="partial load|got no weights") as err:
        load_pair(tiny_checkpoints.base, adapter)
    assert "k_proj" in str(err.value)


def test_adapter_that_changes_nothing_is_refused(tiny_checkpoints, tmp_path):
    adapter = tiny.write_inert_adapter(tiny_checkpoints.adapter, tmp_path / "inert")
    with pytest.raises(ModelLoadError, match="does not change the logits"):
        load_pair(tiny_checkpoints.base, adapter)


def test_corrupted_adapter_weights_name_the_file(tiny_checkpoints, tmp_path):
    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match="corrupted safetensors") as err:
        load_pair(tiny_checkpoints.base, adapter)
    assert str(weights) in str(err.value)


def test_pickle_adapter_needs_allow_pickle(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="only safetensors are read. Convert it once") as err:
        load_pair(tiny_checkpoints.base, adapter)
    assert "allow_pickle" not in str(err.value)  # no command offers it
    assert f"save_file(torch.load('{adapter / 'adapter_model.bin'}', weights_only=True)" in str(err.value)
    assert load_pair(tiny_checkpoints.base, adapter, allow_pickle=True).lora_modules_applied == 14


def test_non_lora_adapter_is_refused(tiny_checkpoints, tmp_path):
    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    _edit_json(adapter / "adapter_config.json", peft_type="IA3")
    with pytest.raises(ModelLoadError, match="only LORA"):
        load_pair(tiny_checkpoints.base, adapter)


def test_base_fingerprint_tells_apart_checkpoints_that_differ_only_in_weight_values(tmp_path, tiny_checkpoints):
    """A fine-tune has the base's names, shapes and file sizes: only the values differ."""
    import shutil

    from lavender_checks.model import load_pair

    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_checkpoints.base, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for offset in range(len(data) // 2, len(data), 997):  # change values, keep the header
        data[offset] ^= 0x01
    weights.write_bytes(bytes(data))
    same = load_pair(tiny_checkpoints.base, device="cpu", check_logits=False).base_fingerprint
    assert load_pair(tiny_checkpoints.base, device="cpu", check_logits=False).base_fingerprint == same
    assert load_pair(copy, device="cpu", check_logits=False).base_fingerprint != same


# ------------------------------------------------------------ issue 12 item 13: clear messages


def test_adapter_with_nan_weights_says_so(tiny_checkpoints, tmp_path):
    adapter = tiny._rewrite_adapter(tiny_checkpoints.adapter, tmp_path / "nan", lambda key: key,
                                    lambda key, t: t.fill_(float("nan")) if ".lora_B." in key else t)
    with pytest.raises(ModelLoadError, match="adapter tensors hold NaN or infinite values") as err:
        load_pair(tiny_checkpoints.base, adapter)
    assert str(adapter / "adapter_model.safetensors") in str(err.value)
    assert "lora_B" in str(err.value) and "export it again" in str(err.value)


@pytest.mark.parametrize("name, expected", [
    ("meta-llama/Llama-3.1-8B", "a 8B model, while the base has 0.0B parameters; a Llama without Vision"),
    ("meta-llama/Llama-3.2-90B-Vision-Instruct", "a 90B model"),
])
def test_adapter_naming_another_base_model_warns_naming_both(tiny_checkpoints, tmp_path, name, expected):
    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    _edit_json(adapter / "adapter_config.json", base_model_name_or_path=name)
    with pytest.warns(UserWarning, match="base_model_name_or_path") as caught:
        load_pair(tiny_checkpoints.base, adapter)
    text = str(caught[0].message)
    assert repr(name) in text and expected in text and str(tiny_checkpoints.base) in text


def test_adapter_naming_its_own_base_does_not_warn(tiny_checkpoints, tmp_path):
    import warnings

    adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
    _edit_json(adapter / "adapter_config.json", base_model_name_or_path="some/place/base")  # the folder's name
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_pair(tiny_checkpoints.base, adapter)
        load_pair(tiny_checkpoints.base, tiny_checkpoints.adapter)  # "tiny-mllama"


def test_missing_tokenizer_json_names_the_folder(tiny_checkpoints, tmp_path):
    base = _copy(tiny_checkpoints.base, tmp_path / "base")
    (base / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="has no tokenizer.json") as err:
        load_pair(base)
    assert str(base) in str(err.value) and "sentencepiece" not in str(err.value)


@pytest.mark.parametrize("case, expected", [
    ("another base model", "made for another base model than"),
    ("another rank", "adapter_config.json: r is 16, but "),
    ("other target modules", "adapter_config.json: target_modules ['k_proj', 'v_proj'] do not include "),
])
def test_an_adapter_that_does_not_fit_stops_the_run_before_the_base_loads(
        case, expected, tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """One --lora is checked from the files' headers as a series' checkpoints are: peft would
    find the misfit only after the base model's weights were read."""
    import lavender_checks.model as model
    from lavender_checks import FIXTURES, cli
    from lavender_checks.model import check_adapter_fits

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "_load_base_model", refuse)
    if case == "another base model":
        adapter = tiny_checkpoints.adapter_other_base
    else:
        adapter = _copy(tiny_checkpoints.adapter, tmp_path / "adapter")
        config = json.loads((adapter / "adapter_config.json").read_text())
        _edit_json(adapter / "adapter_config.json", **(
            {"r": 16} if case == "another rank"
            else {"target_modules": ["k_proj" if m == "q_proj" else m for m in config["target_modules"]]}))
    with pytest.raises(ModelLoadError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        check_adapter_fits(tiny_checkpoints.base, adapter)
    code = cli.main(["run", "--quiet", "--base-model", str(tiny_checkpoints.base), "--lora", str(adapter),
                     "--lmu-data", str(FIXTURES / "lmudata-mini"), "--benchmark", "MME",
                     "--reference", str(FIXTURES / "reported" / "tiny-mini.toml"),
                     "--store", str(tmp_path / "store"), "--reports", str(tmp_path / "reports")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lavender-checks run: error: ") and expected in err[0], err

"""Which adapters make a series (run/checkpoints.py), the options that give them
(run/config.py), and the series' verdict arithmetic (gate/trend.py). No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavender_checks.gate.trend import first_passing
from lavender_checks.run.checkpoints import SeriesInputError, adapter_series, names_series, step_of
from lavender_checks.run.config import RUN_OPTIONS, RunConfig, RunInputError, config_from_options


def adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return folder


def test_a_folder_of_checkpoints_is_ordered_by_step_then_other_adapters_by_name(tmp_path):
    for name in ("checkpoint-1000", "checkpoint-500", "final", "checkpoint-50", "best"):
        adapter(tmp_path / "out" / name)
    (tmp_path / "out" / "runs").mkdir()  # TensorBoard logs: no checkpoint, no adapter
    (tmp_path / "out" / ".cache").mkdir()
    series = adapter_series(tmp_path / "out")
    assert [c.name for c in series] == ["checkpoint-50", "checkpoint-500", "checkpoint-1000", "best", "final"]
    assert [c.step for c in series] == [50, 500, 1000, None, None]
    assert series[0].path == tmp_path / "out" / "checkpoint-50"


def test_one_adapter_is_no_series(tmp_path):
    one = adapter(tmp_path / "lora")
    adapter(one / "checkpoint-5")  # an adapter folder stays one adapter, whatever it holds
    assert adapter_series(one) is None
    assert adapter_series(None) is None
    assert adapter_series(tmp_path / "absent") is None  # the usual run names it
    (tmp_path / "logs" / "runs").mkdir(parents=True)
    assert adapter_series(tmp_path / "logs") is None  # no adapter anywhere: the usual run refuses it


def test_repeated_lora_keeps_the_order_given(tmp_path):
    b, a = adapter(tmp_path / "b" / "checkpoint-9"), adapter(tmp_path / "a" / "checkpoint-10")
    assert [c.name for c in adapter_series((b, a))] == ["checkpoint-9", "checkpoint-10"]


@pytest.mark.parametrize("case, expected", [
    ("two of one name", "two adapters are named 'checkpoint-5'"),
    ("the same folder twice", "two adapters are named 'checkpoint-5'"),
    ("a broken checkpoint", "checkpoint-20 has no adapter_config.json"),
    ("a folder of adapters among several", "each of several --lora must be one adapter folder"),
    ("the base's name", "the name 'base' is the base model's"),
])
def test_bad_series_are_refused_naming_what(tmp_path, case, expected):
    good = adapter(tmp_path / "run1" / "checkpoint-5")
    if case == "two of one name":
        lora = (good, adapter(tmp_path / "run2" / "checkpoint-5"))
    elif case == "the same folder twice":
        lora = (good, good)
    elif case == "a broken checkpoint":
        (tmp_path / "run1" / "checkpoint-20").mkdir()
        lora = tmp_path / "run1"
    elif case == "a folder of adapters among several":
        lora = (good, tmp_path / "run1")
    else:
        lora = (good, adapter(tmp_path / "base"))
    with pytest.raises(SeriesInputError, match=expected):
        adapter_series(lora)


def test_vlmeval_names_make_a_series_of_their_own_order():
    assert names_series("llama_vision_lavender") is None
    series = names_series(("lavender_checkpoint-200", "lavender_checkpoint-100"))
    assert [(c.name, c.step, c.path) for c in series] == [("lavender_checkpoint-200", 200, None),
                                                          ("lavender_checkpoint-100", 100, None)]
    with pytest.raises(SeriesInputError, match="two adapters are named 'x'"):
        names_series(("x", "x"))
    assert step_of("final") is None and step_of("checkpoint-7") == 7


def options(**given):
    """config_from_options over the options' defaults (as argparse and pytest give them)."""
    values = {kwargs.get("dest", flag[2:].replace("-", "_")): kwargs.get("default") for flag, kwargs in RUN_OPTIONS}
    values.update(given)
    return config_from_options(values.__getitem__)


def test_options_once_keep_the_one_adapter_run(tmp_path):
    one = options(base_model=tmp_path, lora=[tmp_path / "lora"])
    assert one.lora == tmp_path / "lora" and one.lavender_name == "llama_vision_lavender"
    assert one.label() == f"{tmp_path.name}+lora-lmudata"
    several = options(base_model=tmp_path, lora=[tmp_path / "a", tmp_path / "b"], gate_series="all")
    assert several.lora == (tmp_path / "a", tmp_path / "b") and several.lora_paths == several.lora
    assert several.describe()["lora"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    names = options(from_vlmeval=tmp_path, lavender_name=["m1", "m2"])
    assert names.lavender_names == ("m1", "m2")
    with pytest.raises(RunInputError, match="compared with itself"):
        options(from_vlmeval=tmp_path, lavender_name=["m1", "llama_vision_base"])
    with pytest.raises(RunInputError, match="--gate-series"):
        RunConfig(gate_series="some")


class V:
    def __init__(self, status):
        self.status = status


def test_first_passing_is_the_first_from_which_every_later_checkpoint_passes():
    ok, bad = [V("pass"), V("pass")], [V("pass"), V("fail")]
    assert first_passing([("a", bad), ("b", ok), ("c", ok)]) == "b"
    assert first_passing([("a", ok), ("b", bad), ("c", ok)]) == "c"  # b regressed: from c on
    assert first_passing([("a", ok), ("b", ok), ("c", [V("missing")])]) is None
    assert first_passing([("a", ok), ("b", [])]) is None  # no verdict is no pass

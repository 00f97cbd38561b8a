"""VLMEvalKit's prediction files: the xlsx round trip, reading, writing and finding them."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from lavender_checks.vlmeval_io import (
    NA_TOKENS,
    PredictionFileError,
    find_prediction_file,
    prediction_frame,
    read_prediction_file,
    roundtrip,
    write_prediction_file,
)

SPEC_NA_TOKENS = ["", "N/A", "NA", "n/a", "None", "null", "NULL", "nan", "NaN", "<NA>", "#N/A",
                  "-nan", "1.#QNAN"]
SURVIVORS = ["none", "Null", " ", "NONE", "n.a."]


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def test_na_tokens_are_pandas_defaults():
    assert set(SPEC_NA_TOKENS) <= NA_TOKENS
    assert not set(SURVIVORS) & NA_TOKENS


def _frame(predictions, answers=None):
    n = len(predictions)
    return pd.DataFrame({
        "index": list(range(n)),
        "question": [f"q{i}" for i in range(n)],
        "answer": answers if answers is not None else ["x"] * n,
        "prediction": predictions,
    })


def test_roundtrip_turns_na_tokens_into_nan():
    back = roundtrip(_frame(SPEC_NA_TOKENS + SURVIVORS, answers=SPEC_NA_TOKENS + SURVIVORS))
    for column in ("prediction", "answer"):
        values = back[column].tolist()
        assert all(_is_nan(v) for v in values[:len(SPEC_NA_TOKENS)]), column
        assert values[len(SPEC_NA_TOKENS):] == SURVIVORS
    assert [str(v) for v in back["prediction"]][:2] == ["nan", "nan"]


def test_roundtrip_parses_numeric_only_columns():
    back = roundtrip(_frame(["3", "4"], answers=["3", "4.5"]))
    assert back["prediction"].tolist() == [3, 4]
    assert [str(v) for v in back["answer"]] == ["3.0", "4.5"]  # a float column: '3' -> '3.0'
    mixed = roundtrip(_frame(["3", "three"]))
    assert mixed["prediction"].tolist() == ["3", "three"]  # one text cell keeps them all text
    with_na = roundtrip(_frame(["3", "N/A"]))
    assert [str(v) for v in with_na["prediction"]] == ["3.0", "nan"]


def test_roundtrip_formulas():
    frame = _frame(["=1+1", "= B", "ok"])
    assert roundtrip(frame)["prediction"].tolist() == ["=1+1", "= B", "ok"]
    old = roundtrip(frame, formulas_as_zero=True)["prediction"].tolist()
    assert [str(v) for v in old] == ["0", "0", "ok"]


def test_roundtrip_keeps_what_xlsxwriter_keeps_and_changes_the_rest():
    back = roundtrip(_frame(["  padded\n", "a\nb", "ß ﬁ İ", "mailto:x@y.z", "x" * 40000]))
    values = back["prediction"].tolist()
    assert values[:3] == ["  padded\n", "a\nb", "ß ﬁ İ"]
    assert values[3] == "x@y.z"  # xlsxwriter writes it as a link without the scheme
    assert len(values[4]) == 32767  # Excel's cell limit
    assert back["index"].dtype == np.int64


def test_roundtrip_equals_a_written_and_read_file(tmp_path):
    frame = _frame(SPEC_NA_TOKENS + SURVIVORS + ["=x", "12"])
    path = write_prediction_file(frame, tmp_path / "m_D.xlsx")
    from_file = read_prediction_file(path)
    in_memory = roundtrip(frame)
    pd.testing.assert_frame_equal(from_file, in_memory)


@pytest.mark.parametrize("suffix", [".xlsx", ".tsv", ".csv", ".json", ".jsonl"])
def test_every_format_reads_back_with_the_same_na_semantics(tmp_path, suffix):
    predictions = ["N/A", "", "None", "none", " yes ", "=1+1", "B. dog"]
    frame = _frame(predictions, answers=["NA", "a", "b", "c", "d", "e", "f"])
    frame.insert(2, "image", ["base64..."] * len(frame))
    path = write_prediction_file(frame, tmp_path / f"m_D{suffix}")
    back = read_prediction_file(path)
    assert "image" not in back.columns
    assert list(back.columns) == ["index", "question", "answer", "prediction"]
    assert [str(v) for v in back["prediction"]] == ["nan", "nan", "nan", "none", " yes ", "=1+1", "B. dog"]
    assert str(back["answer"].iloc[0]) == "nan"
    assert back["index"].tolist() == list(range(len(frame)))


def test_tsv_and_csv_quote_every_field(tmp_path):
    path = write_prediction_file(_frame(["a\tb", 'say "x"']), tmp_path / "m_D.tsv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == '"index"\t"question"\t"answer"\t"prediction"'
    assert read_prediction_file(path)["prediction"].tolist() == ["a\tb", 'say "x"']


def test_json_is_indented_records(tmp_path):
    path = write_prediction_file(_frame(["a"]), tmp_path / "m_D.json")
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"index": 0, "question": "q0", "answer": "x", "prediction": "a"}]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="m_D.xlsx"):
        read_prediction_file(tmp_path / "m_D.xlsx")


def test_missing_prediction_column_names_file_and_columns(tmp_path):
    path = tmp_path / "m_D.tsv"
    pd.DataFrame({"index": [1], "answer": ["a"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(PredictionFileError) as info:
        read_prediction_file(path)
    message = str(info.value)
    assert str(path) in message and "'prediction'" in message and "index, answer" in message


def test_unreadable_content(tmp_path):
    bad = tmp_path / "m_D.xlsx"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(PredictionFileError, match="m_D.xlsx"):
        read_prediction_file(bad)
    lines = tmp_path / "m_D.jsonl"
    lines.write_text('{"index": 1, "prediction": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(PredictionFileError, match="line 2"):
        read_prediction_file(lines)
    nested = tmp_path / "n_D.jsonl"
    nested.write_text('{"index": 1, "prediction": ["a"]}\n', encoding="utf-8")
    with pytest.raises(PredictionFileError, match="column 'prediction'"):
        read_prediction_file(nested)
    other = tmp_path / "m_D.parquet"
    other.write_bytes(b"x")
    with pytest.raises(PredictionFileError, match="unsupported file type"):
        read_prediction_file(other)


def test_write_refuses_a_frame_without_prediction(tmp_path):
    with pytest.raises(PredictionFileError, match="no 'prediction' column"):
        write_prediction_file(pd.DataFrame({"index": [1]}), tmp_path / "m_D.xlsx")
    assert list(tmp_path.iterdir()) == []


def test_prediction_frame_is_vlmevalkit_layout():
    meta = pd.DataFrame({"index": [3, 1, 2], "image": ["i3", "i1", "i2"], "question": ["c", "a", "b"],
                         "answer": ["C", "A", "B"], "category": ["x", "y", "z"]})
    frame = prediction_frame(meta, {1: "one", "2": 2, 3: "three", 99: "extra"})
    assert list(frame.columns) == ["index", "question", "answer", "category", "prediction"]
    assert frame["index"].tolist() == [3, 1, 2]
    assert frame["prediction"].tolist() == ["three", "one", "2"]  # str()-ed
    assert "image" in meta.columns  # the caller's frame is left alone


def test_prediction_frame_names_missing_predictions():
    meta = pd.DataFrame({"index": [1, 2, 3], "question": ["a", "b", "c"]})
    with pytest.raises(PredictionFileError, match=r"2 of 3 benchmark rows have no prediction: 1, 3"):
        prediction_frame(meta, {2: "x"})


# --------------------------------------------------------------------------------------
# Finding files in a VLMEvalKit work dir
# --------------------------------------------------------------------------------------

def _touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    os.utime(path, (mtime, mtime))
    return path


def test_find_new_layout_with_symlinks(tmp_path):
    model = tmp_path / "llama"
    old = _touch(model / "T20260501-101010" / "llama_MME.xlsx", 1_000)
    new = _touch(model / "T20260601-101010" / "llama_MME.xlsx", 2_000)
    (model / "llama_MME.xlsx").symlink_to(new)
    _touch(model / "T20260701-101010" / "llama_MME_auxmatch.xlsx", 9_000)  # cache: ignored
    _touch(model / "T20260701-101010" / "llama_MME_gpt-4o-mini_result.pkl", 9_000)
    _touch(model / "T20260701-101010" / "llama_MME_V2.xlsx", 9_000)  # another dataset
    assert find_prediction_file(tmp_path, "llama", "MME") == new.resolve()
    os.utime(old, (3_000, 3_000))
    assert find_prediction_file(tmp_path, "llama", "MME") == old.resolve()


def test_find_legacy_layout_and_other_formats(tmp_path):
    legacy = _touch(tmp_path / "m" / "T20250101_Gabc123" / "m_DocVQA_VAL.tsv", 5_000)
    _touch(tmp_path / "m" / "not_a_run_dir" / "m_DocVQA_VAL.xlsx", 9_000)  # not searched
    assert find_prediction_file(tmp_path, "m", "DocVQA_VAL") == legacy.resolve()


def test_find_in_a_run_dir_given_directly(tmp_path):
    here = _touch(tmp_path / "m_ChartQA_TEST.xlsx", 1_000)
    assert find_prediction_file(tmp_path, "m", "ChartQA_TEST") == here.resolve()


def test_find_reports_where_it_looked(tmp_path):
    run = tmp_path / "m" / "T20260601-101010"
    run.mkdir(parents=True)
    _touch(run / "m_MME_auxmatch.xlsx", 1_000)
    with pytest.raises(FileNotFoundError) as info:
        find_prediction_file(tmp_path, "m", "MME")
    message = str(info.value)
    assert "m_MME.{xlsx,tsv,csv,json,jsonl}" in message
    assert str(run) in message and str(tmp_path / "m") in message


@pytest.mark.parametrize("suffix", [".xlsx", ".tsv", ".json"])
def test_an_index_that_is_not_an_integer_names_the_file(tmp_path, suffix):
    frame = pd.DataFrame({"index": ["0", "1", "x2"], "prediction": ["a", "b", "c"]})
    path = write_prediction_file(frame, tmp_path / f"m_ChartQA_TEST{suffix}")
    with pytest.raises(PredictionFileError) as err:
        read_prediction_file(path)
    assert str(err.value).startswith(f"{path}: data row 3 column 'index' holds 'x2', not an integer")
    ok = write_prediction_file(frame.iloc[:2], tmp_path / f"ok{suffix}")
    assert read_prediction_file(ok)["index"].tolist() == [0, 1]

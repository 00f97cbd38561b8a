"""DocVQA_VAL scoring: VLMEvalKit's ANLS, aggregation and numerics (spec sections 3 and 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
from lavender_checks.vlmeval_io import roundtrip

DOCVQA = get_benchmark("DocVQA_VAL")


def _frame(rows, **extra):
    """rows: (answer cell, prediction) pairs; indices 100, 101, ..."""
    frame = pd.DataFrame({
        "index": [100 + i for i in range(len(rows))],
        "question": [f"question {i}" for i in range(len(rows))],
        "answer": [answer for answer, _ in rows],
        "prediction": [prediction for _, prediction in rows],
    })
    for column, values in extra.items():
        frame[column] = values
    return frame


def _forms_value(result, metric):
    return sum(term.scale * term.numerator.sum() / term.denominator.sum() for term in result.forms[metric])


def _assert_forms_match(result):
    assert set(result.forms) == set(result.metrics)
    for metric, value in result.metrics.items():
        for term in result.forms[metric]:
            assert len(term.numerator) == len(term.denominator) == len(result.units)
        assert _forms_value(result, metric) == pytest.approx(value, abs=1e-9), metric


def test_spec_examples_through_the_round_trip():
    frame = roundtrip(_frame([
        ("['abcd']", "   abxy   "),                     # padding: 0.8
        ("['N/A']", "N/A"),                             # prediction reads back as 'nan': 0
        ("['ab']", "ax"),                               # exactly 0.5 is kept
        ("['1/8/93', 'January 8, 1993']", "january 8, 1993"),  # best answer, case-insensitive
        ("['ßx']", "ßy"),                               # L = len('SSX') = 3: 2/3
        ("['abc']", "xyz"),                             # below 0.5: 0
    ]))
    result = DOCVQA.score(frame)
    scores = result.samples["score"].tolist()
    assert scores == [0.8, 0.0, 0.5, 1.0, 1 - 1 / 3, 0.0]
    assert result.samples["prediction"].tolist()[1] == "nan"
    assert list(result.metrics) == ["Overall"]
    assert result.metrics["Overall"] == float(np.mean(np.array(scores))) * 100
    _assert_forms_match(result)


def test_samples_and_units_contract():
    result = DOCVQA.score(_frame([("['a']", "a"), ("['b']", "c")]))
    samples = result.samples
    assert samples["index"].tolist() == [100, 101]
    assert samples["unit"].tolist() == [100, 101]
    assert samples["score"].dtype == np.float64
    assert {"answer", "prediction", "min_distance"} <= set(samples.columns)
    units = result.units
    assert units["unit"].tolist() == [100, 101]
    assert units["stratum"].nunique() == 1
    assert units["correct"].tolist() == [1.0, 0.0]
    assert result.benchmark == "DocVQA_VAL"


def test_numerics_follow_numpy_mean_then_times_100():
    # Scores 0, 0, 0, 2/3, 2/3, 1, 0.6, 0.8, 0.6, 1, 1 in file order.
    pairs = {"1": ("['abc']", "abc"), "0": ("['abc']", "xyz"), "t": ("['abc']", "abx"),
             "e": ("['abcde']", "abcdx"), "s": ("['abcde']", "abcxy")}
    rows = [pairs[key] for key in "000tt1ese11"]
    result = DOCVQA.score(_frame(rows))
    scores = result.samples["score"].to_numpy()
    overall = result.metrics["Overall"]
    assert overall == float(np.mean(scores)) * 100 == 59.39393939393939
    # The other ways to write the mean differ in the last digit; we follow numpy.mean.
    assert overall != 100 * sum(scores.tolist()) / len(scores)
    assert overall != sum(scores.tolist()) / len(scores) * 100


def test_split_column_gives_per_split_keys_then_overall():
    frame = _frame([("['a']", "a"), ("['a']", "b"), ("['a']", "a")], split=["val", "test", "val"])
    result = DOCVQA.score(frame)
    assert list(result.metrics) == ["test", "val", "Overall"]
    assert result.metrics["val"] == 100.0 and result.metrics["test"] == 0.0
    assert result.metrics["Overall"] == float(np.mean([1.0, 0.0, 1.0])) * 100
    assert result.units["stratum"].tolist() == ["val", "test", "val"]
    _assert_forms_match(result)


def test_category_column_gives_overall_then_sorted_categories():
    frame = _frame([("['a']", "a"), ("['a']", "b"), ("['a']", "a")], category=["table", "form", "form"])
    result = DOCVQA.score(frame)
    assert list(result.metrics) == ["Overall", "form", "table"]
    assert result.metrics["form"] == 50.0
    _assert_forms_match(result)


def test_non_string_answer_element_is_a_clear_error():
    frame = roundtrip(_frame([("['a']", "a"), ("['1993', 1994]", "1993")]))
    with pytest.raises(ScoringInputError) as info:
        DOCVQA.score(frame)
    message = str(info.value)
    assert "data row 2 (index 101)" in message and "column 'answer'" in message
    assert "element 1 is int" in message


def test_code_in_an_answer_cell_is_one_plain_answer(monkeypatch):
    ran = []
    monkeypatch.setattr("os.system", lambda *args: ran.append(args) or 0)
    cell = "__import__('os').system('touch /tmp/pwned')"
    result = DOCVQA.score(_frame([(cell, cell), (cell, "0")]))
    assert ran == []
    assert result.samples["score"].tolist() == [1.0, 0.0]


def test_meta_must_contain_every_index():
    frame = _frame([("['a']", "a"), ("['b']", "b"), ("['c']", "c")])
    meta = pd.DataFrame({"index": [100, 102, 500], "question": ["q", "q", "q"]})
    with pytest.raises(ScoringInputError, match=r"1 predicted index\(es\) are not in the benchmark TSV: 101"):
        DOCVQA.score(frame, meta)
    meta.loc[len(meta)] = [101, "q"]
    assert DOCVQA.score(frame, meta).metrics["Overall"] == 100.0  # a subset of the TSV is fine


def test_bad_frames_are_clear_errors():
    with pytest.raises(ScoringInputError, match="lacks column\\(s\\) 'prediction'.*columns found: index, question, answer"):
        DOCVQA.score(_frame([("['a']", "a")]).drop(columns=["prediction"]))
    duplicated = _frame([("['a']", "a"), ("['a']", "a")])
    duplicated["index"] = [7, 7]
    with pytest.raises(ScoringInputError, match="repeats 1 value"):
        DOCVQA.score(duplicated)
    fractional = _frame([("['a']", "a")])
    fractional["index"] = [1.5]
    with pytest.raises(ScoringInputError, match="data row 1 column 'index' holds 1.5"):
        DOCVQA.score(fractional)
    with pytest.raises(ScoringInputError, match="no rows"):
        DOCVQA.score(_frame([]))


def test_numeric_answers_after_the_round_trip_are_stringified():
    # A subset whose answer column is all numbers reads back as floats: '12' -> '12.0'.
    frame = roundtrip(_frame([("12", "12"), ("1.5", "one point five")]))
    result = DOCVQA.score(frame)
    assert result.samples["answer"].tolist() == ["12.0", "1.5"]
    assert result.samples["score"].tolist() == [0.5, 0.0]  # d('12.0', '12') = 2 over L = 4


def test_dataset_prompt_comes_from_the_profile():
    with pytest.raises(NotImplementedError):
        DOCVQA.dataset_prompt({"question": "What?"})

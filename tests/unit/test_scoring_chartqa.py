"""ChartQA_TEST scoring: VLMEvalKit's relaxed accuracy per split (spec sections 4 and 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
from lavender_checks.vlmeval_io import roundtrip

CHARTQA = get_benchmark("ChartQA_TEST")

# The spec's edge-case table, row by row (answer, prediction, correct?).
EDGE_CASES = [
    ("10", "10.5", True), ("1", "1.05", False), ("0", "0.0", False), ("2015", "2016", True),
    ("57", "57%", False), ("0.5", "50%", True), ("12", "12.", True), ("Yes", "Yes.", False),
    ("1000", "1,000", False), ("12", "$12", False), ("12", "1_2", True), ("12", "１２", True),
    ("nan", "nan", False), ("N/A", "N/A", False),
]


def _frame(rows, splits=None):
    n = len(rows)
    return pd.DataFrame({
        "index": list(range(n)),
        "question": ["q"] * n,
        "answer": [answer for answer, _ in rows],
        "split": splits if splits is not None else ["test_human"] * n,
        "prediction": [prediction for _, prediction in rows],
    })


def _assert_forms_match(result):
    assert set(result.forms) == set(result.metrics)
    for metric, value in result.metrics.items():
        total = sum(t.scale * t.numerator.sum() / t.denominator.sum() for t in result.forms[metric])
        assert total == pytest.approx(value, abs=1e-9), metric


def test_edge_case_table_row_by_row_through_the_round_trip():
    rows = [(answer, prediction) for answer, prediction, _ in EDGE_CASES]
    result = CHARTQA.score(roundtrip(_frame(rows)))
    expected = [1.0 if ok else 0.0 for _, _, ok in EDGE_CASES]
    assert result.samples["score"].tolist() == expected
    # 'N/A' on both sides reads back as 'nan': NaN never compares equal.
    assert result.samples[["answer", "prediction"]].iloc[-1].tolist() == ["nan", "nan"]


def test_split_keys_and_micro_average():
    rows = [("1", "1"), ("1", "2"), ("1", "3"), ("5", "5")]
    splits = ["test_human", "test_human", "test_human", "test_augmented"]
    result = CHARTQA.score(_frame(rows, splits))
    assert list(result.metrics) == ["test_human", "test_augmented", "Overall"]
    assert result.metrics["test_augmented"] == 100.0
    assert result.metrics["Overall"] == 50.0  # over rows, not the mean of the split means
    assert result.units["stratum"].tolist() == splits
    assert result.samples["split"].tolist() == splits
    _assert_forms_match(result)


def test_numerics_follow_numpy_mean_then_times_100():
    result = CHARTQA.score(_frame([("1", "1"), ("1", "2"), ("1", "3")]))
    human = result.metrics["test_human"]
    assert human == float(np.mean([1.0, 0.0, 0.0])) * 100 == 33.33333333333333
    assert human != 100 * 1 / 3  # 33.333333333333336: the naive formula's last digit differs
    assert result.metrics["Overall"] == human


def test_other_splits_follow_the_known_ones():
    result = CHARTQA.score(_frame([("1", "1")] * 3, ["extra", "test_augmented", "test_human"]))
    assert list(result.metrics) == ["test_human", "test_augmented", "extra", "Overall"]


def test_list_answers_are_stringified_elements():
    rows = [("[2010, 2011]", "2011"), ("[Yes, No]", "Yes"), ("[Yes, No]", "[yes, no]")]
    result = CHARTQA.score(_frame(rows))
    assert result.samples["score"].tolist() == [1.0, 0.0, 1.0]


def test_prediction_is_stripped_and_cot_output_scores_zero():
    rows = [("12", "  12\n"), ("12", "Let's think step by step. FINAL ANSWER: 12")]
    assert CHARTQA.score(_frame(rows)).samples["score"].tolist() == [1.0, 0.0]


def test_units_samples_and_forms():
    result = CHARTQA.score(_frame([("a", "a"), ("b", "c")], ["test_human", "test_augmented"]))
    assert result.units.columns.tolist()[:3] == ["unit", "stratum", "correct"]
    assert result.units["correct"].tolist() == [1.0, 0.0]
    assert {"index", "unit", "score", "split", "answer", "prediction"} <= set(result.samples.columns)
    _assert_forms_match(result)


def test_bad_input():
    with pytest.raises(ScoringInputError, match="lacks column\\(s\\) 'split'"):
        CHARTQA.score(_frame([("1", "1")]).drop(columns=["split"]))
    frame = _frame([("1", "1"), ("2", "2")])
    frame["split"] = ["test_human", np.nan]
    with pytest.raises(ScoringInputError, match="data row 2 \\(index 1\\) column 'split' is empty"):
        CHARTQA.score(frame)
    with pytest.raises(ScoringInputError, match="empty list"):
        CHARTQA.score(_frame([("[]", "1")]))
    meta = pd.DataFrame({"index": [0]})
    with pytest.raises(ScoringInputError, match="not in the benchmark TSV: 1"):
        CHARTQA.score(_frame([("1", "1"), ("2", "2")]), meta)

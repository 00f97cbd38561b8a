"""MMBench_DEV_EN scoring: circular groups, exact matching, report_acc (spec section 5)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
from lavender_checks.vlmeval_io import roundtrip

MMBENCH = get_benchmark("MMBench_DEV_EN")
LETTERS = "ABCD"
L2 = {"image_scene": "coarse_perception", "ocr": "finegrained_perception (instance-level)",
      "social_relation": "relation_reasoning", "image_style": "coarse_perception"}


@pytest.fixture(autouse=True)
def _no_verbose(monkeypatch):
    monkeypatch.delenv("VERBOSE", raising=False)


def _row(main, rotation, prediction, category="image_scene", options=("cat", "dog", "bird", "fish"),
         correct=0, hint=np.nan):
    """Row of circular copy `rotation` of question `main`: options rotated left by `rotation`,
    `correct` is the position of the right option in the main row. prediction may contain
    '{right}' (the right letter of this rotation) or '{wrong}'."""
    k = rotation % len(options)
    rotated = list(options[k:]) + list(options[:k])
    right = LETTERS[rotated.index(options[correct])]
    wrong = next(letter for letter in LETTERS[:len(options)] if letter != right)
    row = {"index": main + rotation * 1_000_000, "question": f"What is shown in {main}?",
           "hint": hint, "answer": right, "category": category, "l2-category": L2[category],
           "split": "dev", "prediction": prediction.format(right=right, wrong=wrong)}
    for position, letter in enumerate(LETTERS):
        row[letter] = rotated[position] if position < len(rotated) else np.nan
    return row


def _frame(rows):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
               "l2-category", "split", "prediction"]
    return pd.DataFrame(rows)[columns]


def _assert_forms_match(result):
    assert set(result.forms) == set(result.metrics)
    for metric, value in result.metrics.items():
        total = sum(t.scale * t.numerator.sum() / t.denominator.sum() for t in result.forms[metric])
        assert total == pytest.approx(value, abs=1e-9), metric


def _standard_frame():
    rows = [
        # group 1: four rotations, all right -> hit 1
        *[_row(1, r, "{right}") for r in range(4)],
        # group 2: second rotation wrong -> hit 0
        _row(2, 0, "{right}", category="ocr"), _row(2, 1, "The answer is {wrong}", category="ocr"),
        # group 3: main row only, extraction fails -> hit 0 without a judge
        _row(3, 0, "I am not sure what this is, it could be many things"),
        # group 4: circular copy without its main row -> ignored
        _row(4, 1, "{right}", category="social_relation"),
        # group 5: a missing rotation (1e6) -> a group of two, both right -> hit 1
        _row(5, 0, "({right})", category="social_relation"),
        _row(5, 2, "**{right}**", category="social_relation"),
    ]
    return _frame(rows)


def test_groups_hits_and_logs():
    result = MMBENCH.score(roundtrip(_standard_frame()))
    units = result.units.set_index("unit")
    assert units.index.tolist() == [1, 2, 3, 5]  # group 4 has no main row
    assert units["correct"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert units["rotations"].tolist() == [4, 2, 1, 2]
    assert units.loc[1, "log"] == "Succeed During Pre-fetching"
    assert units.loc[2, "log"].startswith("Failed in Prefetching Rolling 1")
    assert units.loc[3, "log"] == ("Failed in Prefetch, no GPT-based answer matching under "
                                   "`exact_matching` policy.")
    assert units["stratum"].tolist() == ["image_scene", "ocr", "image_scene", "social_relation"]


def test_report_acc_keys_values_and_order():
    result = MMBENCH.score(roundtrip(_standard_frame()))
    assert list(result.metrics) == ["Overall", "CP", "FP-S", "RR", "image_scene", "ocr", "social_relation"]
    assert result.metrics["Overall"] == float(np.mean([1, 0, 0, 1])) * 100 == 50.0
    assert result.metrics["CP"] == 50.0 and result.metrics["FP-S"] == 0.0 and result.metrics["RR"] == 100.0
    assert result.metrics["image_scene"] == 50.0
    # Keys follow the registry's order; categories absent from the file get no key.
    order = [k for k in MMBENCH.spec.metric_keys if k in result.metrics]
    assert list(result.metrics) == order
    _assert_forms_match(result)


def test_samples_one_row_per_prediction_row():
    frame = _standard_frame()
    result = MMBENCH.score(roundtrip(frame.sample(frac=1, random_state=3)))  # order does not matter
    samples = result.samples.set_index("index")
    assert len(samples) == len(frame)
    assert samples.index.tolist() == sorted(frame["index"])  # sorted like VLMEvalKit
    assert samples.loc[2000001, "extracted"] == samples.loc[2000001, "answer"]
    assert samples.loc[2000001, "score"] == 1.0 and samples.loc[2000001, "hit"] == 1.0
    assert samples.loc[1000002, "score"] == 0.0 and samples.loc[2, "hit"] == 0.0
    assert samples.loc[3, "extracted"] is None and samples.loc[3, "score"] == 0.0
    assert bool(samples.loc[1000004, "counted"]) is False and math.isnan(samples.loc[1000004, "hit"])
    assert samples.loc[2000005, "unit"] == 5 and bool(samples.loc[2000005, "main"]) is False


def test_first_wrong_rotation_is_reported_and_z_counts_as_wrong():
    frame = _frame([_row(7, 0, "Cannot determine the answer"), _row(7, 1, "{right}"),
                    _row(8, 0, "no idea at all, sorry, honestly"), _row(8, 1, "{wrong}")])
    units = MMBENCH.score(frame).units.set_index("unit")
    assert units.loc[7, "correct"] == 0.0
    assert units.loc[7, "log"].startswith("Failed in Prefetching Rolling 0")
    assert "Pre-fetched is Z" in units.loc[7, "log"]
    # A failed extraction followed by a wrong one: the wrong one is what gets logged.
    assert units.loc[8, "log"].startswith("Failed in Prefetching Rolling 1")


def test_ground_truth_is_each_rows_own_answer():
    rows = [_row(9, r, "{right}") for r in range(4)]
    assert len({row["answer"] for row in rows}) == 4  # the letter moves with the rotation
    assert MMBENCH.score(_frame(rows)).metrics["Overall"] == 100.0
    same_letter = [dict(row, prediction=rows[0]["answer"]) for row in rows]
    assert MMBENCH.score(_frame(same_letter)).metrics["Overall"] == 0.0


def test_choices_are_the_rows_non_nan_options():
    three = ("cat", "dog", "bird")
    frame = _frame([_row(11, 0, "D", options=three), _row(12, 0, "The answer is definitely C", options=three),
                    _row(13, 0, "The answer is definitely wrong", options=three, correct=2)])
    samples = MMBENCH.score(frame).samples.set_index("index")
    assert samples.loc[11, "extracted"] is None  # D is no choice of a 3-option question
    assert samples.loc[12, "extracted"] == "C"
    assert samples.loc[13, "extracted"] is None  # regex gives D, which is no choice


def test_option_text_none_vanishes_after_the_round_trip():
    frame = _frame([_row(14, 0, "C", options=("cat", "dog", "None", "fish"))])
    result = MMBENCH.score(roundtrip(frame))
    assert result.samples["extracted"].tolist() == [None]
    assert MMBENCH.score(frame).samples["extracted"].tolist() == ["C"]  # raw strings differ


def test_verbose_env_changes_the_score(monkeypatch):
    frame = _frame([_row(15, 0, "I think it is A")])  # the right answer is A
    assert MMBENCH.score(frame).metrics["Overall"] == 100.0
    monkeypatch.setenv("VERBOSE", "0")
    assert MMBENCH.score(frame).metrics["Overall"] == 0.0


def test_meta_gives_ground_truth_and_checks_indices():
    frame = _frame([_row(16, 0, "{right}"), _row(16, 1, "{right}")])
    meta = frame.drop(columns=["prediction"]).copy()
    assert MMBENCH.score(frame, meta).metrics["Overall"] == 100.0
    assert meta.loc[1, "answer"] == "D"
    meta.loc[1, "answer"] = "B"  # VLMEvalKit reads GT from the benchmark TSV
    assert MMBENCH.score(frame, meta).metrics["Overall"] == 0.0
    with pytest.raises(ScoringInputError, match="not in the benchmark TSV: 1000016"):
        MMBENCH.score(frame, meta.iloc[:1])


def test_column_names_are_lower_cased_like_vlmevalkit():
    frame = _frame([_row(17, 0, "{right}")]).rename(columns={"category": "Category", "split": "Split"})
    assert list(MMBENCH.score(frame).metrics) == ["Overall", "CP", "image_scene"]


def test_bad_input():
    frame = _frame([_row(18, 0, "{right}"), _row(19, 0, "{right}")])
    mixed = frame.assign(split=["dev", "test"])
    with pytest.raises(ScoringInputError, match="mixes splits"):
        MMBENCH.score(mixed)
    with pytest.raises(ScoringInputError, match="no main question"):
        MMBENCH.score(_frame([_row(20, 1, "{right}")]))
    with pytest.raises(ScoringInputError, match="column 'category' is empty"):
        MMBENCH.score(frame.assign(category=["ocr", np.nan]))


def test_without_taxonomy_columns_only_overall():
    frame = _frame([_row(21, 0, "{right}")]).drop(columns=["category", "l2-category", "split"])
    assert list(MMBENCH.score(frame).metrics) == ["Overall"]


def test_dataset_prompt_spec_example():
    row = {"question": "What is shown?", "hint": "The picture is a photo.", "A": "cat", "B": "dog",
           "C": "bird", "D": np.nan}
    assert MMBENCH.dataset_prompt(row) == (
        "Hint: The picture is a photo.\nQuestion: What is shown?\nOptions:\nA. cat\nB. dog\nC. bird\n"
        "Please select the correct answer from the options above. \n")


def test_dataset_prompt_without_hint_or_options():
    row = pd.Series({"index": 1, "question": "Why?", "hint": np.nan, "A": np.nan, "B": np.nan})
    assert MMBENCH.dataset_prompt(row) == "Question: Why?\n"
    row = pd.Series({"question": "Which?", "A": "yes", "B": "no"})  # no hint column at all
    assert MMBENCH.dataset_prompt(row) == (
        "Question: Which?\nOptions:\nA. yes\nB. no\nPlease select the correct answer from the options above. \n")


def test_a_file_without_its_circular_copies_is_scored_but_said_not_comparable():
    """A guess that is right once is a hit without the copies, a miss with them."""
    whole = _frame([*[_row(1, r, "A") for r in range(4)], *[_row(2, r, "A", category="ocr")
                                                            for r in range(4)]])
    full = MMBENCH.score(whole)
    assert full.noncomparable == ""
    mains = MMBENCH.score(whole[whole["index"] < 1_000_000])
    assert mains.metrics["Overall"] > full.metrics["Overall"]
    assert "2 of 2 questions have no circular copies" in mains.noncomparable
    assert "CircularEval could not be applied" in mains.noncomparable
    # A question with one option has nothing to rotate: it needs no copies.
    single = _frame([{**_row(3, 0, "A", options=("cat", "dog")), "B": np.nan}])
    assert MMBENCH.score(single).noncomparable == ""

"""MME scoring: Yes/No extraction, acc / acc+ per image, perception and reasoning sums
(spec sections 6 and 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
from lavender_checks.vlmeval_io import roundtrip

MME = get_benchmark("MME")
PERCEPTION = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark",
              "position", "posters", "scene"]
REASONING = ["code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]
FILE_ORDER = ["existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR", "commonsense_reasoning", "numerical_calculation",
              "text_translation", "code_reasoning"]

# Per category: which questions of its three images are answered right ("10" = first right,
# second wrong). With these, adding the perception scores in file order gives
# 699.9999999999999 while VLMEvalKit's fixed order gives 700.0.
PATTERNS = {
    "OCR": "11 10 01", "artwork": "10 11 01", "celebrity": "01 01 00", "color": "10 01 01",
    "count": "11 01 00", "existence": "00 10 10", "landmark": "01 11 01", "position": "01 11 11",
    "posters": "10 00 00", "scene": "01 00 01", "commonsense_reasoning": "11 11 11",
    "numerical_calculation": "10 10 11", "text_translation": "00 00 00", "code_reasoning": "11 01 10",
}


def _frame(patterns=PATTERNS, order=FILE_ORDER):
    rows = []
    for category in order:
        for image_number, pair in enumerate(patterns[category].split()):
            image = f"{category}/{image_number}.jpg"
            for question, (answer, right) in enumerate(zip(("Yes", "No"), pair)):
                prediction = answer if right == "1" else ("No" if answer == "Yes" else "Yes")
                rows.append({"index": len(rows), "question": f"Is it {question}? Please answer yes or no.",
                             "answer": answer, "category": category, "image_path": image,
                             "prediction": f"{prediction}."})
    return pd.DataFrame(rows)


def _expected_subtask(pattern):
    pairs = [[c == "1" for c in pair] for pair in pattern.split()]
    acc = float(np.mean([float(x) for pair in pairs for x in pair])) * 100
    plus = float(np.mean([float(pair[0] * pair[1]) for pair in pairs])) * 100
    return acc + plus


def _assert_forms_match(result):
    assert set(result.forms) == set(result.metrics)
    for metric, value in result.metrics.items():
        total = sum(t.scale * t.numerator.sum() / t.denominator.sum() for t in result.forms[metric])
        assert total == pytest.approx(value, abs=1e-9), metric


def test_metric_order_and_values():
    result = MME.score(roundtrip(_frame()))
    assert list(result.metrics) == ["perception", "reasoning", *FILE_ORDER, "total"]
    for category, pattern in PATTERNS.items():
        assert result.metrics[category] == _expected_subtask(pattern), category
    assert result.metrics["existence"] == float(np.mean([0, 0, 1, 0, 1, 0])) * 100 + 0.0
    assert result.metrics["total"] == result.metrics["perception"] + result.metrics["reasoning"]
    _assert_forms_match(result)


def test_perception_is_summed_in_vlmevalkits_fixed_order():
    result = MME.score(_frame())
    fixed = 0
    for category in PERCEPTION:
        fixed += result.metrics[category]
    in_file_order = 0
    for category in FILE_ORDER[:10]:
        in_file_order += result.metrics[category]
    assert result.metrics["perception"] == fixed == 700.0
    assert in_file_order == 699.9999999999999  # the order matters in the last digit
    reasoning = 0
    for category in REASONING:
        reasoning += result.metrics[category]
    assert result.metrics["reasoning"] == reasoning


def test_units_are_images_and_samples_are_questions():
    frame = _frame()
    result = MME.score(frame)
    units = result.units
    assert len(units) == 14 * 3
    assert units["unit"].is_unique
    first = units.set_index("unit").loc["OCR/1.jpg"]
    assert first["stratum"] == "OCR" and first["correct"] == 0.5 and first["pair_product"] == 0.0
    samples = result.samples
    assert len(samples) == len(frame)
    assert samples["extracted"].isin(["Yes", "No"]).all()
    assert samples["unit"].tolist() == frame["image_path"].tolist()
    assert {"index", "score", "category", "answer", "prediction"} <= set(samples.columns)


def test_acc_plus_pairs_questions_by_image_path_in_file_order():
    frame = pd.DataFrame({
        "index": [0, 1, 2, 3], "question": ["q"] * 4, "answer": ["Yes", "Yes", "No", "No"],
        "category": ["color"] * 4, "image_path": ["a.jpg", "b.jpg", "a.jpg", "b.jpg"],
        "prediction": ["Yes", "Yes", "No", "Yes"],
    })
    full = pd.concat([_frame().query("category != 'color'"), frame.assign(index=frame["index"] + 1000)])
    result = MME.score(full)
    # a.jpg: both right -> 1; b.jpg: second wrong -> 0. acc = 3/4, acc+ = 1/2.
    assert result.metrics["color"] == 75.0 + 50.0


def test_third_question_counts_for_acc_only():
    frame = _frame()
    extra = frame.iloc[[0]].assign(index=9999, prediction="Maybe")  # a wrong third question
    result = MME.score(pd.concat([frame, extra]))
    existence = [0, 0, 1, 0, 1, 0, 0]
    assert result.metrics["existence"] == float(np.mean(existence)) * 100 + 0.0
    _assert_forms_match(result)


def test_extraction_rules_decide_the_score():
    frame = _frame()
    first = frame.index[0]  # existence/0.jpg, answer Yes, predicted wrong
    for prediction, extracted in [("**Yes**", "Unknown"), ("Yes and no", "Unknown"),
                                  ("N/A", "Unknown"), ("yes" + "." * 33, "Unknown"), ("(Yes)", "Yes")]:
        changed = roundtrip(frame.assign(prediction=[prediction] + frame["prediction"].tolist()[1:]))
        row = MME.score(changed).samples.iloc[0]
        assert row["extracted"] == extracted, prediction
        assert row["score"] == (1.0 if extracted == "Yes" else 0.0)
    assert frame.loc[first, "answer"] == "Yes"


def test_answer_comparison_is_case_sensitive():
    frame = _frame()
    lowered = frame.assign(answer=frame["answer"].str.lower())
    result = MME.score(lowered)
    assert result.samples["score"].sum() == 0.0


def test_partial_file_names_the_missing_subtasks():
    frame = _frame()
    partial = frame[~frame["category"].isin(["OCR", "code_reasoning"])]
    with pytest.raises(ScoringInputError, match="lacks subtask\\(s\\) OCR, code_reasoning"):
        MME.score(partial)


def test_single_question_image_names_it():
    frame = _frame()
    single = frame.drop(index=frame.index[1])  # the second question of existence/0.jpg
    with pytest.raises(ScoringInputError, match="'existence/0.jpg' \\(category 'existence'\\) has a single question \\(index 0\\)"):
        MME.score(single)


def test_other_bad_input():
    frame = _frame()
    with pytest.raises(ScoringInputError, match="lacks column\\(s\\) 'image_path'"):
        MME.score(frame.drop(columns=["image_path"]))
    shared = frame.copy()
    shared.loc[shared["category"] == "count", "image_path"] = shared.loc[
        shared["category"] == "existence", "image_path"].to_numpy()
    with pytest.raises(ScoringInputError, match="appears in categories"):
        MME.score(shared)
    with pytest.raises(ScoringInputError, match="not in the benchmark TSV"):
        MME.score(frame, frame.iloc[:10])


def test_dataset_prompt_is_the_question_verbatim():
    question = "Is there a dog in this image? Please answer yes or no."
    assert MME.dataset_prompt({"question": question}) == question


def test_an_empty_question_cell_is_bad_input_naming_the_row():
    """An input error (exit status 2 with one line), not a crash of the run."""
    with pytest.raises(ScoringInputError, match=r"MME: row with index 7, column 'question': nan is not text"):
        MME.dataset_prompt({"index": 7, "question": float("nan")})

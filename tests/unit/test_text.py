"""VLMEvalKit's answer matching (lavender_checks.text), example by example from the
behaviour spec, sections 3-6."""

from __future__ import annotations

import ast
import re

import pytest

from lavender_checks import text
from lavender_checks.text import (
    NonStringAnswerError,
    anls_distance,
    anls_from_distance,
    anls_score,
    answer_candidates,
    can_infer,
    can_infer_option,
    can_infer_text,
    chartqa_answers,
    docvqa_answers,
    parse_list_literal,
    process_punctuation,
    relaxed_accuracy,
    relaxed_correctness,
    to_float,
    yes_no_extraction,
)

# --------------------------------------------------------------------------------------
# List literals in answer cells: parsed, never executed
# --------------------------------------------------------------------------------------


def test_list_literal_of_strings():
    assert parse_list_literal("['1/8/93', 'January 8, 1993']") == ["1/8/93", "January 8, 1993"]
    assert answer_candidates("['1/8/93', 'January 8, 1993']") == ["1/8/93", "January 8, 1993"]


def test_scalar_cell_is_one_answer():
    assert parse_list_literal("January 8, 1993") is None
    assert answer_candidates("January 8, 1993") == ["January 8, 1993"]


def test_names_in_brackets_are_not_a_list():
    # eval("[Yes, No]") is a NameError in VLMEvalKit, so the cell stays one answer.
    assert answer_candidates("[Yes, No]") == ["[Yes, No]"]
    assert chartqa_answers("[Yes, No]") == ["[Yes, No]"]


def test_code_in_a_cell_is_plain_text_and_never_runs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("os.system", lambda *a, **k: calls.append(a) or 0)
    marker = tmp_path / "ran"
    for cell in ("__import__('os').system('x')",
                 f"[__import__('pathlib').Path({str(marker)!r}).touch()]",
                 "[open('/etc/passwd').read()]"):
        assert answer_candidates(cell) == [cell]
    assert calls == []
    assert not marker.exists()


def test_malformed_or_non_list_literals_are_one_answer():
    assert answer_candidates("['a', 'b'") == ["['a', 'b'"]
    assert answer_candidates("('a', 'b')") == ["('a', 'b')"]  # a tuple is no list
    assert answer_candidates("[" * 5000 + "]" * 5000) == ["[" * 5000 + "]" * 5000]  # too deep
    assert answer_candidates("  ['a']") == ["a"]  # eval and literal_eval both allow leading spaces


def test_docvqa_refuses_non_string_elements():
    with pytest.raises(NonStringAnswerError, match="element 1 is int"):
        docvqa_answers("['1993', 1994]")
    with pytest.raises(NonStringAnswerError, match="empty list"):
        docvqa_answers("[]")
    assert docvqa_answers("['a', 'b']") == ["a", "b"]


def test_chartqa_stringifies_list_elements():
    assert chartqa_answers("[2010, 2011]") == ["2010", "2011"]
    assert chartqa_answers("[1.50, True, None]") == ["1.5", "True", "None"]
    assert chartqa_answers("12") == ["12"]


# --------------------------------------------------------------------------------------
# ANLS (section 3)
# --------------------------------------------------------------------------------------


def test_anls_whitespace_padding_inflates_the_length():
    # d('abcd', 'abxy') = 2 but L = len('   abxy   ') = 10: 0.8 rather than 0.5.
    assert anls_distance("abcd", "   abxy   ") == pytest.approx(0.2, abs=0)
    assert anls_score(["abcd"], "   abxy   ") == 0.8
    assert anls_score(["abcd"], "abxy") == 0.5


def test_anls_uses_upper_cased_raw_lengths():
    # 'ß'.upper() == 'SS': L = 3, not 2.
    assert anls_distance("ßx", "ßy") == 1 / 3
    # 'ﬁ'.upper() == 'FI': d('ﬁle', 'file') = 2 over L = 4 gives exactly 0.5, which is kept.
    assert anls_distance("ﬁle", "file") == 0.5
    assert anls_score(["ﬁle"], "file") == 0.5


def test_anls_lower_can_lengthen_and_distance_can_exceed_one():
    # 'İ'.lower() is two code points ('i' + combining dot) while 'İ'.upper() is one.
    assert len("İ".lower()) == 2
    assert anls_distance("İİ", "") == 2.0
    assert anls_score(["İİ"], "") == 0.0
    assert anls_distance("İ", "i") == 1.0


def test_anls_threshold_is_strict():
    assert anls_from_distance(0.5) == 0.5  # exactly 0.5 is kept
    assert anls_from_distance(0.5000000000000001) == 0.0
    assert anls_score(["ab"], "ax") == 0.5


def test_anls_normalises_case_and_inner_whitespace():
    assert anls_distance("New  York", "new york") == 0.0
    assert anls_distance("a\u00a0b", "a b") == 0.0  # any Unicode whitespace run
    assert anls_distance("", "") == 0.0  # L = 0 counts as distance 0


def test_anls_takes_the_best_answer():
    assert anls_score(["1/8/93", "January 8, 1993"], "January 8, 1993") == 1.0


def test_anls_prediction_na_scores_against_nan():
    # Through the xlsx round trip 'N/A' is read back as NaN, i.e. the string 'nan'.
    assert anls_score(["N/A"], "nan") == 0.0
    assert anls_score(["N/A"], "N/A") == 1.0


# --------------------------------------------------------------------------------------
# Relaxed correctness (section 4): the edge-case table row by row
# --------------------------------------------------------------------------------------

EDGE_CASES = [
    ("10", "10.5", True),      # exactly 5%
    ("1", "1.05", False),      # float64 makes 5% slightly larger than 0.05
    ("0", "0.0", False),       # zero target: string compare
    ("2015", "2016", True),    # years compared numerically
    ("57", "57%", False),      # % divides by 100
    ("0.5", "50%", True),
    ("12", "12.", True),
    ("Yes", "Yes.", False),
    ("1000", "1,000", False),  # comma does not parse
    ("12", "$12", False),      # currency does not parse
    ("12", "1_2", True),       # underscore parses
    ("12", "１２", True),      # full-width digits parse
    ("nan", "nan", False),     # NaN never compares equal
]


@pytest.mark.parametrize(("answer", "prediction", "expected"), EDGE_CASES)
def test_relaxed_correctness_edge_cases(answer, prediction, expected):
    assert relaxed_correctness(answer, prediction) is expected


def test_relaxed_na_through_the_round_trip():
    # The table's last row: 'N/A' vs 'N/A' is 'nan' vs 'nan' after the xlsx.
    assert relaxed_accuracy(["nan"], "nan") == 0.0
    assert relaxed_accuracy(["N/A"], "N/A") == 1.0  # raw strings would have matched


def test_relaxed_argument_order_is_the_fixed_one():
    # |95.1 - 100| / 100 = 0.049 passes; the pre-2025-09-01 order divided by 95.1 (0.0515).
    assert relaxed_correctness("100", "95.1") is True


def test_to_float_python_semantics():
    assert to_float("12 %") == 0.12
    assert to_float("12%%") == 0.12
    assert to_float(" 12 ") == 12.0
    assert to_float("١٢") == 12.0
    assert to_float("Infinity") == float("inf")
    assert to_float("1,000") is None
    assert to_float("$12") is None


def test_relaxed_accuracy_strips_prediction_but_not_target():
    assert relaxed_accuracy(["Yes"], "  yes\n") == 1.0
    assert relaxed_accuracy([" Yes"], "Yes") == 0.0
    assert relaxed_accuracy(["3", "4"], "4") == 1.0


def test_relaxed_accuracy_does_not_extract_final_answer():
    assert relaxed_accuracy(["12"], "Step 1: read the bars. FINAL ANSWER: 12") == 0.0


# --------------------------------------------------------------------------------------
# MMBench can_infer (section 5.2)
# --------------------------------------------------------------------------------------

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.fixture(autouse=True)
def _no_verbose(monkeypatch):
    monkeypatch.delenv("VERBOSE", raising=False)


@pytest.mark.parametrize("prediction", ["B", "(B)", "B. dog", "**B**", "Option B", "Answer: B",
                                        "B) dog", "The answer is B"])
def test_can_infer_letter_forms(prediction):
    assert can_infer(prediction, dict(CHOICES)) == "B"


@pytest.mark.parametrize(("prediction", "expected"), [
    ("dog", "B"),
    ("b", False),
    ("A or B", False),
    ("A nice picture.", "A"),  # the article counts as option A
    ("Cannot determine the answer", "Z"),
    ("B. The dog is clearly visible in the picture here", False),
    ("A close look at the picture suggests C", False),
    ("The answer is definitely not A or C", "D"),  # regex without word boundary
])
def test_can_infer_spec_examples(prediction, expected):
    assert can_infer(prediction, dict(CHOICES)) == expected


def test_can_infer_regex_rescues_verbose_answers():
    long = "The correct answer is B. because the animal in the picture barks and has four legs"
    assert can_infer(long, dict(CHOICES)) == "B"
    assert can_infer("the answer is a cat, clearly", dict(CHOICES)) == "A"  # case-insensitive
    assert can_infer("The answer is **C**", dict(CHOICES)) == "C"


def test_can_infer_regex_letter_must_be_a_choice():
    three = {"A": "cat", "B": "dog", "C": "bird"}
    assert can_infer("The answer is definitely not A or C", three) is False


def test_can_infer_letter_must_be_among_last_four_tokens():
    assert can_infer("B is right and the rest are wrong", dict(CHOICES)) is False
    assert can_infer("I pick B", dict(CHOICES)) == "B"
    assert can_infer("my pick here is B", dict(CHOICES)) == "B"
    assert can_infer("B my pick is here", dict(CHOICES)) is False  # index 0, 5 tokens
    assert can_infer("B my pick here", dict(CHOICES)) == "B"  # index 0, 4 tokens


def test_can_infer_separators():
    assert can_infer("[B]", dict(CHOICES)) == "B"
    assert can_infer("{B}!", dict(CHOICES)) == "B"
    assert can_infer("'B'", dict(CHOICES)) is False  # quotes are no separators
    assert can_infer("B/C", dict(CHOICES)) is False


def test_can_infer_refusals_and_failures():
    for phrase in ("Sorry, I can't help with images of people yet.",
                   "I can't process this file.",
                   "I'm sorry, but without the image provided, I cannot answer.",
                   "Cannot determine the answer"):
        assert can_infer(phrase, dict(CHOICES)) == "Z"
    assert can_infer("Z", dict(CHOICES)) == "Z"
    assert can_infer("Z A", dict(CHOICES)) == "A"  # a choice letter beats Z
    assert can_infer_option("Failed to obtain answer via API. B", dict(CHOICES)) is False
    # ... and the text step still runs after it
    yard = {"A": "the cat on the mat", "B": "the dog in the yard"}
    assert can_infer("Failed to obtain answer via API: the dog in the yard", yard) == "B"


def test_can_infer_verbose_quirk(monkeypatch):
    prediction = "I think it is A"
    assert can_infer(prediction, dict(CHOICES)) == "A"
    for value in ("1", "0", "yes"):  # any non-empty value, "0" included
        monkeypatch.setenv("VERBOSE", value)
        assert can_infer(prediction, dict(CHOICES)) is False
    monkeypatch.setenv("VERBOSE", "")
    assert can_infer(prediction, dict(CHOICES)) == "A"
    monkeypatch.setenv("VERBOSE", "1")
    assert can_infer("A nice picture.", dict(CHOICES)) == "A"  # only 3 tokens
    assert can_infer("I think it is B", dict(CHOICES)) == "B"  # no 'A' token
    assert can_infer("I think it is A", dict(CHOICES), verbose=False) == "A"


def test_can_infer_text_step():
    assert can_infer_text("a big dog", dict(CHOICES)) == "B"
    assert can_infer_text("a dog and a cat", dict(CHOICES)) is False  # two candidates
    assert can_infer_text("DOG", dict(CHOICES)) == "B"
    limit = 2 * sum(len(v) for v in CHOICES.values())  # 28
    assert can_infer_text("dog".ljust(limit), dict(CHOICES)) == "B"
    assert can_infer_text("dog".ljust(limit + 1), dict(CHOICES)) is False
    assert can_infer_text("3.0", {"A": 3.0, "B": 4.0}) == "A"  # option texts are str()-ed


def test_can_infer_only_counts_present_choices():
    two = {"A": "yes", "B": "no"}
    assert can_infer("C", two) is False
    assert can_infer("B or C", two) == "B"  # C is no choice: count is 1


# --------------------------------------------------------------------------------------
# MME Yes/No extraction (section 6)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prediction", "expected"), [
    ("Yes.", "Yes"), ("yes, it is", "Yes"), ("No, it is not.", "No"), ('"Yes"', "Yes"),
    ("Yes!", "Yes"), ("(Yes)", "Yes"), ("[No]", "No"), ("The answer is no", "No"),
    ("yes-it is", "Yes"), ("1,000 no", "No"), ("No<|eot_id|>", "No"),
])
def test_yes_no_recognised(prediction, expected):
    assert yes_no_extraction(prediction) == expected


@pytest.mark.parametrize("prediction", ["Yes:", "**Yes**", "'Yes'", "Y", "Yep", "Nope", "Not",
                                        "Yes and no", "yes/no", "", "nan"])
def test_yes_no_unknown(prediction):
    assert yes_no_extraction(prediction) == "Unknown"


def test_period_pass_is_capped_at_32():
    assert re.UNICODE == 32  # VLMEvalKit passes it as re.sub's count
    assert yes_no_extraction("yes" + "." * 32) == "Yes"
    assert yes_no_extraction("yes" + "." * 33) == "Unknown"
    assert process_punctuation("a." * 40).count(".") == 8


def test_period_pattern_ignores_what_precedes():
    # VLMEvalKit's "(?!<=\d)" is a lookahead, not a lookbehind: a period after a digit is
    # removed too, and such periods use up the cap of 32.
    assert process_punctuation("3. 4.5") == "3 4.5"
    numbered = " ".join(f"{i}." for i in range(1, 33)) + " yes."
    assert yes_no_extraction(numbered) == "Unknown"
    assert yes_no_extraction(" ".join(f"{i}." for i in range(1, 32)) + " yes.") == "Yes"


def test_punctuation_rule_reads_the_original_text():
    # '-' is next to a space somewhere, so every '-' is deleted (not spaced): 'yes-no' joins.
    assert process_punctuation("yes-no - ok") == "yesno  ok"
    assert yes_no_extraction("yes-no - ok") == "Unknown"
    # Without a space next to it, '-' becomes a space.
    assert process_punctuation("yes-no") == "yes no"
    # digit-comma-digit anywhere deletes every punctuation mark.
    assert process_punctuation("1,000 (no)") == "1000 no"


def test_not_punctuation():
    for mark in ":*'|#%$&~":
        assert mark in process_punctuation(f"yes{mark}")


def test_module_never_calls_eval_or_exec():
    with open(text.__file__, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    called = {node.func.id for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}

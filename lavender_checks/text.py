"""VLMEvalKit's answer matching, as pure functions of strings.

Nothing here reads files, pandas frames or models. Each function reproduces one piece of
VLMEvalKit's scoring (reference revision e8e78f05, 2026-08-18) *including its quirks*;
every quirk kept on purpose is marked "deliberate" below. Section numbers refer to the
VLMEvalKit behaviour spec (``docs/vlmevalkit-behaviour.md``).

* answer cells that hold a Python list literal (DocVQA, ChartQA), parsed **without**
  executing anything (VLMEvalKit calls ``eval()`` on them; we never do);
* ANLS distance (DocVQA, section 3);
* relaxed correctness (ChartQA, section 4);
* ``can_infer`` (MMBench exact matching, section 5.2);
* Yes/No extraction (MME, section 6).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping, Sequence

from rapidfuzz.distance import Levenshtein

__all__ = [
    "NonStringAnswerError", "parse_list_literal", "answer_candidates", "docvqa_answers",
    "chartqa_answers", "anls_distance", "anls_from_distance", "anls_score", "to_float",
    "relaxed_correctness", "relaxed_accuracy", "can_infer_option", "can_infer_text",
    "can_infer", "process_punctuation", "yes_no_extraction",
]


# --------------------------------------------------------------------------------------
# Answer cells holding a list literal
# --------------------------------------------------------------------------------------

class NonStringAnswerError(ValueError):
    """An answer list VLMEvalKit's scorer crashes on: a non-string element (DocVQA) or an
    empty list (both)."""


def parse_list_literal(cell: str) -> list | None:
    """The list an answer cell spells as a Python literal, or None when it is no list.

    VLMEvalKit decides with ``isinstance(eval(cell), list)`` and then uses ``eval(cell)``.
    We must never execute data, so this uses :func:`ast.literal_eval`, which only reads
    literals: ``"['1/8/93', 'January 8, 1993']"`` and ``"[2010, 2011]"`` are lists, while
    ``"[Yes, No]"`` (a NameError for ``eval``) and code such as
    ``"__import__('os').system('x')"`` are not, so they stay one plain-text answer.

    Known divergence, accepted on purpose: a cell that only *computes* a list
    (``"list('ab')"``, ``"['a'] + ['b']"``) would be a list for ``eval`` and is one
    answer here. On plain list literals, the form the answer cells use, both agree.
    """
    if "[" not in cell:  # every list literal has a bracket; skips the parser for most cells
        return None
    try:
        value = ast.literal_eval(cell)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        # VLMEvalKit's istype() catches every exception of eval() and answers "not a list".
        return None
    return value if isinstance(value, list) else None


def answer_candidates(cell: str) -> list:
    """VLMEvalKit's ``process_line`` answers: the list elements, or ``[cell]``."""
    parsed = parse_list_literal(cell)
    return [cell] if parsed is None else parsed


def docvqa_answers(cell: str) -> list[str]:
    """DocVQA answers of a cell; a non-string list element raises NonStringAnswerError.

    VLMEvalKit's ANLS calls ``.strip()`` on every answer, so a list such as ``"[1993]"``
    crashes its scorer. We refuse it with a clear error instead of guessing a number.
    An empty list crashes VLMEvalKit too (``np.min([])``) and is refused the same way.
    """
    answers = answer_candidates(cell)
    for position, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise NonStringAnswerError(
                f"answer list element {position} is {type(answer).__name__} {answer!r}, not a "
                f"string; VLMEvalKit's DocVQA scorer crashes on such a cell ({cell!r})"
            )
    if not answers:
        raise NonStringAnswerError(
            f"answer cell {cell!r} is an empty list; VLMEvalKit's scorer crashes on it")
    return answers


def chartqa_answers(cell: str) -> list[str]:
    """ChartQA answers of a cell: list elements are ``str()``-ed, as VLMEvalKit's
    ``relaxed_correctness`` does (``"[2010, 2011]"`` gives ``['2010', '2011']``)."""
    answers = [str(answer) for answer in answer_candidates(cell)]
    if not answers:
        raise NonStringAnswerError(
            f"answer cell {cell!r} is an empty list; VLMEvalKit's scorer crashes on it")
    return answers


# --------------------------------------------------------------------------------------
# DocVQA: ANLS (section 3)
# --------------------------------------------------------------------------------------

def anls_distance(groundtruth: str, prediction: str) -> float:
    """VLMEvalKit's ``anls_compute``: the normalised edit distance of one answer.

    The distance is computed on trimmed, lower-cased, whitespace-collapsed strings, but
    it is divided by the **raw** strings' upper-cased lengths (deliberate: VLMEvalKit
    does so, so padding with spaces raises the score, and ``ß``/``ﬁ``/``İ`` change the
    length). Levenshtein with unit costs over code points.
    """
    gt = " ".join(groundtruth.strip().lower().split())
    det = " ".join(prediction.strip().lower().split())
    dist = Levenshtein.distance(gt, det)
    length = max(len(groundtruth.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else float(dist) / float(length)


def anls_from_distance(distance: float, threshold: float = 0.5) -> float:
    """VLMEvalKit's ``hit_calculate`` for DocVQA: ``1 - distance``, set to 0.0 when
    strictly below ``threshold`` (exactly 0.5 is kept)."""
    score = 1 - distance
    return 0.0 if score < threshold else score


def anls_score(answers: Sequence[str], prediction: str, threshold: float = 0.5) -> float:
    """Per-question ANLS over the answers: ``anls_from_distance(min distance)``. The
    prediction is not stripped here (deliberate)."""
    return anls_from_distance(min(anls_distance(a, prediction) for a in answers), threshold)


# --------------------------------------------------------------------------------------
# ChartQA: relaxed correctness (section 4)
# --------------------------------------------------------------------------------------

def to_float(text: str) -> float | None:
    """VLMEvalKit's ``_to_float``: Python ``float()``, with every trailing ``%`` removed and
    the value divided by 100. Deliberately Python's parser: ``'1_2'``, ``'１２'``, ``' 12 '``,
    ``'inf'`` and ``'nan'`` parse, ``'1,000'`` and ``'$12'`` do not."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """VLMEvalKit's ``relaxed_correctness`` (argument order fixed on 2025-09-01).

    Numeric when the prediction parses and the target parses to a truthy value (a zero
    target falls back to string comparison; NaN is truthy and never matches): the
    relative change ``|p - t| / |t|`` in float64 must be ``<= 0.05`` (so ``'1'`` vs
    ``'1.05'`` fails by float rounding, deliberately). Otherwise a case-insensitive
    string compare; the target is not stripped.
    """
    prediction = str(prediction)
    target = str(target)
    prediction_float = to_float(prediction)
    target_float = to_float(target)
    if prediction_float is not None and target_float:
        relative_change = abs(prediction_float - target_float) / abs(target_float)
        return relative_change <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(answers: Sequence[str], prediction: str) -> float:
    """Per-question ChartQA score: 1.0 if any answer is relaxed-correct for the
    whitespace-stripped prediction, else 0.0. The whole output is compared: nothing
    extracts a "FINAL ANSWER:" (deliberate, as VLMEvalKit)."""
    pred = prediction.strip()
    return 1.0 if any(relaxed_correctness(answer, pred) for answer in answers) else 0.0


# --------------------------------------------------------------------------------------
# MMBench: can_infer (section 5.2, revision of 2026-06-17 and later)
# --------------------------------------------------------------------------------------

_REJECT_PHRASES = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_SEPARATORS = ".()[],:;!*#{}"
_SEPARATOR_TABLE = str.maketrans({c: " " for c in _OPTION_SEPARATORS})
# Added 2026-06-17. Case-insensitive and without a word boundary (deliberate): "the answer
# is a cat" gives A and "The answer is definitely ..." gives D.
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _verbose_from_env() -> bool:
    # VLMEvalKit: os.environ.get('VERBOSE', 0) used as a truth value, so any non-empty
    # string, "0" included, switches the quirk on.
    return bool(os.environ.get("VERBOSE", ""))


def can_infer_option(answer: str, choices: Mapping[str, object], *, verbose: bool | None = None):
    """Step O of ``can_infer``: a letter, ``'Z'``, or False.

    ``choices`` maps the option letters of the row (non-NaN A..Z columns) to their text.
    ``verbose=None`` reads the ``VERBOSE`` environment variable like VLMEvalKit.
    """
    if verbose is None:
        verbose = _verbose_from_env()
    if "Failed to obtain answer via API" in answer:
        return False
    for phrase in _REJECT_PHRASES:
        if phrase in answer:
            return "Z"
    tokens = answer.translate(_SEPARATOR_TABLE).split()
    count = sum(1 for letter in choices if letter in tokens)
    if count == 1:
        for letter in choices:
            # Deliberate: with VERBOSE set, an answer holding the token "A" and more than
            # three tokens is refused before any letter is looked at.
            if verbose and "A" in tokens and len(tokens) > 3:
                return False
            # The single letter counts only among the last 4 tokens (since 2025-08-04).
            if letter in tokens and tokens.index(letter) > len(tokens) - 5:
                return letter
    elif count == 0 and "Z" in tokens:
        return "Z"
    match = _ANSWER_IS.search(answer)
    if match:
        letter = match.group(1).upper()
        if letter in choices:
            return letter
    return False


def can_infer_text(answer: str, choices: Mapping[str, object]):
    """Step T of ``can_infer``: the one option whose lower-cased text occurs in the
    lower-cased answer, or False (also False when the answer is longer than twice the
    options' total length, a rule since 2025-08-04)."""
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in choices.values()):
        return False
    candidates = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return candidates[0] if len(candidates) == 1 else False


def can_infer(answer, choices: Mapping[str, object], *, verbose: bool | None = None):
    """VLMEvalKit's ``can_infer``: option match first, text match when it is falsy.

    Returns the letter, ``'Z'`` (a refusal; counts as a wrong answer), or False.
    """
    answer = str(answer)
    option = can_infer_option(answer, choices, verbose=verbose)
    return option if option else can_infer_text(answer, choices)


# --------------------------------------------------------------------------------------
# MME: Yes/No extraction (section 6)
# --------------------------------------------------------------------------------------

_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-',
                '>', '<', '@', '`', ',', '?', '!')
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# VLMEvalKit's pattern, typo included (deliberate): "(?!<=\d)" is a *lookahead* for the
# text "<=digit", which never matches before a ".", so the pattern removes every "." that
# is not followed by a digit, whatever precedes it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# VLMEvalKit passes re.UNICODE where re.sub expects `count`; re.UNICODE == 32, so at most
# 32 periods are removed (deliberate).
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """VLMEvalKit's ``process_punctuation``.

    For each symbol, the *original* text decides: if the symbol is followed or preceded
    by a space somewhere, or the text holds digit-comma-digit anywhere, every occurrence
    is deleted; otherwise every occurrence becomes a space. Then at most 32 periods not
    followed by a digit are deleted.
    """
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if p not in out:
            continue  # nothing to replace; same result, faster
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def yes_no_extraction(output) -> str:
    """VLMEvalKit's ``YOrN_Extraction``: 'Yes', 'No' or 'Unknown'.

    ``:``, ``*`` and ``'`` are no punctuation, so ``Yes:``, ``**Yes**`` and ``'Yes'`` are
    Unknown; an answer holding both words is Unknown (deliberate, as VLMEvalKit).
    """
    words = process_punctuation(str(output).lower()).split()
    has_yes = "yes" in words
    has_no = "no" in words
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    return "Unknown"

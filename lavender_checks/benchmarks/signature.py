"""Does a file belong to a benchmark? Each benchmark's ``[<name>.signature]`` in
``benchmarks.toml`` says what its files always show (columns, the values of split / category /
answer columns, list-literal answers); a file scored as another benchmark is refused with the
benchmark it looks like, instead of printing that benchmark's metrics over the wrong rows.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from lavender_checks.benchmarks import benchmark_names, signature_of
from lavender_checks.benchmarks.vlmeval_common import ScoringInputError

__all__ = ["SignatureMismatch", "check_signature", "looks_like", "mismatches", "check_questions"]

# DocVQA: an answer cell that VLMEvalKit reads as a list; most of a real file's cells are.
_LIST_LITERAL = re.compile(r"^\s*\[.*\]\s*$", re.DOTALL)
_LISTS_SHARE = 0.5


class SignatureMismatch(ScoringInputError):
    """A file whose columns or values are not those of the benchmark it was given as."""


def _present(values: pd.Series) -> pd.Series:
    return values[values.notna()].map(str)


def mismatches(frame: pd.DataFrame, benchmark: str) -> list[str]:
    """Why ``frame`` is not a file of ``benchmark`` (an empty list: it may be one)."""
    sig = signature_of(benchmark)
    problems = []
    absent = [c for c in sig.get("columns", []) if c not in frame.columns]
    if absent:
        problems.append(f"it lacks column(s) {', '.join(map(repr, absent))}")
    for column, allowed in sig.get("values", {}).items():
        if column not in frame.columns:
            continue
        foreign = sorted(set(_present(frame[column])) - set(allowed))
        if foreign:
            shown = ", ".join(map(repr, foreign[:5])) + (" ..." if len(foreign) > 5 else "")
            problems.append(f"column {column!r} has {shown}, none of {benchmark}'s "
                            f"({', '.join(allowed[:6])}{', ...' if len(allowed) > 6 else ''})")
    if sig.get("answers_are_lists") and "answer" in frame.columns:
        answers = _present(frame["answer"])
        if len(answers) and answers.map(lambda a: bool(_LIST_LITERAL.match(a))).mean() < _LISTS_SHARE:
            problems.append(f"its answers are not lists of answers (e.g. {answers.iloc[0]!r})")
    return problems


def looks_like(frame: pd.DataFrame, exclude: str | None = None) -> list[str]:
    """The known benchmarks whose signature ``frame`` matches."""
    return [name for name in benchmark_names() if name != exclude and not mismatches(frame, name)]


def check_signature(frame: pd.DataFrame, benchmark: str, what: str) -> None:
    """Refuse ``frame`` (``what`` names it: the file's path) unless it may be ``benchmark``'s."""
    problems = mismatches(frame, benchmark)
    if not problems:
        return
    others = looks_like(frame, exclude=benchmark)
    guess = (f"it looks like {' or '.join(others)}" if others
             else "it looks like none of " + ", ".join(benchmark_names()))
    raise SignatureMismatch(f"{what} is not a {benchmark} file: {'; '.join(problems)}; {guess}")


def _text(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return str(value).strip()


def check_questions(predictions: pd.DataFrame, meta: pd.DataFrame, what: str, meta_what: str) -> None:
    """Every predicted row's question must be its TSV row's (same index), as VLMEvalKit copies
    it: a prediction file of an edited TSV, or of another benchmark, is refused."""
    if "question" not in predictions.columns or "question" not in meta.columns:
        return
    by_index = dict(zip(meta["index"].map(str), meta["question"].map(_text)))
    differ = [(i, q) for i, q in zip(predictions["index"].map(str), predictions["question"].map(_text))
              if i in by_index and by_index[i] != q]
    if differ:
        index, question = differ[0]
        raise SignatureMismatch(
            f"{what}: {len(differ)} row(s) whose question is not the one of {meta_what} at the "
            f"same index, e.g. index {index}: {question!r} in the file, {by_index[index]!r} in the TSV")

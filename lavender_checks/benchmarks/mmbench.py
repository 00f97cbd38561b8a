"""MMBench_DEV_EN: VLMEvalKit's circular evaluation with exact matching (spec section 5).

No LLM judge is ever used: without one VLMEvalKit falls back to exact matching
(section 1.5), and that is what the reference numbers were scored with.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from lavender_checks.benchmarks.base import Benchmark, Ratio, ScoreResult
from lavender_checks.benchmarks.vlmeval_common import (
    ScoringInputError,
    check_meta,
    integer_indices,
    percent_mean,
    require_columns,
    require_rows,
    rules,
    string_column,
    vlmeval_str,
)
from lavender_checks.text import can_infer

CIRCULAR_STRIDE = 1_000_000  # circular copies have index main + k * 1e6
LETTERS = tuple(string.ascii_uppercase)

# VLMEvalKit's group logs (the `log` column of its _result file), kept for review.
LOG_SUCCESS = "Succeed During Pre-fetching"
LOG_NO_JUDGE = "Failed in Prefetch, no GPT-based answer matching under `exact_matching` policy."


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _vlmeval_columns(frame: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """VLMEvalKit lower-cases every column name except single capital letters."""
    renamed = {c: (c if c in LETTERS else str(c).lower()) for c in frame.columns}
    if len(set(renamed.values())) != len(renamed):
        raise ScoringInputError(
            f"{benchmark}: column names clash once lower-cased as VLMEvalKit does: "
            f"{', '.join(map(str, frame.columns))}")
    return frame.rename(columns=renamed)


class MMBench(Benchmark):
    """MMBench circular evaluation as VLMEvalKit's ``mcq_circular_eval`` + ``report_acc``.

    * rows are sorted by index; a group is a main row (index < 1e6) and every row whose
      ``index % 1e6`` equals it, main row first; rows whose main row is absent are ignored
      (deliberate, as VLMEvalKit), missing rotations make the group smaller;
    * each row's choices are its non-NaN A..Z cells, its GT its own ``answer`` (the meta
      answer when the benchmark TSV is given, which is what VLMEvalKit reads);
    * the group scores 1 only if every row extracts (``can_infer``) to its own GT; the
      first wrong extraction (``Z`` included) or any failed one scores 0;
    * metrics are VLMEvalKit's fractions (``numpy.mean`` of group hits) times 100:
      ``Overall``, the l2 abbreviations in sorted order of the raw l2 keys, then the
      categories sorted; a category absent from the file gets no key.
    """

    def dataset_prompt(self, row: Mapping[str, Any]) -> str:
        """ImageMCQDataset.build_prompt (spec section 2.1); the pieces live in
        ``vlmeval_rules.toml``."""
        template = rules(self.name)["prompt"]
        options = {c: row[c] for c in LETTERS if c in row and not pd.isna(row[c])}
        hint = row["hint"] if ("hint" in row and not pd.isna(row["hint"])) else None
        prompt = ""
        if hint is not None:
            prompt += template["hint"].format(hint=hint)
        prompt += template["question"].format(question=row["question"])
        if options:
            prompt += template["options_header"]
            for letter, text in options.items():
                prompt += template["option"].format(letter=letter, text=text)
            prompt += template["instruction"]
        return prompt

    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        name = self.name
        frame = _vlmeval_columns(predictions, name)
        require_columns(frame, ("index", "prediction", "answer"), name)
        require_rows(frame, name)
        unsorted = integer_indices(frame, name)
        order = np.argsort(unsorted, kind="stable")  # evaluate() sorts by index
        frame = frame.iloc[order].reset_index(drop=True)
        indices = unsorted[order]
        meta_positions = check_meta(indices, meta, name)

        predictions_text = [vlmeval_str(x) for x in frame["prediction"].tolist()]
        if meta_positions is not None and "answer" in meta.columns:
            # VLMEvalKit takes GT from the benchmark TSV, row by row.
            meta_answers = meta["answer"].tolist()
            truths = [meta_answers[meta_positions[int(i)]] for i in indices]
        else:
            truths = frame["answer"].tolist()
        letter_columns = [(c, frame[c].tolist()) for c in LETTERS if c in frame.columns]

        n = len(indices)
        extracted: list[str | None] = []
        for position in range(n):
            choices = {letter: cells[position] for letter, cells in letter_columns
                       if not _missing(cells[position])}
            result = can_infer(predictions_text[position], choices)
            extracted.append(result if result else None)

        group_of = indices % CIRCULAR_STRIDE
        is_main = indices == group_of
        main_positions = np.flatnonzero(is_main)
        if main_positions.size == 0:
            raise ScoringInputError(
                f"{name}: no main question (index < {CIRCULAR_STRIDE}) among the predictions; "
                "VLMEvalKit ignores circular copies whose main row is absent")
        main_set = set(int(g) for g in indices[main_positions])
        counted = np.array([int(g) in main_set for g in group_of])
        members: dict[int, list[int]] = {int(indices[p]): [] for p in main_positions}
        for position in range(n):
            if counted[position]:
                members[int(group_of[position])].append(position)

        hits = np.empty(len(main_positions), dtype=np.float64)
        logs: list[str] = []
        rotations = np.empty(len(main_positions), dtype=np.int64)
        for unit_position, main_position in enumerate(main_positions):
            rows = members[int(indices[main_position])]
            rotations[unit_position] = len(rows)
            extraction_failed = False
            for rolling, position in enumerate(rows):
                got, truth = extracted[position], truths[position]
                if got is not None and got != truth:
                    # The first wrong extraction ends the group (prefetch_circular_group).
                    hit, log = 0.0, (f"Failed in Prefetching Rolling {rolling}: Answer is "
                                     f"{truth}, Pre-fetched is {got}.")
                    break
                extraction_failed = extraction_failed or got is None
            else:
                # No wrong answer: a failed extraction still scores 0 without a judge.
                hit, log = (0.0, LOG_NO_JUDGE) if extraction_failed else (1.0, LOG_SUCCESS)
            hits[unit_position] = hit
            logs.append(log)

        options = np.array([sum(not _missing(cells[p]) for _, cells in letter_columns)
                            for p in main_positions])
        alone = int(((rotations == 1) & (options >= 2)).sum())
        noncomparable = ""
        if alone:
            # Without its rotated copies a question is scored once, as plain accuracy: a
            # model that guesses is right far more often than under CircularEval.
            noncomparable = (f"{alone} of {len(main_positions)} questions have no circular copies "
                             f"(index + k * {CIRCULAR_STRIDE:,}): CircularEval could not be applied "
                             "to them, so the metrics are not MMBench's reported circular accuracy")
        units, metrics, forms = self._aggregate(frame, indices[main_positions], main_positions,
                                                hits, rotations, logs)
        hit_of_group = dict(zip(units["unit"].tolist(), hits.tolist()))
        row_scores = np.array([1.0 if got is not None and got == truth else 0.0
                               for got, truth in zip(extracted, truths)])
        samples = pd.DataFrame({
            "index": indices,
            "unit": group_of,
            "main": is_main,
            "counted": counted,
            "score": row_scores,
            "hit": [hit_of_group.get(int(g), np.nan) if c else np.nan
                    for g, c in zip(group_of, counted)],
            "extracted": pd.Series(extracted, dtype=object),
            "answer": [vlmeval_str(t) for t in truths],
            "prediction": predictions_text,
        })
        for column in ("question", "split", "category", "l2-category"):
            if column in frame.columns:
                samples[column] = frame[column].to_numpy()
        return ScoreResult(benchmark=name, metrics=metrics, samples=samples, units=units, forms=forms,
                           population=None if meta is None else self.population(meta),
                           noncomparable=noncomparable)

    def _aggregate(self, frame: pd.DataFrame, groups: np.ndarray, main_positions: np.ndarray,
                   hits: np.ndarray, rotations: np.ndarray, logs: list[str]):
        """report_acc over the main rows (one per group)."""
        name = self.name
        main = frame.iloc[main_positions].reset_index(drop=True)
        if "split" in main.columns:
            splits = string_column(main, "split", name)
            if len(set(splits)) > 1:
                raise ScoringInputError(
                    f"{name}: the file mixes splits {sorted(set(splits))}; VLMEvalKit reports one "
                    "row per split and this scorer expects a single split")
        else:
            splits = ["none"] * len(main)  # VLMEvalKit's value without a split column

        ones = np.ones(len(hits), dtype=np.float64)
        metrics = {"Overall": percent_mean(hits)}
        forms = {"Overall": [Ratio(hits.copy(), ones, 100.0)]}
        units = pd.DataFrame({
            "unit": groups,
            "stratum": ["all"] * len(main),
            "correct": hits.copy(),
            "split": splits,
            "rotations": rotations,
            "log": logs,
        })
        abbreviations = rules(name).get("l2_abbreviations", {})
        for column in ("l2-category", "category"):
            if column not in main.columns:
                continue  # report_acc skips a grouping the file lacks
            values = string_column(main, column, name)
            value_array = np.asarray(values, dtype=object)
            for value in sorted(set(values)):
                key = abbreviations.get(value, value) if column == "l2-category" else value
                mask = value_array == value
                metrics[key] = percent_mean(hits[mask])
                forms[key] = [Ratio(hits * mask, mask.astype(np.float64), 100.0)]
            units["l2-category" if column == "l2-category" else "category"] = values
        if "category" in units.columns:
            units["stratum"] = units["category"]
        return units, metrics, forms


BENCHMARK_CLASS = MMBench

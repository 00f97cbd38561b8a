"""MME: VLMEvalKit's Yes/No extraction and acc / acc+ rating (spec section 6)."""

from __future__ import annotations

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
from lavender_checks.text import yes_no_extraction


def group_by_image(categories, image_paths) -> tuple[dict[str, dict[str, list[int]]], tuple[str, str, str] | None]:
    """Row positions per subtask and image, both in order of first appearance (an image under
    the subtask of its first row), and the first image found under a second subtask as
    (image, its first subtask, the other), or None: MME's rating holds each image in one
    subtask and takes its first two questions (acc+)."""
    stats: dict[str, dict[str, list[int]]] = {}
    category_of_image: dict[str, str] = {}
    shared = None
    for position, (category, image) in enumerate(zip(categories, image_paths)):
        owner = category_of_image.setdefault(image, category)
        if owner != category and shared is None:
            shared = (image, owner, category)
        stats.setdefault(owner, {}).setdefault(image, []).append(position)
    return stats, shared


class MME(Benchmark):
    """MME as VLMEvalKit's ``ImageYORNDataset.evaluate`` + ``MME_rating`` with exact matching.

    * ``extracted`` = Yes/No/Unknown of ``str(prediction)``; a question scores 1 when its
      ``answer`` equals it exactly (case-sensitive; Unknown is always wrong);
    * per subtask (``category``), in file order: ``acc`` = numpy.mean of all its question
      scores × 100, ``acc+`` = numpy.mean over its images (``image_path``) of the product
      of the image's *first two* scores × 100 (a third question is ignored for acc+,
      deliberately); the subtask score is ``acc + acc+`` (0-200);
    * ``perception`` / ``reasoning`` add the subtask scores from 0 in VLMEvalKit's fixed
      order (``vlmeval_rules.toml``); ``total`` = perception + reasoning is added last.

    VLMEvalKit crashes on a partial MME file (KeyError) and on an image with a single
    question (IndexError); both raise a ScoringInputError naming what is missing here.
    """

    def dataset_prompt(self, row: Mapping[str, Any]) -> str:
        """The ``question`` cell verbatim (it already ends with "Please answer yes or no.")."""
        question = row["question"]
        if not isinstance(question, str):  # an empty cell: bad data, not a crash (exit 2)
            raise ScoringInputError(f"{self.name}: row with index {row.get('index')}, column "
                                    f"'question': {question!r} is not text (an empty cell?)")
        return question

    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        name = self.name
        require_columns(predictions, ("index", "prediction", "answer", "category", "image_path"), name)
        require_rows(predictions, name)
        indices = integer_indices(predictions, name)
        check_meta(indices, meta, name)

        prediction_cells = [vlmeval_str(x) for x in predictions["prediction"].tolist()]
        answers = predictions["answer"].tolist()
        categories = string_column(predictions, "category", name)
        image_paths = string_column(predictions, "image_path", name)
        extracted = [yes_no_extraction(p) for p in prediction_cells]
        # Exact equality with the cell as read (a missing answer is NaN and never equal).
        scores = np.array([1.0 if isinstance(a, str) and a == e else 0.0
                           for a, e in zip(answers, extracted)])

        stats, shared = group_by_image(categories, image_paths)
        if shared is not None:
            image, owner, category = shared
            raise ScoringInputError(
                f"{name}: image_path {image!r} appears in categories {owner!r} and "
                f"{category!r}; each image must belong to one subtask")
        self._check_complete(stats, indices)

        metrics, forms, units = self._rate(stats, scores)
        samples = pd.DataFrame({
            "index": indices,
            "unit": image_paths,
            "category": categories,
            "score": scores,
            "extracted": extracted,
            "answer": [vlmeval_str(a) for a in answers],
            "prediction": prediction_cells,
        })
        if "question" in predictions.columns:  # for reviewers reading flips
            samples["question"] = predictions["question"].to_numpy()
        return ScoreResult(benchmark=name, metrics=metrics, samples=samples, units=units, forms=forms,
                           population=None if meta is None else self.population(meta))

    def _check_complete(self, stats: dict[str, dict[str, list[int]]], indices: np.ndarray) -> None:
        name = self.name
        table = rules(name)
        expected = list(table["perception"]) + list(table["reasoning"])
        missing = [c for c in expected if c not in stats]
        if missing:
            raise ScoringInputError(
                f"{name}: the file lacks subtask(s) {', '.join(missing)}; VLMEvalKit cannot "
                "rate a partial MME run (perception and reasoning need all 14 subtasks)")
        for category, images in stats.items():
            for image, positions in images.items():
                if len(positions) < 2:
                    raise ScoringInputError(
                        f"{name}: image_path {image!r} (category {category!r}) has a single "
                        f"question (index {indices[positions[0]]}); acc+ needs two questions "
                        "per image (VLMEvalKit crashes with IndexError)")

    def _rate(self, stats: dict[str, dict[str, list[int]]], scores: np.ndarray):
        """MME_rating, plus the per-image units and the ratio forms of every metric."""
        table = rules(self.name)
        unit_rows = []
        subtask_scores: dict[str, float] = {}
        for category, images in stats.items():
            values = [scores[p] for positions in images.values() for p in positions]
            pluses = [scores[positions[0]] * scores[positions[1]] for positions in images.values()]
            subtask_scores[category] = percent_mean(values) + percent_mean(pluses)
            for image, positions in images.items():
                unit_rows.append((image, category, float(np.sum(scores[positions])),
                                  float(len(positions)),
                                  float(scores[positions[0]] * scores[positions[1]])))
        units = pd.DataFrame(unit_rows, columns=["unit", "stratum", "question_sum", "questions",
                                                 "pair_product"])
        units["correct"] = units["question_sum"] / units["questions"]
        units["category"] = units["stratum"]

        question_sum = units["question_sum"].to_numpy()
        questions = units["questions"].to_numpy()
        product = units["pair_product"].to_numpy()
        strata = units["stratum"].to_numpy(dtype=object)
        category_forms: dict[str, list[Ratio]] = {}
        for category in stats:
            mask = (strata == category).astype(np.float64)
            category_forms[category] = [Ratio(question_sum * mask, questions * mask, 100.0),
                                        Ratio(product * mask, mask, 100.0)]

        metrics: dict[str, float] = {}
        forms: dict[str, list[Ratio]] = {}
        for super_category in ("perception", "reasoning"):
            total = 0  # VLMEvalKit starts from int 0 and adds in its fixed order
            terms: list[Ratio] = []
            for category in table[super_category]:
                total += subtask_scores[category]
                terms.extend(category_forms[category])
            metrics[super_category] = float(total)
            forms[super_category] = terms
        for category, value in subtask_scores.items():
            metrics[category] = value
            forms[category] = category_forms[category]
        metrics["total"] = metrics["perception"] + metrics["reasoning"]
        forms["total"] = forms["perception"] + forms["reasoning"]
        return metrics, forms, units


BENCHMARK_CLASS = MME

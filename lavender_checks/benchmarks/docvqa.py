"""DocVQA_VAL: VLMEvalKit's ANLS scorer (spec section 3).

The dataset prompt is not here: VLMEvalKit's ``llama_vision`` uses its own DocVQA prompt,
which the run profile carries as a template.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..text import NonStringAnswerError, anls_distance, anls_from_distance, docvqa_answers
from .base import Benchmark, ScoreResult
from .vlmeval_common import (ScoringInputError, check_meta, integer_indices, require_columns,
                             require_rows, row_label, vlmeval_str, vqa_aggregate)

ANLS_THRESHOLD = 0.5  # VLMEvalKit's hit_calculate default


class DocVQA(Benchmark):
    """ANLS exactly as VLMEvalKit computes it, quirks included (deliberate): the
    prediction is not stripped, lengths are the raw upper-cased ones, a score of exactly
    0.5 is kept, and the answer/prediction cells are ``str()``-ed after the xlsx round trip
    (so ``N/A`` reads as ``'nan'``)."""

    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        name = self.name
        require_columns(predictions, ("index", "answer", "prediction"), name)
        require_rows(predictions, name)
        indices = integer_indices(predictions, name)
        check_meta(indices, meta, name)

        answer_cells = [vlmeval_str(x) for x in predictions["answer"].tolist()]
        prediction_cells = [vlmeval_str(x) for x in predictions["prediction"].tolist()]
        n = len(indices)
        scores = np.empty(n, dtype=np.float64)
        distances = np.empty(n, dtype=np.float64)
        for position in range(n):
            try:
                answers = docvqa_answers(answer_cells[position])
            except NonStringAnswerError as err:
                raise ScoringInputError(
                    f"{name}: {row_label(position, indices[position])} column 'answer': {err}"
                ) from None
            prediction = prediction_cells[position]
            best = min(anls_distance(answer, prediction) for answer in answers)
            scores[position] = anls_from_distance(best, ANLS_THRESHOLD)
            distances[position] = best

        metrics, forms, strata = vqa_aggregate(name, predictions, scores)
        samples = pd.DataFrame({
            "index": indices,
            "unit": indices,
            "score": scores,
            "min_distance": distances,
            "answer": answer_cells,
            "prediction": prediction_cells,
        })
        for column in ("question", "split", "category"):
            if column in predictions.columns:
                samples[column] = predictions[column].to_numpy()
        units = pd.DataFrame({"unit": indices, "stratum": strata, "correct": scores.copy()})
        return ScoreResult(benchmark=name, metrics=metrics, samples=samples, units=units, forms=forms)


BENCHMARK_CLASS = DocVQA

"""DocVQA_VAL: VLMEvalKit's ANLS scorer (spec section 3).

The dataset prompt is not here: VLMEvalKit's ``llama_vision`` uses its own DocVQA prompt,
which the run profile carries as a template.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lavender_checks.benchmarks.base import Benchmark, ScoreResult
from lavender_checks.benchmarks.vlmeval_common import vqa_aggregate, vqa_inputs
from lavender_checks.text import anls_distance, anls_from_distance, docvqa_answers

ANLS_THRESHOLD = 0.5  # VLMEvalKit's hit_calculate default


class DocVQA(Benchmark):
    """ANLS exactly as VLMEvalKit computes it, quirks included (deliberate): the
    prediction is not stripped, lengths are the raw upper-cased ones, a score of exactly
    0.5 is kept, and the answer/prediction cells are ``str()``-ed after the xlsx round trip
    (so ``N/A`` reads as ``'nan'``)."""

    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        name = self.name
        indices, answer_cells, answer_lists, prediction_cells = vqa_inputs(
            predictions, name, ("index", "answer", "prediction"), meta, docvqa_answers)
        distances = np.array([min(anls_distance(answer, prediction) for answer in answers)
                              for answers, prediction in zip(answer_lists, prediction_cells)],
                             dtype=np.float64)
        scores = np.array([anls_from_distance(d, ANLS_THRESHOLD) for d in distances], dtype=np.float64)

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
        return ScoreResult(benchmark=name, metrics=metrics, samples=samples, units=units, forms=forms,
                           population=None if meta is None else self.population(meta))


BENCHMARK_CLASS = DocVQA

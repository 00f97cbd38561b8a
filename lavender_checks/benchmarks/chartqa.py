"""ChartQA_TEST: VLMEvalKit's relaxed-accuracy scorer (spec section 4).

The dataset prompt is not here: VLMEvalKit's ``llama_vision`` uses its own ChartQA
(chain-of-thought) prompt, which the run profile carries as a template.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..text import NonStringAnswerError, chartqa_answers, relaxed_accuracy
from .base import Benchmark, ScoreResult
from .vlmeval_common import (ScoringInputError, check_meta, integer_indices, require_columns,
                             require_rows, row_label, rules, vlmeval_str, vqa_aggregate)


class ChartQA(Benchmark):
    """Relaxed accuracy exactly as VLMEvalKit computes it (deliberate quirks: the whole
    stripped output is compared, nothing extracts a final answer; a zero target means a
    string compare; ``%`` divides by 100; list elements of the answer are ``str()``-ed).

    Metrics: one key per split (``test_human``, ``test_augmented`` first), then
    ``Overall``, the micro-average over all rows.
    """

    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        name = self.name
        require_columns(predictions, ("index", "answer", "prediction", "split"), name)
        require_rows(predictions, name)
        indices = integer_indices(predictions, name)
        check_meta(indices, meta, name)

        answer_cells = [vlmeval_str(x) for x in predictions["answer"].tolist()]
        prediction_cells = [vlmeval_str(x) for x in predictions["prediction"].tolist()]
        n = len(indices)
        scores = np.empty(n, dtype=np.float64)
        for position in range(n):
            try:
                answers = chartqa_answers(answer_cells[position])
            except NonStringAnswerError as err:
                raise ScoringInputError(
                    f"{name}: {row_label(position, indices[position])} column 'answer': {err}"
                ) from None
            scores[position] = relaxed_accuracy(answers, prediction_cells[position])

        split_order = rules(name).get("split_order", ())
        metrics, forms, strata = vqa_aggregate(name, predictions, scores, split_order)
        samples = pd.DataFrame({
            "index": indices,
            "unit": indices,
            "split": strata,
            "score": scores,
            "answer": answer_cells,
            "prediction": prediction_cells,
        })
        units = pd.DataFrame({"unit": indices, "stratum": strata, "correct": scores.copy()})
        if "question" in predictions.columns:  # for reviewers reading flips
            samples["question"] = predictions["question"].to_numpy()
        return ScoreResult(benchmark=name, metrics=metrics, samples=samples, units=units, forms=forms)


BENCHMARK_CLASS = ChartQA

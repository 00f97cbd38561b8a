"""ChartQA_TEST: VLMEvalKit's relaxed-accuracy scorer (spec section 4).

The dataset prompt is not here: VLMEvalKit's ``llama_vision`` uses its own ChartQA
(chain-of-thought) prompt, which the run profile carries as a template.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lavender_checks.benchmarks.base import Benchmark, ScoreResult
from lavender_checks.benchmarks.vlmeval_common import rules, vqa_aggregate, vqa_inputs
from lavender_checks.text import chartqa_answers, relaxed_accuracy


class ChartQA(Benchmark):
    """Relaxed accuracy exactly as VLMEvalKit computes it (deliberate quirks: the whole
    stripped output is compared, nothing extracts a final answer; a zero target means a
    string compare; ``%`` divides by 100; list elements of the answer are ``str()``-ed).

    Metrics: one key per split (``test_human``, ``test_augmented`` first), then
    ``Overall``, the micro-average over all rows.
    """

    def score(self, predictions: pd.DataFrame, meta: pd.DataFrame | None = None) -> ScoreResult:
        name = self.name
        indices, answer_cells, answer_lists, prediction_cells = vqa_inputs(
            predictions, name, ("index", "answer", "prediction", "split"), meta, chartqa_answers)
        scores = np.array([relaxed_accuracy(answers, prediction)
                           for answers, prediction in zip(answer_lists, prediction_cells)],
                          dtype=np.float64)

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
        return ScoreResult(benchmark=name, metrics=metrics, samples=samples, units=units, forms=forms,
                           population=None if meta is None else self.population(meta))


BENCHMARK_CLASS = ChartQA

"""Gating a subset of a full-size benchmark (issue 12, item 1).

Synthetic per-sample predictions over the full-size frames of ``synthetic.fullsize_data``
(DocVQA_VAL 5,349 questions, ChartQA_TEST 2 × 1,250, MME 1,187 image pairs, MMBench_DEV_EN
1,164 circular groups, here with category accuracies running from 0.2 to 0.95), scored by the
real scorers. The reference is the unshifted model's numbers on the whole benchmark: a subset
of that model must pass, and a model whose accuracy is lower by 8 points must fail once the
subset is large enough.
"""

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks import get_benchmark, get_spec
from lavender_checks.benchmarks.base import Ratio, ScoreResult
from lavender_checks.data import subset
from lavender_checks.gate.verdicts import judge, load_reference
from lavender_checks.synthetic import fullsize_data
from lavender_checks.text import docvqa_answers

ACCURACY = {"base": 0.55, "lavender": 0.62}
SHIFT = 0.08
MMBENCH_CATEGORIES = list(fullsize_data.mmbench_l2_of())
# Categories far apart in accuracy: what makes a subset's draw of a small one misleading.
MMBENCH_OFFSET = dict(zip(MMBENCH_CATEGORIES, np.linspace(0.2, 0.95, 20) - ACCURACY["base"]))
ROWS = {"DocVQA_VAL": ["Overall"], "ChartQA_TEST": ["test_human", "test_augmented", "Overall"],
        "MME": ["perception", "reasoning", "total"],
        "MMBench_DEV_EN": ["Overall", "CP", "LR", "ocr", "image_emotion"]}


def _wrong(answer):
    return {"Yes": "No", "No": "Yes"}.get(answer, "zzzzzzzzzzzzzzzz")


def _predictions(meta, variant, shift, seed):
    accuracy = ACCURACY[variant] - shift
    if "l2-category" in meta:  # MMBench: one draw per circular group (all its rows alike)
        group = (meta["index"] % fullsize_data.CIRCULAR_OFFSET).to_numpy()
        draw = np.random.default_rng(seed).random(group.max() + 1)[group]
        correct = draw < accuracy + meta["category"].map(MMBENCH_OFFSET).to_numpy()
        wrong = meta["answer"].map(lambda a: "B" if a == "A" else "A")
        return meta.assign(prediction=np.where(correct, meta["answer"], wrong))
    draw = np.random.default_rng(seed).random(len(meta))  # the same draw for both variants: paired
    correct = draw < accuracy
    right = meta["answer"].map(lambda a: docvqa_answers(a)[0] if a.startswith("[") else a)  # DocVQA: a list
    return meta.assign(prediction=[r if c else _wrong(r) for r, c in zip(right, correct)])


@pytest.fixture(scope="module")
def full_size():
    out = {}
    # Prediction files carry no image column (VLMEvalKit drops it); MME's image_path remains.
    frames = fullsize_data.benchmark_frames(seed=0)
    for seed, name in enumerate(ROWS):
        meta = frames[name].drop(columns="image")
        assert len(meta) == get_spec(name).rows
        out[name] = {shift: {v: _predictions(meta, v, shift, seed) for v in ACCURACY}
                     for shift in (0.0, SHIFT)}
        out[name]["meta"] = meta
    return out


@pytest.fixture(scope="module")
def reference(full_size, tmp_path_factory):
    """The unshifted model's whole-benchmark numbers as a reference file."""
    lines = ['[run]', '[gate]', 'confidence = 0.95', 'n_resamples = 400', 'seed = 1',
             'consistency_tolerance = 0.01', '[gate.floor]', 'percent = 0.01', 'score = 0.01',
             '[derived.MME]', 'total = ["perception", "reasoning"]']
    for name, metrics in ROWS.items():
        bench = get_benchmark(name)
        scores = {v: bench.score(full_size[name][0.0][v]).metrics for v in ACCURACY}
        scores = {v: {**m, "total": m.get("perception", 0) + m.get("reasoning", 0)} for v, m in scores.items()}
        for metric in metrics:
            b, l = round(scores["base"][metric], 2), round(scores["lavender"][metric], 2)
            lines += ["[[row]]", 'table = "t"', f'benchmark = "{name}"', f'metric = "{metric}"',
                      f"base = {b:.2f}", f"lavender = {l:.2f}", f"delta = {l - b:.2f}"]
    path = tmp_path_factory.mktemp("ref") / "full-size.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_reference(path)


def _judge(full_size, reference, shift, **pick):
    results = {}
    for name in ROWS:
        bench, meta = get_benchmark(name), full_size[name]["meta"]
        results[name] = {v: bench.score(subset(full_size[name][shift][v], bench, **pick), meta=meta)
                         for v in ACCURACY}
    return judge(reference, results)


@pytest.mark.parametrize("pick", [dict(fraction=0.5), dict(fraction=0.1), dict(limit=30), dict(limit=1)],
                         ids=str)
def test_the_model_that_gave_the_reference_passes_on_a_subset(full_size, reference, pick):
    verdicts = _judge(full_size, reference, 0.0, **pick)
    failed = [v.message() for v in verdicts if v.status != "pass"]
    assert not failed, "\n".join(failed)
    assert all(v.subset for v in verdicts)


def test_the_whole_benchmark_is_no_subset(full_size, reference):
    verdicts = _judge(full_size, reference, 0.0)
    assert all(v.status == "pass" and not v.subset and v.sampling_sd is None for v in verdicts)


def test_a_model_8_points_lower_fails_on_half_the_benchmark(full_size, reference):
    verdicts = {(v.row_id, v.quantity): v for v in _judge(full_size, reference, SHIFT, fraction=0.5)}
    for row_id in ("DocVQA_VAL-Overall", "ChartQA_TEST-Overall", "ChartQA_TEST-test_human",
                   "MME-perception", "MME-total", "MMBench_DEV_EN-Overall"):
        for quantity in ("base", "lavender"):
            assert verdicts[(row_id, quantity)].status == "fail", verdicts[(row_id, quantity)].message()
    # The gain did not move: it still passes.
    assert verdicts[("DocVQA_VAL-Overall", "gain")].status == "pass"


# Runs of the reference's own model on subsets drawn with many seeds. The run's confidence is
# shared out over its verdicts (gate.verdicts), so at most 1 − confidence of the runs may
# fail: 2 of 40 at 95 %.
SEEDS = range(40)


def _failing_runs(full_size, reference, pick, benchmarks):
    failing = {}
    for seed in SEEDS:
        results = {}
        for name in benchmarks:
            bench, meta = get_benchmark(name), full_size[name]["meta"]
            results[name] = {v: bench.score(subset(full_size[name][0.0][v], bench, seed=seed, **pick),
                                            meta=meta) for v in ACCURACY}
        failed = [v.message().splitlines()[0] for v in judge(reference, results, n_resamples=100)
                  if v.status == "fail" and v.benchmark in benchmarks]
        if failed:
            failing[seed] = failed
    return failing


@pytest.mark.parametrize("benchmarks, pick", [
    (["MMBench_DEV_EN"], dict(fraction=0.25)), (["MMBench_DEV_EN"], dict(fraction=0.5)),
    (["MMBench_DEV_EN"], dict(limit=60)),
    (["DocVQA_VAL", "ChartQA_TEST", "MME"], dict(fraction=0.1)),
], ids=str)
def test_the_reference_model_fails_at_most_the_promised_share_of_subset_runs(full_size, reference,
                                                                            benchmarks, pick):
    failing = _failing_runs(full_size, reference, pick, benchmarks)
    allowed = int((1 - reference.gate.confidence) * len(SEEDS))
    assert len(failing) <= allowed, failing


def test_subset_bands_widen_as_the_subset_shrinks(full_size, reference):
    widths = [{(v.row_id, v.quantity): v.half_width for v in _judge(full_size, reference, 0.0, **pick)}
              for pick in (dict(), dict(fraction=0.5), dict(fraction=0.1))]
    for key in widths[0]:
        assert widths[0][key] <= widths[1][key] <= widths[2][key], key


def _one_stratum_result(values, ids, population):
    values = np.asarray(values, dtype=float)
    units = pd.DataFrame({"unit": ids, "stratum": ["all"] * len(ids), "correct": values})
    return ScoreResult("DocVQA_VAL", {"Overall": float(values.mean() * 100)},
                       pd.DataFrame({"index": ids, "unit": ids, "score": values}), units,
                       {"Overall": [Ratio(values, np.ones_like(values))]}, population=population)


def test_a_subset_of_one_unit_has_a_wide_band_not_the_floor(tmp_path):
    path = tmp_path / "ref.toml"
    path.write_text("\n".join(['[run]', '[gate]', 'confidence = 0.95', 'n_resamples = 200', 'seed = 1',
                               'consistency_tolerance = 0.01', '[gate.floor]', 'percent = 0.01',
                               '[[row]]', 'table = "t"', 'benchmark = "DocVQA_VAL"', 'metric = "Overall"',
                               'base = 40.00', 'lavender = 45.00', 'delta = 5.00']) + "\n")
    ref = load_reference(path)
    one = {"base": _one_stratum_result([1.0], [7], {"all": 24}),
           "lavender": _one_stratum_result([1.0], [7], {"all": 24})}
    verdicts = {v.quantity: v for v in judge(ref, {"DocVQA_VAL": one})}
    # Without the population the band is the floor and a correct model fails.
    whole = {k: _one_stratum_result([1.0], [7], None) for k in one}
    assert {v.status for v in judge(ref, {"DocVQA_VAL": whole})} == {"fail"}
    assert all(v.status == "pass" for v in verdicts.values()), [v.message() for v in verdicts.values()]
    assert verdicts["base"].band == (0.0, 100.0)  # clipped to the percentage's range
    # The variance is a one-unit score's at the reported 40 %: 0.4 × 0.6.
    assert "1 of 24" in verdicts["base"].message()
    assert verdicts["base"].sampling_sd == pytest.approx(100 / 24 * np.sqrt(24 * 23 * 0.24))

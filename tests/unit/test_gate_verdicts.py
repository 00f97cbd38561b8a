"""Verdicts on synthetic ScoreResults: bands, modes, missing results, messages."""

import math

import numpy as np
import pandas as pd
import pytest

from lavender_checks.benchmarks.base import Ratio, ScoreResult
from lavender_checks.gate.bootstrap import paired_bootstrap
from lavender_checks.gate.verdicts import judge, load_reference, summary_table

SPLITS = ("test_human", "test_augmented")
# The seed report's ChartQA numbers are exact fractions of 1250 questions per split:
# 11.52 % = 144, 31.44 % = 393, 8.40 % = 105, 33.76 % = 422 (Overall 9.96 % and 32.60 %).
SEED_CORRECT = {"base": {"test_human": 144, "test_augmented": 105},
                "lavender": {"test_human": 393, "test_augmented": 422}}


def chartqa_result(correct_per_split: dict[str, int], per_split: int = 1250, drop_units: int = 0) -> ScoreResult:
    """A ChartQA result whose first questions of each split are correct, with its forms.

    Lavender's correct questions start 10 later than base's, so most answers agree (paired)."""
    scores, strata = [], []
    for split in SPLITS:
        k = correct_per_split[split]
        offset = 10 if k > 300 else 0
        s = np.zeros(per_split)
        s[offset:offset + k] = 1.0
        scores.append(s)
        strata += [split] * per_split
    correct = np.concatenate(scores)
    strata = np.array(strata, dtype=object)
    if drop_units:
        correct, strata = correct[drop_units:], strata[drop_units:]
    n = len(correct)
    ids = np.arange(drop_units, drop_units + n)
    forms = {split: [Ratio(correct * (strata == split), (strata == split).astype(float))] for split in SPLITS}
    forms["Overall"] = [Ratio(correct, np.ones(n))]
    metrics = {split: float(np.mean(correct[strata == split]) * 100) for split in SPLITS}
    metrics["Overall"] = float(np.mean(correct) * 100)
    units = pd.DataFrame({"unit": ids, "stratum": strata, "correct": correct})
    samples = pd.DataFrame({"index": ids, "unit": ids, "score": correct, "split": strata})
    return ScoreResult("ChartQA_TEST", metrics, samples, units, forms)


def seed_chartqa(base=None, lavender=None):
    return {"ChartQA_TEST": {
        "base": chartqa_result({**SEED_CORRECT["base"], **(base or {})}),
        "lavender": chartqa_result({**SEED_CORRECT["lavender"], **(lavender or {})}),
    }}


@pytest.fixture(scope="module")
def seed_ref():
    return load_reference()


def by_key(verdicts):
    return {(v.row_id, v.quantity): v for v in verdicts}


def test_reproduced_numbers_pass_and_other_benchmarks_are_missing(seed_ref):
    verdicts = judge(seed_ref, seed_chartqa(), n_resamples=500)
    assert len(verdicts) == 3 * len(seed_ref.rows)
    chartqa = [v for v in verdicts if v.benchmark == "ChartQA_TEST"]
    assert len(chartqa) == 9 and all(v.status == "pass" for v in chartqa)
    overall = by_key(verdicts)[("ChartQA_TEST-Overall", "base")]
    assert overall.measured == pytest.approx(9.96, abs=1e-9)
    assert overall.n == 2500 and overall.paired
    assert by_key(verdicts)[("ChartQA_TEST-test_human", "gain")].n == 1250
    others = [v for v in verdicts if v.benchmark != "ChartQA_TEST"]
    assert others and all(v.status == "missing" and v.measured is None and v.band is None for v in others)


def test_a_regression_fails_on_the_right_rows_only(seed_ref):
    # Lavender loses 122 augmented questions: 24.00 % instead of 33.76 %.
    verdicts = judge(seed_ref, seed_chartqa(lavender={"test_augmented": 300}), n_resamples=500)
    failed = {(v.row_id, v.quantity) for v in verdicts if v.status == "fail"}
    assert failed == {("ChartQA_TEST-test_augmented", "lavender"), ("ChartQA_TEST-test_augmented", "gain"),
                      ("ChartQA_TEST-Overall", "lavender"), ("ChartQA_TEST-Overall", "gain")}


def test_band_is_the_bootstrap_half_width_around_the_reported_number(seed_ref):
    results = seed_chartqa()
    verdict = by_key(judge(seed_ref, results))[("ChartQA_TEST-Overall", "gain")]
    r = paired_bootstrap(results["ChartQA_TEST"]["base"], results["ChartQA_TEST"]["lavender"], "Overall",
                         n_resamples=seed_ref.gate.n_resamples, confidence=seed_ref.gate.confidence,
                         seed=seed_ref.gate.seed)
    half = (r.gain_hi - r.gain_lo) / 2
    assert verdict.half_width == pytest.approx(half) and half > 0.5
    assert verdict.band == pytest.approx((22.64 - half, 22.64 + half))


def test_no_regression_is_one_sided_for_lavender_and_gain(seed_ref):
    better = seed_chartqa(lavender={"test_augmented": 600})  # 48 % instead of 33.76 %
    reproduce = by_key(judge(seed_ref, better, mode="reproduce", n_resamples=500))
    assert reproduce[("ChartQA_TEST-test_augmented", "gain")].status == "fail"
    assert reproduce[("ChartQA_TEST-test_augmented", "lavender")].status == "fail"
    relaxed = judge(seed_ref, better, mode="no-regression", n_resamples=500)
    assert all(v.status == "pass" for v in relaxed if v.benchmark == "ChartQA_TEST")
    gain = by_key(relaxed)[("ChartQA_TEST-test_augmented", "gain")]
    assert math.isinf(gain.band[1]) and gain.band[0] < 25.36 and gain.one_sided
    assert gain.mode == "no-regression" and ", one-sided" in gain.message()

    worse = by_key(judge(seed_ref, seed_chartqa(lavender={"test_augmented": 300}),
                         mode="no-regression", n_resamples=500))
    assert worse[("ChartQA_TEST-test_augmented", "gain")].status == "fail"
    assert worse[("ChartQA_TEST-test_augmented", "lavender")].status == "fail"

    # Base must still reproduce, in both directions.
    for base_correct in (200, 90):  # 16.00 % and 7.20 % against 11.52 %
        shifted = by_key(judge(seed_ref, seed_chartqa(base={"test_human": base_correct}),
                               mode="no-regression", n_resamples=500))
        base = shifted[("ChartQA_TEST-test_human", "base")]
        assert base.status == "fail" and not math.isinf(base.band[1])


def test_band_never_narrower_than_the_floor(tmp_path):
    ref_path = tmp_path / "ref.toml"
    ref_path.write_text("""
[gate]
confidence = 0.95
n_resamples = 200
seed = 0
consistency_tolerance = 0.01
[gate.floor]
percent = 0.01
[[row]]
table = "t"
benchmark = "ChartQA_TEST"
metric = "test_human"
base = 100.00
lavender = 100.00
delta = 0.00
[[row]]
table = "t"
benchmark = "ChartQA_TEST"
metric = "test_augmented"
base = 99.98
lavender = 100.00
delta = 0.02
[[row]]
table = "t"
benchmark = "ChartQA_TEST"
metric = "Overall"
base = 99.98
lavender = 100.00
delta = 0.02
floor = 0.05
""", encoding="utf-8")
    ref = load_reference(ref_path)
    perfect = {"test_human": 20, "test_augmented": 20}
    results = {"ChartQA_TEST": {"base": chartqa_result(perfect, per_split=20),
                                "lavender": chartqa_result(perfect, per_split=20)}}
    v = by_key(judge(ref, results))
    human = v[("ChartQA_TEST-test_human", "base")]
    assert human.bootstrap_half_width == 0.0 and human.half_width == 0.01 and human.status == "pass"
    assert v[("ChartQA_TEST-test_augmented", "base")].status == "fail"  # 100 vs 99.98: 0.02 > 0.01
    assert v[("ChartQA_TEST-test_augmented", "gain")].status == "fail"
    assert v[("ChartQA_TEST-Overall", "base")].status == "pass"  # the row's own floor, 0.05
    assert v[("ChartQA_TEST-Overall", "base")].half_width == 0.05


def test_missing_results_give_missing_verdicts_with_reasons(seed_ref):
    results = {"ChartQA_TEST": {"base": chartqa_result(SEED_CORRECT["base"]), "lavender": None}}
    v = by_key(judge(seed_ref, results, n_resamples=300))
    assert v[("ChartQA_TEST-Overall", "base")].status == "pass"  # judged on its own interval
    assert not v[("ChartQA_TEST-Overall", "base")].paired
    for quantity in ("lavender", "gain"):
        verdict = v[("ChartQA_TEST-Overall", quantity)]
        assert verdict.status == "missing" and verdict.measured is None and verdict.band is None
        assert "no lavender result for ChartQA_TEST" in verdict.reason
        assert "no lavender result for ChartQA_TEST" in verdict.message()
    mme = v[("MME-artwork", "base")]
    assert mme.status == "missing" and "no base result for MME" in mme.reason


def test_a_metric_absent_from_a_result_is_missing(seed_ref):
    results = seed_chartqa()
    lavender = results["ChartQA_TEST"]["lavender"]
    del lavender.metrics["test_human"], lavender.forms["test_human"]
    v = by_key(judge(seed_ref, results, n_resamples=300))
    assert v[("ChartQA_TEST-test_human", "base")].status == "pass"
    for quantity in ("lavender", "gain"):
        assert v[("ChartQA_TEST-test_human", quantity)].status == "missing"
        assert "has no metric test_human" in v[("ChartQA_TEST-test_human", quantity)].reason
    assert v[("ChartQA_TEST-Overall", "gain")].status == "pass"


def test_mixed_subsets_have_no_gain(seed_ref):
    results = {"ChartQA_TEST": {"base": chartqa_result(SEED_CORRECT["base"]),
                                "lavender": chartqa_result(SEED_CORRECT["lavender"], drop_units=5)}}
    v = by_key(judge(seed_ref, results, n_resamples=300))
    gain = v[("ChartQA_TEST-Overall", "gain")]
    assert gain.status == "missing" and gain.measured is None and "must be paired" in gain.reason
    base, lav = v[("ChartQA_TEST-Overall", "base")], v[("ChartQA_TEST-Overall", "lavender")]
    assert base.status == "pass" and lav.n == 2495 and not lav.paired


def test_messages_say_what_a_reviewer_needs(seed_ref):
    v = by_key(judge(seed_ref, seed_chartqa(lavender={"test_augmented": 300}), n_resamples=300))
    passed = v[("ChartQA_TEST-Overall", "base")].message()
    for text in ("PASS", "ChartQA_TEST-Overall base", "measured 9.96", "reported 9.96", "band [",
                 "n=2500 questions", "ChartQA_TEST Overall", "95% paired bootstrap", "floor 0.01", "reproduce"):
        assert text in passed, text
    assert passed.count("\n") == 1
    failed = v[("ChartQA_TEST-test_augmented", "gain")].message()
    assert failed.startswith("FAIL") and "measured +15.60" in failed and "reported +25.36" in failed


def mme_result(scores: dict[str, np.ndarray], perception=("existence", "count"),
               reasoning=("code_reasoning",)) -> ScoreResult:
    """An MME result: per category an (images × 2) array of question scores; units are images."""
    cats = np.concatenate([[c] * len(s) for c, s in scores.items()])
    both = np.concatenate(list(scores.values()))
    units = pd.DataFrame({"unit": [f"{c}/{i}" for c, s in scores.items() for i in range(len(s))],
                          "stratum": cats, "correct": both.mean(axis=1)})
    forms, metrics = {}, {}
    for c, s in scores.items():
        inside = (cats == c).astype(float)
        forms[c] = [Ratio(both.sum(axis=1) * inside, 2 * inside), Ratio(both[:, 0] * both[:, 1] * inside, inside)]
        metrics[c] = float(np.mean(s.ravel()) * 100 + np.mean(s[:, 0] * s[:, 1]) * 100)
    for total, members in (("perception", perception), ("reasoning", reasoning)):
        forms[total] = [t for m in members for t in forms[m]]
        metrics[total] = sum(metrics[m] for m in members)
    samples = pd.DataFrame({"index": range(len(units)), "unit": units["unit"], "score": units["correct"]})
    return ScoreResult("MME", metrics, samples, units, forms)


def test_mme_total_is_judged_on_perception_plus_reasoning(tmp_path):
    rng = np.random.default_rng(0)
    base_scores = {c: (rng.random((30, 2)) < 0.6).astype(float) for c in ("existence", "count", "code_reasoning")}
    lav_scores = {c: np.where(rng.random((30, 2)) < 0.3, 1.0, s) for c, s in base_scores.items()}
    base, lav = mme_result(base_scores), mme_result(lav_scores)
    rows = []
    for metric, b, l in (("perception", base.metrics["perception"], lav.metrics["perception"]),
                         ("reasoning", base.metrics["reasoning"], lav.metrics["reasoning"]),
                         ("total", base.metrics["perception"] + base.metrics["reasoning"],
                          lav.metrics["perception"] + lav.metrics["reasoning"])):
        rows.append(f'[[row]]\ntable = "t"\nbenchmark = "MME"\nmetric = "{metric}"\n'
                    f"base = {b:.2f}\nlavender = {l:.2f}\ndelta = {l - b:.2f}\n")
    path = tmp_path / "mme.toml"
    path.write_text("[gate]\nconfidence = 0.9\nn_resamples = 400\nseed = 3\nconsistency_tolerance = 0.01\n"
                    "[gate.floor]\nscore = 0.01\n[derived.MME]\ntotal = [\"perception\", \"reasoning\"]\n"
                    + "\n".join(rows), encoding="utf-8")
    ref = load_reference(path)
    v = by_key(judge(ref, {"MME": {"base": base, "lavender": lav}}))
    assert all(x.status == "pass" for x in v.values())
    total = v[("MME-total", "gain")]
    expected = (lav.metrics["perception"] + lav.metrics["reasoning"]
                - base.metrics["perception"] - base.metrics["reasoning"])
    assert total.measured == pytest.approx(expected)
    r = paired_bootstrap(base, lav, ("perception", "reasoning"), n_resamples=400, confidence=0.9, seed=3)
    assert total.bootstrap_half_width == pytest.approx((r.gain_hi - r.gain_lo) / 2)
    assert total.n == 90 and total.unit_kind == "image_pair"
    assert "n=90 image_pairs" in total.message()


def test_summary_table_lists_every_verdict(seed_ref):
    verdicts = judge(seed_ref, seed_chartqa(lavender={"test_augmented": 300}), n_resamples=300)
    table = summary_table(verdicts)
    lines = table.splitlines()
    assert len(lines) == 2 + len(verdicts) + 1
    assert lines[0].split() == ["row", "quantity", "measured", "reported", "band", "n", "status"]
    assert lines[-1] == "5 pass, 4 fail, 72 missing (reproduce)"
    row = next(line for line in lines if line.startswith("ChartQA_TEST-test_augmented") and " gain " in line)
    assert "+15.60" in row and "+25.36" in row and "FAIL" in row and "1250" in row
    # Measured numbers are right-aligned under their header.
    end = lines[0].index("measured") + len("measured")
    for line in lines[2:-1]:
        if line.startswith("ChartQA_TEST"):
            assert line[end - 1].isdigit() and line[end] == " ", line


def test_bad_calls_are_refused(seed_ref):
    with pytest.raises(ValueError, match="unknown mode 'strict'"):
        judge(seed_ref, {}, mode="strict")
    with pytest.raises(ValueError, match="is a ChartQA_TEST result"):
        judge(seed_ref, {"DocVQA_VAL": {"base": chartqa_result(SEED_CORRECT["base"]), "lavender": None}})
    with pytest.raises(ValueError, match="unknown key"):
        judge(seed_ref, {"ChartQA_TEST": {"lora": None}})


def test_missing_benchmark_verdicts_carry_the_reason_given():
    from lavender_checks.gate.verdicts import judge, load_reference

    reference = load_reference()
    verdicts = judge(reference, {}, missing_reasons={"MME": "its TSV is absent: /data/MME.tsv"})
    mme = [v for v in verdicts if v.benchmark == "MME"]
    assert mme and all(v.status == "missing" for v in mme)
    assert all("/data/MME.tsv" in v.message() for v in mme)
    docvqa = [v for v in verdicts if v.benchmark == "DocVQA_VAL"]
    assert all("not computed in this run" in v.message() for v in docvqa)


# ------------------------------------------------------------------ what makes a run not comparable


def _chartqa_reference(run=None):
    """tiny-mini.toml's ChartQA rows (with ``run`` as its [run] table, when given)."""
    import dataclasses

    from lavender_checks.run.config import TINY_REFERENCE

    reference = load_reference(TINY_REFERENCE)
    rows = tuple(r for r in reference.rows if r.benchmark == "ChartQA_TEST")
    return dataclasses.replace(reference, rows=rows, run=reference.run if run is None else run)


def test_a_run_with_another_profile_is_not_comparable():
    from lavender_checks.gate.verdicts import noncomparable
    from lavender_checks.profiles import load_profile

    reference = _chartqa_reference()
    data = {"data": {"ChartQA_TEST": {"scored_rows": 24}}}
    same = {**data, "profile": load_profile("seed-report").describe()}
    assert noncomparable(reference, same) == {}
    other = {**data, "profile": load_profile("vlmevalkit").describe()}
    why = noncomparable(reference, other)["ChartQA_TEST"]
    assert "the run used profile 'vlmevalkit'" in why and "recorded with profile 'seed-report'" in why
    # The seed report names its profile only: the name decides.
    named = _chartqa_reference({"profile": "seed-report"})
    assert noncomparable(named, same) == {}
    assert "come from profile 'seed-report'" in noncomparable(named, other)["ChartQA_TEST"]
    # --from-vlmeval has no profile to compare: nothing is claimed
    assert noncomparable(named, data) == {}


def test_the_seed_report_was_run_with_the_seed_report_profile():
    from lavender_checks.gate.verdicts import DEFAULT_REFERENCE

    assert load_reference(DEFAULT_REFERENCE).run["profile"] == "seed-report"


def test_a_benchmark_the_reference_has_no_rows_for_is_not_gated_and_says_so():
    from lavender_checks.gate.verdicts import noncomparable

    reference = _chartqa_reference()
    metadata = {"config": {"benchmarks": ["ChartQA_TEST", "MME"]},
                "data": {"ChartQA_TEST": {"scored_rows": 24}, "MME": {"scored_rows": 56}}}
    problems = noncomparable(reference, metadata)
    assert list(problems) == ["MME"]
    assert problems["MME"].startswith(f"not gated: {reference.path.name} has no rows for it")


def test_what_the_run_found_joins_the_data_problems():
    from lavender_checks.gate.verdicts import noncomparable

    reference = _chartqa_reference()
    metadata = {"data": {"ChartQA_TEST": {"noncomparable": ["a", "b"]}}}
    assert noncomparable(reference, metadata) == {"ChartQA_TEST": "a; b"}

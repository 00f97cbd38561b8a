"""The seed reference checks itself, and bad reference files are explained."""

import tomllib

import pytest

from lavender_checks import FIXTURES
from lavender_checks.benchmarks import benchmark_names
from lavender_checks.gate.verdicts import DEFAULT_REFERENCE, ReferenceFileError, benchmark_spec, load_reference

SEED = FIXTURES / "reported" / "seed-report.toml"


@pytest.fixture(scope="module")
def seed():
    return load_reference(SEED)


def test_the_default_reference_is_the_seed_report():
    assert DEFAULT_REFERENCE == SEED


def test_every_table_row_of_the_report_is_there(seed):
    tables = {}
    for row in seed.rows:
        tables.setdefault(row.table, []).append(row.id)
    assert tables["Overall comparison"] == [
        "DocVQA_VAL-Overall", "ChartQA_TEST-Overall", "MMBench_DEV_EN-Overall", "MME-total"]
    assert tables["ChartQA breakdown"] == ["ChartQA_TEST-test_human", "ChartQA_TEST-test_augmented"]
    assert len(tables["MMBench (selected sub-scores, %)"]) == 9
    assert len(tables["MME"]) == 12
    assert [r.label for r in seed.rows if r.subtable == "Decreases"] == [
        "existence", "landmark", "numerical_calculation", "posters"]
    # A few numbers exactly as printed.
    assert (seed.row("MMBench_DEV_EN-Overall").base, seed.row("MMBench_DEV_EN-Overall").lavender,
            seed.row("MMBench_DEV_EN-Overall").delta) == (31.36, 30.15, -1.20)
    assert seed.row("ChartQA_TEST-test_augmented").base == 8.40
    assert seed.row("MME-posters").lavender == 140.14
    assert seed.row("MME-celebrity").note  # the analysis text's other name for it


def test_delta_is_lavender_minus_base_within_rounding(seed):
    for row in seed.rows:
        assert abs(row.delta - (row.lavender - row.base)) <= 0.01 + 1e-9, row.id


def test_mme_total_is_perception_plus_reasoning(seed):
    total, perception, reasoning = (seed.row(f"MME-{k}") for k in ("total", "perception", "reasoning"))
    assert total.parts == ("perception", "reasoning")
    for quantity in ("base", "lavender", "gain"):
        parts = perception.reported(quantity) + reasoning.reported(quantity)
        assert abs(total.reported(quantity) - parts) <= 0.01 + 1e-9, quantity


def test_every_row_maps_to_a_known_benchmark_and_metric(seed):
    for row in seed.rows:
        assert row.benchmark in benchmark_names()
        spec = benchmark_spec(row.benchmark)
        assert all(part in spec.metric_keys for part in row.parts), row.id
        assert row.unit == spec.metric_unit
        assert row.floor == 0.01
    assert seed.row("MME-celebrity").parts == ("celebrity",)
    assert seed.row("MMBench_DEV_EN-celebrity_recognition").parts == ("celebrity_recognition",)


def test_run_and_gate_settings(seed):
    run = seed.run
    assert run["framework"] == "open-compass/VLMEvalKit"
    assert run["base_model"] == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert run["adapter"] == "lxasqjc/lavender-llama-3.2-11b-lora"
    assert run["greedy"] is True and run["max_new_tokens"] == 512 and run["pythonhashseed"] == 42
    assert run["benchmarks"] == ["DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME"]
    assert (seed.gate.confidence, seed.gate.n_resamples) == (0.95, 2000)
    assert seed.gate.floors == {"percent": 0.01, "score": 0.01}


# ---------------------------------------------------------------- bad files

GATE = """
[gate]
confidence = 0.95
n_resamples = 100
seed = 1
consistency_tolerance = 0.01
[gate.floor]
percent = 0.01
score = 0.01
[derived.MME]
total = ["perception", "reasoning"]
"""


def row(**fields):
    values = {"table": "t", "benchmark": "ChartQA_TEST", "metric": "Overall",
              "base": 10.0, "lavender": 20.0, "delta": 10.0}
    values.update(fields)
    lines = ["[[row]]"]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def write(tmp_path, *rows, gate=GATE, name="ref.toml"):
    path = tmp_path / name
    path.write_text(gate + "\n" + "".join(rows), encoding="utf-8")
    return path


def load_error(path) -> str:
    with pytest.raises(ReferenceFileError) as info:
        load_reference(path)
    return str(info.value)


def test_a_good_small_file_loads_with_row_floor_override(tmp_path):
    ref = load_reference(write(tmp_path, row(), row(metric="test_human", floor=0.5)))
    assert [r.id for r in ref.rows] == ["ChartQA_TEST-Overall", "ChartQA_TEST-test_human"]
    assert [r.floor for r in ref.rows] == [0.01, 0.5]
    assert ref.gate.n_resamples == 100


def test_unknown_benchmark_lists_the_known_ones(tmp_path):
    path = write(tmp_path, row(), row(benchmark="TextVQA_VAL"))
    msg = load_error(path)
    assert str(path) in msg and "row 2" in msg and "TextVQA_VAL" in msg
    assert "known benchmarks: DocVQA_VAL, ChartQA_TEST, MMBench_DEV_EN, MME" in msg


def test_unknown_metric_lists_the_benchmarks_keys(tmp_path):
    msg = load_error(write(tmp_path, row(metric="test_robot")))
    assert "row 1 (ChartQA_TEST-test_robot, line 13) metric" in msg
    assert "its keys: test_human, test_augmented, Overall" in msg
    # `total` is derived for MME only.
    msg = load_error(write(tmp_path, row(benchmark="MMBench_DEV_EN", metric="total")))
    assert "unknown metric 'total' for MMBench_DEV_EN" in msg
    ok = load_reference(write(tmp_path, row(benchmark="MME", metric="total", base=1000.0,
                                            lavender=1100.0, delta=100.0)))
    assert ok.rows[0].parts == ("perception", "reasoning")


def test_inconsistent_delta_is_refused_but_rounding_is_not(tmp_path):
    # The report's own MMBench row: 30.15 - 31.36 = -1.21, printed -1.20.
    load_reference(write(tmp_path, row(base=31.36, lavender=30.15, delta=-1.20)))
    msg = load_error(write(tmp_path, row(), row(metric="test_human", base=11.52, lavender=31.44, delta=19.82)))
    assert "row 2 (ChartQA_TEST-test_human, line 20) delta" in msg and "+19.82" in msg and "+19.92" in msg


def test_missing_and_unknown_fields_are_named(tmp_path):
    msg = load_error(write(tmp_path, row(lavender=None)))
    assert str(tmp_path / "ref.toml") in msg and "row 1" in msg and "missing field(s) ['lavender']" in msg
    msg = load_error(write(tmp_path, row(delat=3.0)))
    assert "unknown field(s) ['delat']" in msg
    msg = load_error(write(tmp_path, row(base="10.0")))
    assert "row 1 (ChartQA_TEST-Overall, line 13) base: must be a finite number" in msg


def test_derived_rows_must_add_up(tmp_path):
    mme = dict(benchmark="MME")
    path = write(tmp_path,
                 row(metric="perception", base=1000.0, lavender=1100.0, delta=100.0, **mme),
                 row(metric="reasoning", base=200.0, lavender=250.0, delta=50.0, **mme),
                 row(metric="total", base=1200.0, lavender=1360.0, delta=160.0, **mme))
    msg = load_error(path)
    assert "row 3 (MME-total) lavender: 1360.00 is not perception + reasoning = 1350.00" in msg


def test_duplicates_unit_mismatch_and_gate_problems(tmp_path):
    assert "the same metric as row 1" in load_error(write(tmp_path, row(), row()))
    assert "not 'score'" in load_error(write(tmp_path, row(unit="score")))
    assert "confidence" in load_error(write(tmp_path, row(), gate=GATE.replace("0.95", "95")))
    assert "[gate]" in load_error(write(tmp_path, row(), gate=GATE.replace("n_resamples = 100\n", "")))
    assert "no [[row]]" in load_error(write(tmp_path, gate=GATE))


def test_unreadable_files(tmp_path):
    assert "no such reference file" in load_error(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate\n", encoding="utf-8")
    assert f"{bad}: not valid TOML" in load_error(bad)
    assert load_error(tmp_path) == f"{tmp_path}: a folder, not a reference file (give a .toml file)"
    assert "a file, not a folder" in load_error(bad / "x.toml")


def test_the_seed_file_is_plain_toml():
    # Reviewers read it in diffs: every row carries its table, label and unit explicitly.
    raw = tomllib.loads(SEED.read_text(encoding="utf-8"))
    assert all({"table", "label", "unit", "benchmark", "metric"} <= set(r) for r in raw["row"])


def test_the_recorded_tsv_md5s_are_checked_when_the_file_is_read(tmp_path):
    # gate.verdicts.noncomparable reads [run] lmu_data_md5 after the whole run: a malformed
    # one must fail here, before any work, not crash once every prediction is made.
    def with_md5s(value):
        return write(tmp_path, row(), gate=f"[run]\nlmu_data_md5 = {value}\n" + GATE)

    ok = load_reference(with_md5s('{ ChartQA_TEST = "92945adcb74b5f23fd249b4b2fe6768e" }'))
    assert ok.run["lmu_data_md5"] == {"ChartQA_TEST": "92945adcb74b5f23fd249b4b2fe6768e"}
    msg = load_error(with_md5s('"92945adcb74b5f23fd249b4b2fe6768e"'))
    assert str(tmp_path / "ref.toml") in msg and "[run] lmu_data_md5" in msg and "benchmark" in msg
    msg = load_error(with_md5s("{ ChartQA_TEST = 3 }"))
    assert "[run] lmu_data_md5.ChartQA_TEST: must be an md5 string" in msg
    msg = load_error(with_md5s('{ TextVQA_VAL = "92945adcb74b5f23fd249b4b2fe6768e" }'))
    assert "[run] lmu_data_md5" in msg and "TextVQA_VAL" in msg


@pytest.mark.parametrize("fields, named, bounds", [
    (dict(base=150.0, lavender=150.0, delta=0.0), "base: 150 is outside the range of ChartQA_TEST Overall",
     "[0, 100]"),
    (dict(base=-4.17, lavender=2.31, delta=6.48), "base: -4.17 is outside", "[0, 100]"),
    (dict(benchmark="MME", metric="count", base=201.0, lavender=190.0, delta=-11.0),
     "base: 201 is outside the range of MME count (score)", "[0, 200]"),
    (dict(benchmark="MME", metric="perception", base=2100.0, lavender=1900.0, delta=-200.0),
     "base: 2100 is outside the range of MME perception", "[0, 2000]"),
    (dict(benchmark="MME", metric="reasoning", base=100.0, lavender=900.0, delta=800.0),
     "lavender: 900 is outside the range of MME reasoning", "[0, 800]"),
    (dict(benchmark="MME", metric="total", base=2700.0, lavender=2900.0, delta=200.0),
     "lavender: 2900 is outside the range of MME total (= perception + reasoning)", "[0, 2800]"),
])
def test_a_reported_number_outside_its_metrics_range_is_refused_naming_row_and_range(
        tmp_path, fields, named, bounds):
    msg = load_error(write(tmp_path, row(**fields)))
    assert f"row 1 ({fields.get('benchmark', 'ChartQA_TEST')}-{fields.get('metric', 'Overall')}, line 13)" in msg
    assert named in msg and bounds in msg


def test_the_metric_ranges_are_data_of_benchmarks_toml(tmp_path):
    assert benchmark_spec("ChartQA_TEST").max_value("Overall") == 100.0
    assert benchmark_spec("MMBench_DEV_EN").max_value("ocr") == 100.0
    mme = benchmark_spec("MME")
    assert (mme.max_value("count"), mme.max_value("perception"), mme.max_value("reasoning")) == (200, 2000, 800)
    assert mme.max_value(("perception", "reasoning")) == 2800.0
    load_reference(write(tmp_path, row(base=0.0, lavender=100.0, delta=100.0)))  # the edges are possible

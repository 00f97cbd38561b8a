"""The benchmark snapshot format and its account of changes (lavender_checks/gate/snapshots.py),
on hand-made score results: canary choice, the file layout, every kind of change, sizes at full
benchmark size."""

from __future__ import annotations

import json
import math
import random
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lavender_checks import benchmarks as registry
from lavender_checks.gate import snapshots
from lavender_checks.gate.snapshots import compare, current_snapshot, dumps, parse


def _result(rows: list[dict], metrics: dict[str, float]):
    samples = pd.DataFrame(rows)
    units = pd.DataFrame({"unit": samples["index"], "correct": samples["score"]})
    return SimpleNamespace(samples=samples, units=units, metrics=metrics, forms={})


def _pair(groups=("a", "b", "c"), per_group=4, flips=(), changed=()):
    """Rows 0.. in groups; base right on even rows; Lavender the same unless the row is in
    ``flips`` (score flips, answer changes) or ``changed`` (answer changes, score stays)."""
    base_rows, lav_rows, preds = [], [], {"base": {}, "lavender": {}}
    index = 0
    for group in groups:
        for _ in range(per_group):
            score = 1.0 if index % 2 == 0 else 0.0
            lscore = 1.0 - score if index in flips else score
            base_rows.append({"index": index, "category": group, "question": f"Q{index}?", "score": score})
            lav_rows.append({"index": index, "category": group, "question": f"Q{index}?", "score": lscore})
            preds["base"][index] = f"answer {index}"
            preds["lavender"][index] = f"other {index}" if index in flips or index in changed else f"answer {index}"
            index += 1
    base = _result(base_rows, {"Overall": 50.0})
    lavender = _result(lav_rows, {"Overall": 50.0 + 100.0 * len(flips) / index})
    return base, lavender, preds


def _snap(base, lavender, preds, **settings):
    chosen = snapshots.SETTINGS if not settings else \
        snapshots.Settings(**{**snapshots.SETTINGS.__dict__, **settings})
    return current_snapshot("B", base, lavender, preds, profile="p", run="r", settings=chosen)


def test_canaries_cover_every_group_then_prefer_rows_where_the_variants_differ():
    base, lavender, preds = _pair(groups=("a", "b", "c"), per_group=6, flips=(5, 14), changed=(9,))
    canaries = _snap(base, lavender, preds, canary_rows=6).snapshot["canaries"]
    indices = [c["index"] for c in canaries]
    assert indices == sorted(indices) and len(indices) == 6
    assert {c["group"] for c in canaries} == {"a", "b", "c"}
    assert {5, 14, 9} <= set(indices)  # both flips and the changed answer
    assert indices[:1] == [0] and 1 not in indices  # a group's first row only when nothing better
    assert canaries[0] == {"index": 0, "group": "a", "question": "Q0?", "base": "answer 0", "lavender": "answer 0"}


def test_canaries_never_exceed_the_rows_and_fewer_slots_than_groups_take_the_first_groups():
    base, lavender, preds = _pair(groups=("a", "b", "c"), per_group=2)
    assert len(_snap(base, lavender, preds, canary_rows=50).snapshot["canaries"]) == 6
    assert [c["group"] for c in _snap(base, lavender, preds, canary_rows=2).snapshot["canaries"]] == ["a", "b"]


def test_the_file_has_one_row_per_line_a_fixed_key_order_and_reads_back():
    base, lavender, preds = _pair(flips=(1,))
    snapshot = _snap(base, lavender, preds).snapshot
    text = dumps(snapshot)
    assert parse(text) == json.loads(text) == snapshot
    lines = text.splitlines()
    assert lines[1] == '  "benchmark": "B",'
    rows = lines[lines.index('  "row_scores": [') + 1:-2]
    assert len(rows) == len(base.samples)
    assert rows[1] == f'    [1, 0, 1, "{snapshots.digest("answer 1")}", "{snapshots.digest("other 1")}"],'
    assert dumps(json.loads(text)) == text  # key order does not depend on the dict's


def test_digests_are_short_and_tell_answers_apart():
    assert snapshots.digest("Yes") == snapshots.digest("Yes") != snapshots.digest("Yes ")
    assert len(snapshots.digest("Yes")) == snapshots.SETTINGS.digest_chars
    assert snapshots.digest(None) is None and snapshots.digest(math.nan) is None


def test_parse_names_the_file_when_it_is_not_a_snapshot():
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: not JSON"):
        parse("{", "x.json")
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: not a benchmark snapshot"):
        parse("[]", "x.json")
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: row_fields"):
        parse(json.dumps({"benchmark": "B", "metrics": {}, "row_fields": ["index"], "row_scores": []}), "x.json")
    fields = list(snapshots.ROW_FIELDS)
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: row_scores entry 2 is \[1, 0\]"):
        parse(json.dumps({"benchmark": "B", "metrics": {}, "row_fields": fields,
                          "row_scores": [[0, 1, 1, "a", "b"], [1, 0]]}), "x.json")


def test_parse_refuses_an_empty_file_unknown_keys_and_other_shapes_naming_the_file():
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: the file is empty"):
        parse(" \n", "x.json")
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: key\(s\) this format does not have: comment"):
        parse(json.dumps({"benchmark": "B", "metrics": {}, "comment": "hand-edited"}), "x.json")
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: metrics 'OCR' is 3"):
        parse(json.dumps({"benchmark": "B", "metrics": {"OCR": 3}}), "x.json")
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: canaries"):
        parse(json.dumps({"benchmark": "B", "metrics": {}, "canaries": ["yes"]}), "x.json")


def test_an_unreadable_file_reads_as_what_to_do():
    account = snapshots.unreadable("x.json: the file is empty", benchmark="MME", case="c", location="x.json")
    text = snapshots.markdown([account])
    assert "MME: the accepted snapshot cannot be read" in text
    assert "x.json: the file is empty" in text and "--snapshot-update" in text


def test_settings_are_checked(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("canary_rows = 0\n")
    with pytest.raises(ValueError, match="missing keys"):
        snapshots.load_settings(path)
    good = snapshots.SETTINGS_FILE.read_text()
    path.write_text(good.replace("canary_rows = 32", "canary_rows = 0"))
    with pytest.raises(ValueError, match="canary_rows must be a positive integer"):
        snapshots.load_settings(path)


def test_every_kind_of_row_change_lands_in_its_group():
    base, lavender, preds = _pair()
    accepted = json.loads(dumps(_snap(base, lavender, preds).snapshot))
    rows = {r[0]: r for r in accepted["row_scores"]}
    rows[0][1] = 0  # accepted base wrong, now right
    rows[2][2] = 0  # Lavender: wrong -> right
    rows[1][1] = 1  # base right -> wrong
    rows[3][4] = "ffffffff"  # Lavender answered otherwise, same score
    accepted["row_scores"] = [r for r in accepted["row_scores"] if r[0] != 4] + [[99, 1, 1, "aa", "bb"]]
    account = compare(accepted, _snap(base, lavender, preds))
    got = {k: [(e["index"], e["variant"]) for e in v] for k, v in account["rows"]["groups"].items() if v}
    assert got == {"right_to_wrong": [(1, "base")], "wrong_to_right": [(0, "base"), (2, "lavender")],
                   "answer_changed": [(3, "lavender")], "added": [(4, "base"), (4, "lavender")],
                   "removed": [(99, "base"), (99, "lavender")]}
    assert account["rows"]["counts"]["wrong_to_right"] == 2 and account["status"] == "changed"
    entry = account["rows"]["groups"]["answer_changed"][0]
    # Row 3 is a canary, but its kept text is not the answer the accepted digest names.
    assert entry["accepted_answer"] is None and entry["accepted_digest"] == "ffffffff"
    assert entry["new_answer"] == "answer 3" and entry["question"] == "Q3?"
    flipped = account["rows"]["groups"]["right_to_wrong"][0]
    assert flipped["accepted_answer"] == "answer 1"  # a canary whose text matches its digest


def test_the_message_counts_first_and_lists_the_first_rows_the_files_all():
    base, lavender, preds = _pair(groups=("a",), per_group=30)
    accepted = json.loads(dumps(_snap(base, lavender, preds, canary_rows=1).snapshot))
    for row in accepted["row_scores"]:
        row[3] = "00000000"
    account = compare(accepted, _snap(base, lavender, preds, canary_rows=1))
    short = snapshots.markdown([account], rows_per_group=10)
    assert "Rows (one per variant): 30 answer changed, score same" in short
    assert "… and 20 more" in short and '| 29 ' not in short
    full = snapshots.markdown([account])
    assert "| 29 " in full and "more" not in full
    assert "#00000000" in full  # not a canary: the accepted answer is its digest


def test_an_unchanged_snapshot_gives_an_empty_account_and_files_that_say_so(tmp_path):
    base, lavender, preds = _pair()
    current = _snap(base, lavender, preds)
    account = compare(json.loads(dumps(current.snapshot)), current)
    assert account["status"] == "unchanged" and not account["metrics"] and not any(account["rows"]["counts"].values())
    md, js = snapshots.write_account(tmp_path, [account])
    assert "All 1 benchmark snapshot(s) match" in md.read_text() and "Unchanged: B" in md.read_text()
    assert json.loads(js.read_text())["changed"] == 0


def test_a_metric_change_carries_the_gates_band_now():
    base, lavender, preds = _pair(flips=(1,))
    current = _snap(base, lavender, preds)
    accepted = json.loads(dumps(current.snapshot))
    accepted["metrics"]["Overall"]["lavender"] = 60.0
    verdicts = [{"benchmark": "B", "metric": "Overall", "quantity": "lavender", "status": "fail",
                 "band": [40.0, 52.0], "reported": 46.0, "row_id": "B-Overall"},
                {"benchmark": "B", "metric": "Overall", "quantity": "gain", "status": "pass",
                 "band": [-5.0, None], "reported": 0.0, "row_id": "B-Overall"},
                {"benchmark": "C", "metric": "Overall", "quantity": "base", "status": "pass",
                 "band": [0.0, 1.0], "reported": 0.5, "row_id": "C-Overall"}]
    account = compare(accepted, current, verdicts=verdicts)
    assert [m["key"] for m in account["metrics"]] == ["Overall"]
    text = snapshots.markdown([account])
    row = next(line for line in text.splitlines() if line.startswith("| Overall"))
    assert "60.00 → 58.33" in row and "lavender OUTSIDE [40.00, 52.00]" in row and "gain in [-5.00, +inf]" in row
    assert "base" not in row.split("|")[-2]  # C's verdict is not B's


def test_an_older_snapshot_without_rows_still_compares_metrics_and_canaries():
    base, lavender, preds = _pair()
    current = _snap(base, lavender, preds)
    old = {"benchmark": "B", "profile": "p", "run": "r", "rows": 12, "units": 12,
           "metrics": current.snapshot["metrics"],
           "canaries": [{"index": 0, "base": "answer 0", "lavender": "before"}]}
    account = compare(old, current)
    assert account["status"] == "changed" and "older format" in account["notes"][0]
    assert account["canaries"]["changed"] == [{"index": 0, "variant": "lavender", "accepted": "before", "now": "answer 0"}]


@pytest.mark.parametrize("name", registry.benchmark_names())
def test_a_full_size_snapshot_stays_under_a_megabyte(name):
    """Every row of the real benchmark, synthetic answers of realistic length: the per-row part
    is what grows with the benchmark (docs/snapshots.md has the figures)."""
    rows = registry.get_spec(name).rows
    rng = random.Random(0)
    words = ["the", "total", "is", "answer", "B", "Yes", "No", "1993", "$ 96.50", "chart", "invoice"]
    base_rows, lav_rows, preds = [], [], {"base": {}, "lavender": {}}
    for index in range(rows):
        group = f"category_{index % 20}"
        question = " ".join(rng.choice(words) for _ in range(40))
        for out, variant in ((base_rows, "base"), (lav_rows, "lavender")):
            score = rng.choice([0.0, 1.0, round(rng.random(), 6)])
            out.append({"index": index, "category": group, "question": question, "score": score})
            preds[variant][index] = " ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))
    base = _result(base_rows, {f"m{i}": rng.random() * 100 for i in range(30)})
    lavender = _result(lav_rows, dict(base.metrics))
    text = dumps(_snap(base, lavender, preds).snapshot)
    assert len(text.encode()) < 1_000_000
    assert text.count("\n") == len(text.splitlines()) >= rows


def test_row_scores_keep_integers_short_and_fractions_rounded():
    assert snapshots._row_score(1.0, 4) == 1 and isinstance(snapshots._row_score(1.0, 4), int)
    assert snapshots._row_score(0.123456, 4) == 0.1235 and snapshots._row_score(np.nan, 4) is None
    assert snapshots._row_score(-0.0, 4) == 0


def test_no_accepted_file_and_no_result_read_as_what_to_do():
    base, lavender, preds = _pair()
    current = _snap(base, lavender, preds)
    new = compare(None, current)
    assert new["status"] == "new" and "--snapshot-update" in snapshots.markdown([new])
    removed = compare(json.loads(dumps(current.snapshot)), None, missing_reason="/x/B.tsv does not exist")
    text = snapshots.markdown([removed])
    assert text.startswith("### B: removed from the run") and "/x/B.tsv does not exist" in text
    assert "| Overall | 50.00 → — |" in re.sub(" +", " ", text)


GPU_BOX = {"torch": "2.11.0+cu128", "transformers": "5.17.0", "peft": "0.21.0"}
HERE = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "peft": "0.21.2"}


def test_a_snapshot_records_the_versions_it_was_taken_with_and_reads_back():
    base, lavender, preds = _pair()
    snapshot = current_snapshot("B", base, lavender, preds, profile="p", run="r",
                                versions={**HERE, "numpy": "2.4.6"}).snapshot
    assert snapshot["versions"] == HERE  # torch, transformers and peft only
    text = dumps(snapshot)
    assert f'  "versions": {json.dumps(HERE)},' in text.splitlines()
    assert parse(text) == snapshot
    with pytest.raises(snapshots.SnapshotFormatError, match=r"x\.json: versions is"):
        parse(json.dumps({**snapshot, "versions": ["torch"]}), "x.json")


def test_other_versions_open_the_account_of_a_changed_snapshot():
    base, lavender, preds = _pair(flips=(1,))
    now = current_snapshot("B", base, lavender, preds, profile="p", run="r", versions=HERE)
    accepted = json.loads(dumps(now.snapshot))
    accepted["versions"] = GPU_BOX
    accepted["row_scores"][1][2] = 0  # accepted: Lavender wrong on row 1
    account = compare(accepted, now)
    assert account["status"] == "changed"
    assert account["versions_changed"] == ("recorded with torch 2.11.0+cu128, transformers 5.17.0, peft 0.21.0; "
                                           "this run: torch 2.13.0+cpu, transformers 5.25.0, peft 0.21.2")
    assert account["notes"][0].startswith(account["versions_changed"] + ": greedy tokens can differ")
    text = snapshots.markdown([account])
    assert text.index("recorded with torch 2.11.0+cu128") < text.index("Rows (")
    notice = snapshots.versions_notice([account])
    assert notice.startswith("SNAPSHOT VERSIONS: ") and "the snapshots of B differ" in notice
    assert notice.splitlines()[1] == f"  B: {account['versions_changed']}"


def test_versions_alone_are_no_change_and_a_file_without_them_stays_valid():
    base, lavender, preds = _pair()
    now = current_snapshot("B", base, lavender, preds, profile="p", run="r", versions=HERE)
    other = {**json.loads(dumps(now.snapshot)), "versions": GPU_BOX}
    assert snapshots.same_content(other, now.snapshot)
    account = compare(other, now)
    assert account["status"] == "unchanged" and account["versions_changed"]
    assert "match all the same" in snapshots.versions_notice([account])
    older = {k: v for k, v in json.loads(dumps(now.snapshot)).items() if k != "versions"}  # recorded before they were kept
    account = compare(older, now)
    assert account["status"] == "unchanged" and not account["versions_changed"]
    assert snapshots.versions_notice([account]) == ""
    older["row_scores"][0][1] = 0
    notes = compare(older, now)["notes"]
    assert any(n.startswith("the accepted snapshot records no versions") and "torch 2.13.0+cpu" in n for n in notes)
def test_counts_read_as_whole_numbers():
    """Row, unit and n counts are integers: "12 → 10", never "12.00 → 10.00" or "1.2e+06"."""
    base, lavender, preds = _pair()
    current = _snap(base, lavender, preds)
    accepted = json.loads(dumps(current.snapshot))
    accepted["rows"], accepted["units"] = 10, 1_234_567
    accepted["metrics"]["Overall"]["n"] = 1_234_567
    accepted["metrics"]["Overall"]["base"] = 40.0
    text = snapshots.markdown([compare(accepted, current)])
    assert "- rows: 10 → 12" in text and "- units: 1234567 → 12" in text
    row = next(line for line in text.splitlines() if line.startswith("| Overall"))
    assert "1234567 → —" in row and "e+06" not in row

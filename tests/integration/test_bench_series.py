"""``lavender-checks bench-series`` on the tiny model on CPU (``--tiny-cpu``): the harness runs
all three ways (adapters beside one base, in turn, separate runs), prints its figures and finds
the same greedy tokens in the series as in the separate runs. Its timings mean nothing here."""

from __future__ import annotations

import json

from lavender_checks import cli


def test_the_series_bench_runs_every_way_and_finds_the_same_tokens(tmp_path, capsys):
    out = tmp_path / "bench-series.json"
    code = cli.main(["bench-series", "--tiny-cpu", "--scale", "0.005", "--max-rows", "3",
                     "--max-output-tokens", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report["adapters"] == 3 and report["rows"] == 12  # 3 rows of each of the 4 benchmarks
    assert list(report["beside"]["generate_s"]) == ["base", "adapter0", "adapter1", "adapter2"]
    assert len(report["separate"]["runs"]) == 3 and list(report["in_turn"]["generate_s"]) == ["adapter0", "adapter1",
                                                                                                "adapter2"]
    assert report["same_tokens"] and all(v["same"] == v["rows"] == 12 for v in report["same_tokens"].values())
    figures = report["figures"]
    assert figures["separate_total_s"] > figures["separate_shared_store_total_s"] > 0
    assert figures["faster_of_beside_and_in_turn"] in ("beside", "in_turn")
    for line in ("one process, adapters beside one base:", "separate runs:", "faster than separate runs",
                 "same greedy tokens as the separate runs: base (run 0) 12/12", "adapter2 12/12"):
        assert line in printed


def test_bad_options_are_refused(capsys):
    assert cli.main(["bench-series", "--tiny-cpu", "--adapters", "0"]) == 2
    assert "--adapters must be at least 1" in capsys.readouterr().err
    assert cli.main(["bench-series", "--tiny-cpu", "--scale", "0"]) == 2

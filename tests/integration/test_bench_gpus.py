"""``lavender-checks bench-gpus``: the processes it starts, the scaling arithmetic, the
reproducibility check, and a whole run of the harness (both launchers, two processes) on the
tiny model on CPU. Scaling itself is measured on GPUs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lavender_checks.speed import bench, measure
from lavender_checks.speed import gpus as bench_gpus


def parse(argv):
    parser = argparse.ArgumentParser()
    bench_gpus.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_process_gets_the_workload_options_and_its_shard(tmp_path):
    args = parse(["--scale", "0.2", "--slots", "64", "--vision-attention", "transformers", "--no-graphs",
                  "--dtype", "float32"])
    argv = bench_gpus._child_argv(args, (1, 2), tmp_path / "r.json", tmp_path / "t.jsonl", tmp_path / "barrier")
    assert argv[argv.index("--shard") + 1] == "1/2" and argv[argv.index("--paths") + 1] == "fast"
    assert argv[argv.index("--barrier") + 1] == str(tmp_path / "barrier")
    assert argv[argv.index("--tokens") + 1] == str(tmp_path / "t.jsonl")
    assert argv[argv.index("--scale") + 1] == "0.2" and argv[argv.index("--slots") + 1] == "64"
    assert argv[argv.index("--vision-attention") + 1] == "transformers" and "--no-graphs" in argv
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert "--tiny-cpu" not in argv and "--torchrun" not in argv
    ranks = bench_gpus._child_argv(args, None, tmp_path / "r.json", tmp_path / "t.jsonl")
    assert "--torchrun" in ranks and "--shard" not in ranks and "--barrier" not in ranks


def fake_report(startup, warmup, timed, barrier, projected, rows, methods=None, device="NVIDIA H200"):
    split = {"startup": startup, "warmup": warmup, "timed": timed, "barrier": barrier,
             "total": startup + warmup + timed + barrier}
    return {"device": device, "model": {"build_seconds": 9.0},
            "fast": {"warmup": {"seconds": warmup}, "stats": {"images": 3}, "peak_gib": 40.0, "split": split,
                     "projection": {"seconds": projected, "measured": {"seconds": timed, "rows": rows},
                                    "decode_methods": methods or {}}}}


TARGETS = bench_gpus.load_targets()


def test_the_gate_on_n_gpus_takes_as_long_as_its_slowest_process():
    one = fake_report(20, 10, 370, 0, 1970, 100)
    # shard 2 is the last to reach the barrier: the others' waits are its lateness
    shards = [fake_report(20, 10, 80, 15, 470, 25), fake_report(21, 10, 84, 10, 480, 25),
              fake_report(21, 10, 94, 0.5, 500, 25), fake_report(20, 10, 70, 25, 460, 25)]
    launches = {"xdist": [(r, {"gpu": str(i), "wall_seconds": 130 + i}, None) for i, r in enumerate(shards)]}
    report = bench_gpus.summarise(one, {"wall_seconds": 410}, launches, parse(["--gpus", "4"]), TARGETS, None)
    part = report["launchers"]["xdist"]
    assert part["slowest"]["shard"] == 2 and part["slowest"]["split"]["barrier"] == 0.5
    assert part["gate_seconds"] == {"measured": pytest.approx(125.5), "projected": pytest.approx(531)}
    assert part["speedup"]["projected"] == pytest.approx(2000 / 531)
    assert part["efficiency"]["projected"] == pytest.approx(2000 / 531 / 4)
    assert part["efficiency"]["measured"] == pytest.approx(400 / 125.5 / 4)
    assert part["wall_seconds"] == 133 and part["full_gate_minutes"] == pytest.approx(531 / 60)
    assert part["targets"]["efficiency"] == {"value": pytest.approx(0.9416, abs=1e-4), "target": ">= 0.9", "met": True}
    assert part["targets"]["full_gate_minutes"]["target"] == "<= 4" and part["targets"]["full_gate_minutes"]["met"] is False
    # without token files the check is not measured, and says so; not met is not assumed
    assert part["reproducibility"]["measured"] is False
    assert part["targets"]["identical_predictions"]["met"] is None
    assert part["every_decode_projection_steady"] is True
    text = bench_gpus.summary_text(report, Path("r.json"))
    assert "efficiency                0.942  target   >= 0.9  met" in text
    assert "full_gate_minutes         8.850  target     <= 4  NOT met" in text


def test_targets_follow_the_gpu_count_and_an_older_baseline_still_reads():
    old = {"device": "NVIDIA H100 80GB HBM3", "model": {"build_seconds": 10},
           "fast": {"warmup": {"seconds": 5}, "stats": {"images": 3},
                    "projection": {"seconds": 1985, "measured": {"seconds": 185, "rows": 100}}}}
    assert bench_gpus._gate_seconds(old)["measured"] == 200 and bench_gpus._gate_seconds(old)["projected"] == 2000
    shards = [fake_report(10, 5, 300, 0, 1900, 50, {"base/ChartQA_TEST": "row-scaled (steady phase shorter than one batch)"}),
              fake_report(10, 5, 290, 10, 1800, 50)]
    launches = {"torchrun": [(r, {"gpu": f"LOCAL_RANK {i}", "wall_seconds": 320}, None) for i, r in enumerate(shards)]}
    part = bench_gpus.summarise(old, {}, launches, parse(["--gpus", "2"]), TARGETS, None)["launchers"]["torchrun"]
    assert part["targets"]["efficiency"]["target"] == ">= 0.9" and part["targets"]["efficiency"]["met"] is False
    assert part["targets"]["full_gate_minutes"] == {"value": pytest.approx(1915 / 60), "target": None, "met": None}
    assert part["every_decode_projection_steady"] is False
    assert part["ranks"][0]["row_scaled_runs"] == ["base/ChartQA_TEST"]


def test_identical_predictions_join_the_shards_row_by_row():
    one = {("base/A", "A:0"): [1, 2, 3], ("base/A", "A:1"): [4, 5], ("lavender/A", "A:0"): [6]}
    shards = [{("base/A", "A:0"): [1, 2, 3], ("lavender/A", "A:0"): [6]}, {("base/A", "A:1"): [4, 5]}]
    same = bench_gpus.compare_tokens(one, shards)
    assert (same["identical"], same["rows"], same["fraction"], same["differing"]) == (3, 3, 1.0, 0)
    altered = [shards[0], {("base/A", "A:1"): [4, 9]}]
    changed = bench_gpus.compare_tokens(one, altered)
    assert changed["identical"] == 2 and changed["fraction"] == pytest.approx(2 / 3)
    assert changed["first_differences"] == [{"run": "base/A", "key": "A:1", "shard": 1, "first_differing_token": 1}]
    shorter = bench_gpus.compare_tokens(one, [shards[0], {("base/A", "A:1"): [4]}])
    assert shorter["first_differences"][0]["first_differing_token"] == 1
    broken = bench_gpus.compare_tokens(one, [shards[0], {**shards[0], ("base/B", "B:0"): [1]}])
    assert (broken["missing"], broken["duplicated"], broken["extra"]) == (1, 2, 1)
    assert broken["duplicated_rows"][0]["shards"] == [0, 1]
    assert bench_gpus.compare_tokens(None, shards)["measured"] is False


def test_rows_given_twice_are_not_identical_predictions():
    one = {("base/A", "A:0"): [1]}
    launches = {"xdist": [(fake_report(1, 1, 1, 0, 10, 1), {"gpu": "0"}, {("base/A", "A:0"): [1]}),
                          (fake_report(1, 1, 1, 0, 10, 1), {"gpu": "1"}, {("base/A", "A:0"): [1]})]}
    part = bench_gpus.summarise(fake_report(1, 1, 2, 0, 20, 1), {}, launches, parse([]), TARGETS, one)["launchers"]["xdist"]
    assert part["reproducibility"]["fraction"] == 1.0 and part["reproducibility"]["duplicated"] == 1
    assert part["targets"]["identical_predictions"]["met"] is False


def test_bad_token_files_and_targets_are_named(tmp_path):
    tokens = tmp_path / "t.jsonl"
    tokens.write_text('{"run": "base/A", "key": "A:0", "ids": [1]}\n{"run": "base/A", "ids": [2]}\n')
    with pytest.raises(bench_gpus.BenchProcessError, match=r"t.jsonl, line 2: not a token row \(KeyError"):
        bench_gpus.read_tokens(tokens)
    tokens.write_text('{"run": "base/A", "key": "A:0", "ids": [1]}\n' * 2)
    with pytest.raises(bench_gpus.BenchProcessError, match="line 2: row base/A A:0 given twice"):
        bench_gpus.read_tokens(tokens)
    targets = tmp_path / "gpus.toml"
    targets.write_text("[efficiency]\nfour = 0.9\n")
    with pytest.raises(bench_gpus.BenchProcessError, match="gpus.toml: not a readable targets file"):
        bench_gpus.load_targets(targets)


def test_a_baseline_of_another_workload_is_refused(tmp_path):
    with pytest.raises(bench_gpus.BenchProcessError, match="scale"):
        bench_gpus._check_same_workload({"scale": 0.05, "shard": None}, parse(["--scale", "0.1"]))
    with pytest.raises(bench_gpus.BenchProcessError, match="shard"):
        bench_gpus._check_same_workload({"scale": 0.1, "shard": [0, 2]}, parse(["--scale", "0.1"]))
    invariant = {"scale": 0.1, "shard": [0, 1], "fast": {"invariant": True}}
    bench_gpus._check_same_workload(invariant, parse(["--scale", "0.1"]))
    with pytest.raises(bench_gpus.BenchProcessError, match="batch-invariant mode, this run the other"):
        bench_gpus._check_same_workload(invariant, parse(["--scale", "0.1", "--throughput-mode"]))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(bench_gpus.BenchProcessError, match="broken.json"):
        bench_gpus._read_report(broken)


def test_without_enough_gpus_or_with_an_unknown_launcher_it_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpus.main(parse(["--gpus", "2"])) == 2
    assert "needs 2 CUDA devices" in capsys.readouterr().err
    assert bench_gpus.main(parse(["--launchers", "xdist,mpi"])) == 2
    assert "--launchers 'xdist,mpi': choose from xdist, torchrun" in capsys.readouterr().err


def test_bench_refuses_torchrun_outside_torchrun_and_a_barrier_without_shard(capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert bench.main(parser.parse_args(["--tiny-cpu", "--paths", "fast", "--torchrun"])) == 2
    assert "--torchrun needs torchrun's environment" in capsys.readouterr().err
    assert bench.main(parser.parse_args(["--tiny-cpu", "--paths", "fast", "--barrier", "b"])) == 2
    assert "--barrier needs --shard i/n" in capsys.readouterr().err


def test_the_time_split_is_consecutive_parts_of_the_process_time():
    split = measure.time_split({"launched": 100.0, "ready": 112.5, "warm": 120.0, "timed": 150.0, "met": 151.25})
    assert {k: split[k] for k in ("startup", "warmup", "timed", "barrier", "total")} == {
        "startup": 12.5, "warmup": 7.5, "timed": 30.0, "barrier": 1.25, "total": 51.25}


@pytest.mark.slow
def test_whole_harness_on_the_tiny_model_with_both_launchers(tmp_path, capsys):
    out = tmp_path / "gpus.json"
    args = parse(["--tiny-cpu", "--gpus", "2", "--scale", "0.001", "--max-output-tokens", "6",
                  "--warmup-rows", "2", "--out", str(out)])
    assert bench_gpus.main(args) == 0
    report = json.loads(out.read_text())
    assert report["gpus"] == 2 and list(report["launchers"]) == ["xdist", "torchrun"]
    one_tokens = bench_gpus.read_tokens(Path(json.loads(Path(report["one_gpu"]["report"]).read_text())
                                             ["fast"]["tokens_file"]))
    for launcher, part in report["launchers"].items():
        ranks = part["ranks"]
        assert len(ranks) == 2 and part["gpus"] == 2
        # the two shards together ran exactly the one-process workload, and gave its tokens
        assert sum(r["rows"] for r in ranks) == report["one_gpu"]["rows"]
        assert sum(r["images"] for r in ranks) == report["one_gpu"]["images"]
        rep = part["reproducibility"]
        assert rep["measured"] and rep["identical"] == rep["rows"] == len(one_tokens) > 0
        assert part["targets"]["identical_predictions"]["met"] is True
        for rank in ranks:  # the split adds up, and fits in the launch as its launcher timed it
            split = rank["split"]
            parts = split["startup"] + split["warmup"] + split["timed"] + split["barrier"]
            assert parts == pytest.approx(split["total"], abs=1e-6) and min(split.values()) >= 0
            assert 0 < split["total"] <= rank["process_wall_seconds"] <= part["wall_seconds"]
        assert part["slowest"]["split"] in [r["split"] for r in ranks]
        assert part["efficiency"]["projected"] == pytest.approx(part["speedup"]["projected"] / 2)
        assert part["targets"]["efficiency"]["met"] in (True, False)
        # one shard's tokens altered: the check fails, naming the row
        reports = [json.loads(Path(r["report"]).read_text()) for r in ranks]
        tokens = [bench_gpus.read_tokens(Path(r["fast"]["tokens_file"])) for r in reports]
        row = next(iter(tokens[1]))
        tokens[1][row] = [tokens[1][row][0] + 1, *tokens[1][row][1:]]
        baseline = json.loads(Path(report["one_gpu"]["report"]).read_text())
        again = bench_gpus.summarise(baseline, {}, {launcher: [(r, {"gpu": str(i)}, t) for i, (r, t)
                                                               in enumerate(zip(reports, tokens))]},
                                     args, bench_gpus.load_targets(), one_tokens)["launchers"][launcher]
        assert again["reproducibility"]["identical"] == len(one_tokens) - 1
        assert again["reproducibility"]["first_differences"] == [
            {"run": row[0], "key": row[1], "shard": 1, "first_differing_token": 0}]
        assert again["targets"]["identical_predictions"]["met"] is False
    text = capsys.readouterr().out
    assert "xdist on 2 GPUs" in text and "torchrun on 2 GPUs" in text and "identical_predictions" in text


def test_a_process_started_by_hand_counts_from_its_own_start():
    import subprocess
    import sys

    code = ("import time; time.sleep(0.6); from lavender_checks.speed.bench import process_started; "
            "print(time.time() - process_started())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.6 <= age < 10

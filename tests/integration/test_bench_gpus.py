"""``lavender-checks bench-gpus``: the processes it starts, the speed-up arithmetic, and a
whole run of the harness on the tiny model on CPU. Scaling itself is measured on GPUs."""

from __future__ import annotations

import argparse
import json

import pytest

from lavender_checks.speed import gpus as bench_gpus


def parse(argv):
    parser = argparse.ArgumentParser()
    bench_gpus.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_process_gets_the_workload_options_and_its_shard(tmp_path):
    args = parse(["--scale", "0.2", "--slots", "64", "--vision-attention", "transformers", "--no-graphs"])
    argv = bench_gpus._child_argv(args, (1, 2), tmp_path / "r.json")
    assert argv[argv.index("--shard") + 1] == "1/2" and argv[argv.index("--paths") + 1] == "fast"
    assert argv[argv.index("--scale") + 1] == "0.2" and argv[argv.index("--slots") + 1] == "64"
    assert argv[argv.index("--vision-attention") + 1] == "transformers" and "--no-graphs" in argv
    assert "--tiny-cpu" not in argv


def fake_report(build, warmup, measured, projected, rows, device="NVIDIA H100 80GB HBM3"):
    return {"device": device, "model": {"build_seconds": build},
            "fast": {"warmup": {"seconds": warmup}, "stats": {"images": 3}, "peak_gib": 40.0,
                     "projection": {"seconds": projected, "measured": {"seconds": measured, "rows": rows}}}}


def test_the_gate_on_n_gpus_takes_as_long_as_its_slowest_process():
    one = fake_report(10, 5, 185, 1985, 100)
    shards = [(fake_report(10, 5, 95, 995, 50), {"gpu": "0", "wall_seconds": 120, "report": "a"}),
              (fake_report(12, 5, 100, 1000, 50), {"gpu": "1", "wall_seconds": 125, "report": "b"})]
    report = bench_gpus.summarise(one, {"wall_seconds": 210, "report": "one"}, shards, parse(["--scale", "0.1"]))
    assert report["speedup"]["measured"] == pytest.approx(200 / 117)
    assert report["speedup"]["projected"] == pytest.approx(2000 / 1017)
    assert report["target"] == {"speedup": ">= 1.8", "met": True}
    assert report["full_gate_minutes"]["2_gpus"] == pytest.approx(1017 / 60)
    slower = [(fake_report(10, 5, 95, 995, 50), shards[0][1]), (fake_report(10, 5, 150, 1500, 50), shards[1][1])]
    assert bench_gpus.summarise(one, {}, slower, parse([]))["target"]["met"] is False


def test_a_baseline_of_another_workload_is_refused(tmp_path):
    with pytest.raises(bench_gpus.BenchProcessError, match="scale"):
        bench_gpus._check_same_workload({"scale": 0.05, "shard": None}, parse(["--scale", "0.1"]))
    with pytest.raises(bench_gpus.BenchProcessError, match="shard"):
        bench_gpus._check_same_workload({"scale": 0.1, "shard": [0, 2]}, parse(["--scale", "0.1"]))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(bench_gpus.BenchProcessError, match="broken.json"):
        bench_gpus._read_report(broken)


def test_without_enough_gpus_it_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpus.main(parse(["--gpus", "2"])) == 2
    assert "needs 2 CUDA devices" in capsys.readouterr().err


@pytest.mark.slow
def test_whole_harness_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "gpus.json"
    code = bench_gpus.main(parse(["--tiny-cpu", "--gpus", "2", "--scale", "0.001", "--max-output-tokens", "6",
                                  "--warmup-rows", "2", "--out", str(out)]))
    assert code == 0
    report = json.loads(out.read_text())
    assert report["gpus"] == 2 and len(report["shards"]) == 2
    # the two shards together ran exactly the one-process workload
    assert sum(s["rows"] for s in report["shards"]) == report["one_gpu"]["rows"]
    assert sum(s["images"] for s in report["shards"]) == report["one_gpu"]["images"]
    assert report["speedup"]["measured"] > 0 and report["target"]["met"] in (True, False)
    assert "speed-up on 2 GPUs" in capsys.readouterr().out

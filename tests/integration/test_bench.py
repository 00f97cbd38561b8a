"""The speed benchmark's harness: the stated workload, the synthetic requests, the
projections and the card's limit, and a whole run on the tiny model on CPU. Speed itself is
measured by ``lavender-checks bench`` on a GPU, never asserted here."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.speed import bench, measure, project
from lavender_checks.speed import workload as workloads


def write(tmp_path, text: str):
    path = tmp_path / "workload.toml"
    path.write_text(text)
    return path


GOOD = """
seed = 1
variants = ["base", "lavender"]
[adapter]
r = 8
lora_alpha = 32
target_modules = ["q_proj", "v_proj"]
[targets]
gate_minutes = 20.0
speedup = 30.0
limit_ratio = 3.0
peak_gib = 70.0
equivalence = 0.99
[benchmarks.MME]
rows = 10
images = 5
image_first = true
max_new_tokens = 128
tiles = [[0.5, 1], [0.5, 2]]
prompt_tokens = [[1.0, 24, 36]]
output_tokens = [[0.8, 2, 4], [0.2, 5, 128]]
"""


def test_stated_workload_matches_the_benchmarks():
    workload = workloads.load_workload()
    assert [b.name for b in workload.benchmarks] == list(workloads.BENCHMARK_ORDER)
    for load in workload.benchmarks:
        assert load.rows == get_benchmark(load.name).spec.rows
    counts = {b.name: (b.rows, b.images) for b in workload.benchmarks}
    assert counts == {"DocVQA_VAL": (5349, 1286), "ChartQA_TEST": (2500, 2500),
                      "MMBench_DEV_EN": (4329, 1164), "MME": (2374, 1187)}
    assert workload.adapter == {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("change, message", [
    (("prompt_tokens = [[1.0, 24, 36]]", "prompt_tokens = [[0.7, 24, 36]]"), "prompt_tokens: bucket weights must sum to 1"),
    (("[0.2, 5, 128]", "[0.2, 5, 129]"), r"output_tokens\[1\].*exceeds max_new_tokens 128"),
    (("images = 5", "images = 11"), "images <= rows"),
    (("tiles = [[0.5, 1], [0.5, 2]]", "tiles = [[0.5, 1], [0.5, 5]]"), r"tiles\[1\]"),
    (("rows = 10\n", ""), r"\[benchmarks.MME\] has no 'rows'"),
    (("lora_alpha = 32", "lora_alpha = 'x'"), r"\[adapter\] lora_alpha"),
])
def test_bad_workload_names_file_and_key(tmp_path, change, message):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(workloads.WorkloadError, match=message) as caught:
        workloads.load_workload(path)
    assert str(path) in str(caught.value)


def test_rows_are_deterministic_grouped_and_scaled(tmp_path):
    load = workloads.load_workload(write(tmp_path, GOOD)).benchmarks[0]
    rows = workloads.sample_rows(load, seed=1)
    assert rows == workloads.sample_rows(load, seed=1)
    assert rows != workloads.sample_rows(load, seed=2)
    assert len(rows) == 10 and [r.image_id for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(len({r.tiles for r in rows if r.image_id == i}) == 1 for i in range(5))
    assert all(2 <= r.output_tokens <= 128 and 24 <= r.prompt_tokens <= 36 for r in rows)
    full = workloads.load_workload().benchmarks[2]  # MMBench: 4,329 rows on 1,164 images
    scaled = workloads.sample_rows(full, seed=7, scale=0.1)
    assert len(scaled) == 433 and len({r.image_id for r in scaled}) == 116
    per_image = [sum(r.image_id == i for r in scaled) for i in range(116)]
    assert set(per_image) == {3, 4}


def test_buckets_follow_their_weights():
    buckets = workloads.Buckets(((0.75, 2, 6), (0.25, 100, 100)))
    rng = random.Random(0)
    draws = [buckets.draw(rng) for _ in range(4000)]
    assert 0.72 < sum(d <= 6 for d in draws) / len(draws) < 0.78
    assert set(draws) <= {2, 3, 4, 5, 6, 100}
    assert buckets.mean() == pytest.approx(0.75 * 4 + 25)


@pytest.fixture(scope="module")
def processor():
    from lavender_checks.synthetic.tiny import build_tiny_processor

    return build_tiny_processor()


def test_requests_hit_their_lengths_and_tiles(processor):
    from lavender_checks.engines.fast.inputs import encode_image, encode_text, image_digest

    maker = workloads.RequestMaker(processor, seed=3)
    rows = [workloads.BenchRow("DocVQA_VAL", f"k{i}", image_id=i % 4, tiles=1 + i % 4, prompt_tokens=target,
                           output_tokens=9, image_first=False)
            for i, target in enumerate([20, 120, 150, 200])]
    rows.append(workloads.BenchRow("MME", "m", image_id=0, tiles=2, prompt_tokens=30, output_tokens=3, image_first=True))
    requests, lengths = maker.requests(rows, cap=5)
    shortest = lengths["k0"]  # the DocVQA template with an empty question: 20 is below it
    assert shortest > 20 and "Question: <|image|>" in requests[0].text
    for row, request in zip(rows, requests):
        assert len(encode_text(processor, request.text, True)) == lengths[row.key]
        if row.key != "k0":
            assert abs(lengths[row.key] - row.prompt_tokens) <= 2
        assert request.max_new_tokens == min(5, row.output_tokens)
        image = request.images[0]()
        assert encode_image(processor, image).num_tiles == row.tiles
    assert requests[-1].text.count("<|image|>") == 1
    # every image id gets its own pixels, and the same id the same pixels
    digests = [image_digest(maker.image_loader(workloads.BenchRow("MME", "x", i, 2, 30, 3, True))()) for i in range(6)]
    assert len(set(digests)) == 6
    again = image_digest(maker.image_loader(workloads.BenchRow("MME", "y", 0, 2, 30, 3, True))())
    assert again == digests[0]


def test_projections_and_card_limit_arithmetic():
    per_bench = {"MME": {"rows": 4, "prefill": 2.0, "decode": 3.0, "decode_tokens": 30, "seconds": 5.0, "new_tokens": 34}}
    totals = {"MME": {"rows": 100, "images": 50, "new_tokens": 500, "prompt_tokens": 3000}}
    a = project.project_one_sample(per_bench, totals, variants=2)
    # per variant: 100 rows x 0.5 s prefill + (500 - 100) tokens x 0.1 s
    assert a["seconds"] == pytest.approx(2 * (100 * 0.5 + 400 * 0.1))
    assert a["samples_per_s"] == pytest.approx(200 / a["seconds"])

    per_run = {"base/MME": {"rows": 10, "full_rows": 100, "seconds": 3.0, "capture_seconds": 1.0, "new_tokens": 50},
               "lavender/MME": {"rows": 10, "full_rows": 100, "seconds": 2.0, "capture_seconds": 0.0, "new_tokens": 50}}
    fast = project.project_fast(per_run)
    assert fast["seconds"] == pytest.approx((2.0 * 10 + 2.0 * 10) + 1.0)
    assert fast["new_tokens"] == pytest.approx(1000)
    # 400 rows ran in 100 s, 60 s of it decode (1 s of graph capture, 9 s of drain with 64
    # rows); 4,000 rows in the full run, one call each: the steady decode (50 s for 336 rows)
    # scales to 3,936 rows, the drain comes once, the rest scales by rows.
    run = {"rows": 400, "full_rows": 4000, "seconds": 100.0, "capture_seconds": 1.0, "decode_seconds": 60.0,
           "drain_seconds": 9.0, "drain_rows": 64, "slots": 64, "chunks": 1, "full_chunks": 1, "new_tokens": 9}
    decode, method = project.project_decode(run)
    assert decode == pytest.approx(50.0 * 3936 / 336 + 9.0) and method.startswith("steady")
    fast = project.project_fast({"base/MME": run}, {"capture_seconds": 2.0})
    assert fast["seconds"] == pytest.approx(40.0 * 10 + decode + 1.0 + 2.0)
    # a run whose steady phase is shorter than one batch is scaled by rows whole, and says so
    small = dict(run, rows=100, full_rows=1000, drain_rows=64)
    decode, method = project.project_decode(small)
    assert decode == pytest.approx(59.0 * 10) and method.startswith("row-scaled")

    costs = {"decode_step_weight_bytes": 1e9, "image_flops_per_image": 1e12, "prefill_flops_per_token": 1e9,
             "cross_kv_bytes_per_row": 1e6}
    card = {"bandwidth_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}
    limit = project.card_limit(totals, costs, card, slots=64, variants=2, vision_per_variant=True)
    assert limit["decode_steps"] == 2 * 8  # ceil(500 / 64) per variant
    assert limit["limit_seconds"] == pytest.approx(16 * 1e-3 + 100 * 1e-2)
    shared = project.card_limit(totals, costs, card, slots=64, variants=2, vision_per_variant=False)
    assert shared["images"] == 50


class RecordingEngine:
    """Stands in for FastGenerator: records the chunks it is handed."""

    def __init__(self):
        import torch

        from lavender_checks.engines.fast.stats import FastGenStats

        self.device = torch.device("cpu")
        self.calls = []
        self.last_stats = FastGenStats()

    def generate_ids(self, requests, variant):
        self.calls.append([r.image_key for r in requests])
        return {r.key: [1] for r in requests}


def test_the_fast_path_gets_chunks_that_never_split_an_image():
    from lavender_checks.engines.request import GenerationRequest

    # 3 rows per image, chunks of 4 rows: cutting by position would split images 1, 2, 4, 5
    requests = [GenerationRequest(key=f"r{i}", text="t", images=[None], max_new_tokens=2, image_key=f"img{i // 3}")
                for i in range(18)]
    engine = RecordingEngine()
    result = measure.run_fast(engine, requests, "base", chunk_rows=4)
    assert len(result["ids"]) == 18 and result["chunks"] == len(engine.calls) == 6
    owners = {}
    for n, call in enumerate(engine.calls):
        for key in call:
            assert owners.setdefault(key, n) == n, f"image {key} handed over in two chunks"


def test_shards_split_whole_images_evenly():
    load = workloads.load_workload().benchmarks[0]  # DocVQA: 4 or 5 questions per page
    rows = workloads.sample_rows(load, seed=3, scale=0.05)
    shards = [workloads.shard_rows(rows, (i, 3)) for i in range(3)]
    keys = [[r.key for r in shard] for shard in shards]
    assert sorted(k for shard in keys for k in shard) == sorted(r.key for r in rows)
    images = [{r.image_id for r in shard} for shard in shards]
    assert not (images[0] & images[1]) and not (images[1] & images[2]) and not (images[0] & images[2])
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 5
    assert workloads.shard_rows(rows, (0, 1)) == rows
    assert bench.parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "a/b", "1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_shard(bad)



def test_model_costs_count_the_tiny_model():
    import torch

    from lavender_checks.synthetic.tiny import build_tiny_model, build_tiny_processor

    model = build_tiny_model(build_tiny_processor().tokenizer)
    costs = project.model_costs(model)
    text = model.model.language_model
    expected = sum(p.numel() for n, p in text.named_parameters() if not n.startswith("embed_tokens"))
    expected += model.lm_head.weight.numel()
    assert costs["decode_step_weight_bytes"] == 4 * expected  # float32
    assert costs["image_flops_per_image"] > costs["vision_tower_flops_per_image"] > 0
    assert model.lm_head.weight.dtype == torch.float32


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_without_cuda_it_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(parse([])) == 2
    assert "CUDA is required" in capsys.readouterr().err


def test_bad_options_are_refused(capsys):
    assert bench.main(parse(["--tiny-cpu", "--paths", "a,warp"])) == 2
    assert "warp" in capsys.readouterr().err
    assert bench.main(parse(["--tiny-cpu", "--scale", "0"])) == 2
    capsys.readouterr()
    assert bench.main(parse(["--tiny-cpu", "--memory-share", "1.5"])) == 2
    assert "--memory-share must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert bench.main(parse(["--tiny-cpu", "--decode-key-block", "100"])) == 2
    assert "--decode-key-block must divide the decode cache's 1024 positions" in capsys.readouterr().err


@pytest.mark.slow
def test_whole_harness_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(parse(["--tiny-cpu", "--scale", "0.002", "--a-rows", "1", "--a-max-new-tokens", "5",
                             "--max-output-tokens", "12", "--paths", "a,fast,plain", "--out", str(out)]))
    assert code == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "one-sample loop (a)" in printed and "fast runner (b)" in printed
    assert report["device"] == "cpu" and "card" not in report
    # the correctness sample: on CPU in float32 the fast runner is exact, with either vision attention
    assert report["equivalence"]["sequences"] == 8 and report["equivalence"]["fast"]["fraction"] == 1.0
    assert report["equivalence"]["fast_hf_vision"]["fraction"] == 1.0
    assert report["fast"]["warmup"]["seconds"] > 0
    runs = report["fast"]["per_run"]
    assert sorted(runs) == sorted(f"{v}/{b}" for v in ("base", "lavender") for b in workloads.BENCHMARK_ORDER)
    for run in runs.values():
        assert run["images"] == run["distinct_image_ids"]
        assert run["chunks"] == run["full_chunks"] == 1  # a whole benchmark is one call
        assert 0 < run["drain_seconds"] <= run["stats"]["seconds"]["decode"]
        assert run["new_tokens"] > 0 and run["seconds"] > 0
    figures = report["figures"]
    assert figures["fast_projected_minutes"] > 0 and figures["a_projected_minutes"] > 0
    assert figures["limit_ratio"] is None and figures["targets"]["limit_ratio"]["met"] is None  # no card on CPU
    # where the projected gate goes: the phases add up to the projection
    breakdown = figures["breakdown"]
    assert sum(part["seconds"] for part in breakdown.values()) == pytest.approx(figures["fast_projected_minutes"] * 60)
    assert breakdown["vision"]["seconds"] > 0 and breakdown["decode"]["floor_seconds"] is None
    assert any("capped at 12" in note for note in report["notes"])
    assert set(report["plain"]["per_benchmark"]) == set(workloads.BENCHMARK_ORDER)


@pytest.mark.slow
def test_repro_path_on_the_tiny_model(tmp_path, capsys):
    """The repro path's matrix on the tiny pair (float32 on CPU): every configuration is counted
    against the rows run alone, the kills really happen mid-run, and both modes are projected."""
    out = tmp_path / "repro.json"
    code = bench.main(parse(["--tiny-cpu", "--scale", "0.002", "--paths", "repro", "--repro-rows", "9",
                             "--repro-max-new", "6", "--max-output-tokens", "6", "--warmup-rows", "1",
                             "--out", str(out)]))
    assert code == 0
    repro = json.loads(out.read_text())["repro"]
    inv = repro["invariant"]
    assert inv["rows"] == 36 and inv["sequences"] == 72
    assert set(inv["configurations"]) == {"default", "reversed", "shuffled", "shards 0/2 + 1/2", "shards 0/4 .. 3/4",
                                          "slots 16", "slots 64", "killed 3x and resumed (16 slots)"}
    assert all(c["identical"] == c["sequences"] == 72 for c in inv["configurations"].values())
    assert inv["all_identical"]
    assert all(0 < point < inv["rows"] for points in inv["kill_points"].values() for point in points)
    assert any(inv["kill_points"].values())
    assert set(repro["projected_gate_minutes"]) == {"invariant", "throughput"}
    assert repro["fast"]["invariant"]["invariant"] and not repro["fast"]["throughput"]["invariant"]
    assert repro["environment"]["torch"] and "throughput mode" in capsys.readouterr().out


def test_breakdown_script_explains_a_saved_report(tmp_path, capsys):
    import runpy

    from lavender_checks import REPO_ROOT

    script = runpy.run_path(str(REPO_ROOT / "scripts" / "bench_breakdown.py"))
    run = {"rows": 10, "full_rows": 100, "seconds": 10.0, "capture_seconds": 0.0, "decode_seconds": 4.0,
           "drain_seconds": 0.0, "drain_rows": 0, "slots": 4, "new_tokens": 5,
           "stats": {"seconds": {"vision": 5.0, "prefill": 1.0, "prep_wait": 0.0}}}
    fast = {"per_run": {"base/MME": run}}
    fast["projection"] = project.project_fast(fast["per_run"])
    limit = {"image_seconds": 25.0, "prefill_seconds": 5.0, "decode_seconds": 10.0, "cross_kv_read_seconds": 10.0}
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"device": "card", "scale": 0.1, "fast": fast, "figures": {"card_limit": limit}}))
    assert script["main"]([str(report), "--json", str(tmp_path / "b.json")]) == 0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["breakdown"]["vision"]["seconds"] == pytest.approx(50.0)
    assert saved["breakdown"]["vision"]["over_floor"] == pytest.approx(2.0)
    assert saved["breakdown"]["decode"]["seconds"] == pytest.approx(40.0)  # steady phase x 10, no drain
    assert "vision" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert script["main"]([str(tmp_path / "bad.json")]) == 2


def test_rounds_path_runs_the_fast_rows_again_in_stop_early_rounds(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(parse(["--tiny-cpu", "--scale", "0.004", "--max-output-tokens", "6", "--warmup-rows", "2",
                             "--paths", "fast,rounds", "--out", str(out)]))
    assert code == 0
    report = json.loads(out.read_text())
    rounds, fast = report["rounds"], report["fast"]
    rows_per_variant = sum(run["rows"] for name, run in fast["per_run"].items() if name.startswith("base/"))
    per_variant = {}
    for call in rounds["per_round"]:
        per_variant[call["variant"]] = per_variant.get(call["variant"], 0) + call["rows"]
    assert per_variant == {"base": rows_per_variant, "lavender": rows_per_variant}  # every row once per variant
    assert rounds["calls"] == len(rounds["per_round"]) and rounds["fast_calls"] == len(fast["per_run"])
    assert rounds["extra_seconds"] == pytest.approx(rounds["seconds"] - rounds["fast_seconds"])
    assert rounds["overhead_share"] == pytest.approx(rounds["extra_seconds"] / fast["projection"]["seconds"])
    assert "--stop-early rounds, a run that goes to the end" in capsys.readouterr().out

"""The main job: configuration, options, the data flow, shards and their barrier, the command.

Most tests drive the real pipeline (mini benchmarks, runner, store, scorers, gate) with a
stand-in model pair and a registered stand-in engine that answers instantly and counts what
it was asked; the end-to-end
test of ``lavender-checks run`` loads the real tiny pair.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from lavender_checks import FIXTURES, REPO_ROOT, cli
from lavender_checks.run import pipeline
from lavender_checks.benchmarks import benchmark_names
from lavender_checks.engines import register_engine
from lavender_checks.gate.verdicts import load_reference
from lavender_checks.run.pipeline import RunConfig, RunInputError, ShardBarrier

MINI = FIXTURES / "lmudata-mini"


class StandInProcessor:
    """The one processor method the prompt builder uses."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        parts = [p.get("text", "<|image|>") for p in messages[0]["content"]]
        return "<user>" + "".join(parts) + "<assistant>"


class StandInPair:
    """A ModelPair stand-in: the processor and fingerprints a run reads. Its engine
    (``StandInEngine``) answers with ``answer`` and records every request it generated in
    ``ledger`` (shared between pairs through ``ledger``)."""

    def __init__(self, ledger: list | None = None, fail_on: str | None = None, answer=None):
        self.processor = StandInProcessor()
        self.base_fingerprint = "b" * 64
        self.adapter_fingerprint = "a" * 64
        self.ledger = ledger if ledger is not None else []
        self.fail_on = fail_on
        # "Yes" for base, the row's key for Lavender
        self.answer = answer or (lambda request, variant: "Yes" if variant == "base" else f"answer {request.key}")
        self.lock = threading.Lock()

    def describe(self):
        return {"stand_in": True}


class StandInEngine:
    """The engine "stand-in": answers at once, in batches of ``batch_size`` rows."""

    name = "stand-in"

    def __init__(self, pair: StandInPair, *, batch_size: int = 8, **_):
        self.pair, self.batch_size = pair, batch_size

    def plan(self, keys, image_key_of):
        return [list(keys[i:i + self.batch_size]) for i in range(0, len(keys), self.batch_size)]

    def generate(self, requests, variant, on_finish=None):
        if self.pair.fail_on == variant:
            raise RuntimeError("CUDA out of memory (stand-in)")
        out = {r.key: self.pair.answer(r, variant) for r in requests}
        with self.pair.lock:
            self.pair.ledger.extend((variant, r.key, r.text) for r in requests)
        if on_finish is not None:
            on_finish(list(out.items()))
        return out

    def describe(self):
        return {"name": self.name}


register_engine(StandInEngine.name, StandInEngine)


def stand_in_config(tmp_path: Path, **options) -> RunConfig:
    options.setdefault("store", tmp_path / "store")
    options.setdefault("engine", StandInEngine.name)
    return RunConfig(**options)


# ---------------------------------------------------------------------------- configuration


def test_defaults_are_the_tiny_pair_on_the_mini_benchmarks():
    config = RunConfig()
    assert config.builtin_model and config.benchmarks == tuple(benchmark_names())
    assert config.lmu_root() == MINI
    assert config.reference_path() == pipeline.TINY_REFERENCE
    assert config.profile == "seed-report" and config.gate_mode == "reproduce"
    assert config.label() == "tiny-mini"
    assert RunConfig(device="cuda:1").label() == "tiny-mini-cuda"  # other hardware, own snapshots


def test_real_weights_default_to_lmudata_and_the_seed_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("LMUData", str(tmp_path))
    config = RunConfig(base_model=tmp_path / "base", lora=tmp_path / "lavender-lora", limit=50)
    assert config.lmu_root() == tmp_path
    assert config.reference_path() == pipeline.SEED_REFERENCE
    assert config.label() == "base+lavender-lora-lmudata-limit50"
    assert RunConfig(base_model=tmp_path / "b", lora=tmp_path / "l", device="cuda:0").label() == "b+l-lmudata"
    assert RunConfig(from_vlmeval=tmp_path).reference_path() == pipeline.SEED_REFERENCE


@pytest.mark.parametrize("options, message", [
    (dict(lora=Path("x")), "--base-model and --lora go together"),
    (dict(base_model=Path("x")), "--base-model and --lora go together"),
    (dict(base_model=Path("x"), lora=Path("y"), from_vlmeval=Path("z")), "loads no model"),
    (dict(limit=5, fraction=0.5), "give one of them"),
    (dict(limit=0), "--limit must be at least 1"),
    (dict(fraction=1.5), r"--fraction must be in \(0, 1\]"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(benchmarks=("MME", "TextVQA")), "unknown benchmark.*TextVQA"),
    (dict(gate_mode="loose"), "unknown gate mode"),
    (dict(from_vlmeval=Path("z"), base_name="m", lavender_name="m"), "compared with itself"),
])
def test_bad_configurations_are_refused(options, message):
    with pytest.raises(RunInputError, match=message):
        RunConfig(**options)


def test_cli_and_pytest_declare_the_same_options(pytestconfig):
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    cli_flags = {flag for action in parser._actions for flag in action.option_strings}
    pytest_flags = {flag for flag, _ in (*pipeline.RUN_OPTIONS, *pipeline.REPORT_OPTIONS)}
    assert pytest_flags <= cli_flags
    assert cli_flags - pytest_flags == {"-h", "--help", "--quiet", "--write-reference", "--force"}
    # conftest.py registered them with pytest: the defaults read back as a RunConfig.
    assert pipeline.config_from_options(pytestconfig.getoption).profile == "seed-report"
    args = parser.parse_args(["--benchmark", "MME", "--benchmark", "ChartQA_TEST", "--gate",
                              "no-regression", "--limit", "3"])
    config = pipeline.config_from_options(lambda dest: getattr(args, dest))
    assert config.benchmarks == ("MME", "ChartQA_TEST")
    assert (config.gate_mode, config.limit) == ("no-regression", 3)


def test_collection_imports_no_torch():
    """The controller must not touch CUDA: collecting the gate loads no model library."""
    code = ("import sys, pytest; pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', "
            "'--snapshot-warn-unused', 'tests/benchmarks']); "
            "print('LOADED', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "test_gain[ChartQA_TEST-test_human]" in done.stdout
    assert "LOADED []" in done.stdout, done.stdout + done.stderr


def test_gpu_pinning_of_xdist_workers(monkeypatch):
    from lavender_checks.run import pytest_plugin as conftest

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert conftest.pytest_xdist_auto_num_workers(None) == 2  # -n auto: one worker per GPU
    for worker, gpu in (("gw0", "4"), ("gw1", "6"), ("gw2", "4")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        conftest._pin_worker()
        assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 3))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert conftest.pytest_xdist_auto_num_workers(None) is None  # no GPU: xdist's default


# ---------------------------------------------------------------------------- the data flow


def test_collect_scores_both_variants_of_every_benchmark(tmp_path):
    pair = StandInPair()
    run = pipeline.collect_results(stand_in_config(tmp_path), pair=pair, progress=False)
    assert run.missing == {}
    rows = {"DocVQA_VAL": 24, "ChartQA_TEST": 24, "MMBench_DEV_EN": 66, "MME": 56}
    for benchmark, count in rows.items():
        base, lavender = run.results[benchmark]["base"], run.results[benchmark]["lavender"]
        assert len(base.samples) == len(lavender.samples) == count
        assert run.metadata["predictions"][benchmark]["base"]["generated"] == count
    # Base said "Yes" everywhere: MME's Yes questions right, the No ones wrong.
    mme = run.results["MME"]["base"].samples
    assert list(mme["extracted"].unique()) == ["Yes"]
    assert run.metadata["fingerprints"] == {"base": "b" * 64, "adapter": "a" * 64}
    assert run.metadata["data"]["MME"]["synthetic"] is True
    assert run.metadata["data"]["MME"]["md5_matches"] is False
    assert run.metadata["profile"]["name"] == "seed-report"
    assert run.metadata["versions"]["pandas"]
    assert len(pair.ledger) == 2 * sum(rows.values())


def test_a_second_run_reads_the_store_and_generates_nothing(tmp_path):
    config = stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",))
    first = pipeline.collect_results(config, pair=StandInPair(), progress=False)
    again = StandInPair()
    second = pipeline.collect_results(config, pair=again, progress=False)
    assert again.ledger == []
    assert second.metadata["predictions"]["ChartQA_TEST"]["lavender"]["reused"] == 24
    assert second.predictions == first.predictions
    assert second.results["ChartQA_TEST"]["lavender"].metrics == first.results["ChartQA_TEST"]["lavender"].metrics


def test_the_xlsx_round_trip_is_applied_before_scoring(tmp_path):
    says_none = StandInPair(answer=lambda request, variant: "None")  # a pandas NA token: VLMEvalKit reads 'nan'
    run = pipeline.collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)),
                                   pair=says_none, progress=False)
    samples = run.results["ChartQA_TEST"]["base"].samples
    assert set(samples["prediction"]) == {"nan"}
    assert set(run.predictions["ChartQA_TEST"]["base"].values()) == {"None"}  # as generated


def test_a_benchmark_without_its_tsv_is_missing_and_the_others_run(tmp_path):
    lmu = tmp_path / "LMUData"
    shutil.copytree(MINI, lmu)
    (lmu / "MME.tsv").unlink()
    config = stand_in_config(tmp_path, lmu_data=lmu, reference=pipeline.SEED_REFERENCE)
    run = pipeline.collect_results(config, pair=StandInPair(), progress=False)
    assert run.missing == {"MME": f"{lmu / 'MME.tsv'} does not exist"}
    assert run.results["MME"] == {"base": None, "lavender": None}
    assert all(run.results[b]["lavender"] is not None for b in ("DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN"))
    outcome = pipeline.judge_run(run)
    statuses = {v.status for v in outcome.verdicts if v.benchmark == "MME"}
    assert statuses == {"missing"}
    assert {v.status for v in outcome.verdicts if v.benchmark != "MME"} <= {"pass", "fail"}


def test_no_tsv_at_all_is_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunInputError, match="none of the benchmark TSVs is in"):
        pipeline.collect_results(stand_in_config(tmp_path, lmu_data=tmp_path / "empty"),
                                 pair=StandInPair(), progress=False)
    with pytest.raises(RunInputError, match="does not exist"):
        pipeline.collect_results(stand_in_config(tmp_path, lmu_data=tmp_path / "absent"),
                                 pair=StandInPair(), progress=False)


def test_limit_subsets_both_variants_alike(tmp_path):
    run = pipeline.collect_results(stand_in_config(tmp_path, benchmarks=("MMBench_DEV_EN",), limit=20),
                                   pair=StandInPair(), progress=False)
    base = run.results["MMBench_DEV_EN"]["base"]
    assert len(base.units) == 20
    assert list(base.units["unit"]) == list(run.results["MMBench_DEV_EN"]["lavender"].units["unit"])


def test_a_run_recorded_as_reference_gates_itself(tmp_path):
    run = pipeline.collect_results(stand_in_config(tmp_path), pair=StandInPair(), progress=False)
    path = pipeline.write_reference(run, tmp_path / "own.toml", description="stand-in numbers")
    reference = load_reference(path)
    seed = load_reference(pipeline.SEED_REFERENCE)
    assert [r.id for r in reference.rows] == [r.id for r in seed.rows]
    assert reference.gate == seed.gate and reference.run["description"] == "stand-in numbers"
    assert reference.run["base_fingerprint"] == "b" * 64
    mme_total = reference.row("MME-total")
    assert mme_total.base == round(run.results["MME"]["base"].metrics["total"], 2)
    outcome = pipeline.judge_run(run, reference)
    assert outcome.passed, outcome.table()


def test_a_reference_is_not_recorded_from_a_partial_run(tmp_path):
    run = pipeline.collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)),
                                   pair=StandInPair(), progress=False)
    with pytest.raises(RunInputError, match="not measured: DocVQA_VAL-Overall base"):
        pipeline.write_reference(run, tmp_path / "own.toml")
    assert not (tmp_path / "own.toml").exists()


# ---------------------------------------------------------------------------- shards


def _shard_worker(args):
    """One pytest-xdist worker's share: shard i of n, then the union (run in its own process)."""
    config, barrier_dir, i, n = args
    pair = StandInPair()
    run = pipeline.collect_results(config, pair=pair, shard=(i, n), writer=f"gw{i}", progress=False,
                                   wait_for_shards=ShardBarrier(barrier_dir, n, f"gw{i}", poll=0.01))
    metrics = {b: {v: r.metrics for v, r in by_variant.items()} for b, by_variant in run.results.items()}
    return run.predictions, metrics, pair.ledger


def test_shards_share_the_generation_and_score_the_same_union(tmp_path):
    config = stand_in_config(tmp_path, benchmarks=("MMBench_DEV_EN", "MME"))
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("fork")) as pool:
        outcomes = list(pool.map(_shard_worker, [(config, tmp_path / "barrier", i, 3) for i in range(3)]))
    # Every row of both variants generated exactly once, across the three workers.
    ledger = [entry for _, _, generated in outcomes for entry in generated]
    assert len(ledger) == len(set(ledger)) == 2 * (66 + 56)
    single = pipeline.collect_results(stand_in_config(tmp_path / "single", benchmarks=config.benchmarks),
                                      pair=StandInPair(), progress=False)
    for predictions, metrics, _ in outcomes:
        assert predictions == single.predictions
        assert metrics == {b: {v: r.metrics for v, r in by_variant.items()}
                           for b, by_variant in single.results.items()}
    writers = {p.stem for p in (tmp_path / "store").rglob("*.jsonl")}
    assert writers <= {"gw0", "gw1", "gw2"} and writers  # each process its own file


def test_a_shard_nobody_claims_is_generated_by_a_waiting_process(tmp_path):
    ledger: list = []
    run = pipeline.collect_results(
        stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)), pair=StandInPair(ledger),
        shard=(0, 2), writer="gw0", progress=False,
        wait_for_shards=ShardBarrier(tmp_path / "barrier", 2, "gw0", poll=0.01))
    assert len(ledger) == 2 * 24 and len(run.results["ChartQA_TEST"]["base"].samples) == 24


def test_a_shard_alone_without_barrier_scores_only_its_rows(tmp_path):
    run = pipeline.collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)),
                                   pair=StandInPair(), shard=(1, 4), progress=False)
    assert len(run.results["ChartQA_TEST"]["base"].samples) == 6


def test_a_failed_shard_stops_the_others(tmp_path):
    barrier = ShardBarrier(tmp_path, 2, "gw0", poll=0.01)
    other = ShardBarrier(tmp_path, 2, "gw1")
    assert other.claim(1) and not barrier.claim(1)
    with pytest.raises(RuntimeError), other.working(1):
        raise RuntimeError("CUDA out of memory")
    assert barrier.claim(0)
    with barrier.working(0):
        pass
    with pytest.raises(pipeline.ShardFailed, match="shard 1 of 2 failed in gw1: RuntimeError: CUDA out of memory"):
        barrier.wait()


def test_a_silent_shard_times_out_with_a_clear_message(tmp_path):
    barrier = ShardBarrier(tmp_path, 2, "gw0", poll=0.01, stall_timeout=0.5)
    assert barrier.claim(0)
    with barrier.working(0):
        pass
    assert ShardBarrier(tmp_path, 2, "gw1").claim(1)  # claimed, then its process dies
    old = time.time() - 60
    os.utime(tmp_path / "1.claim", (old, old))
    with pytest.raises(pipeline.ShardTimeout, match="shard 1 of 2, claimed by gw1, has shown no sign of life"):
        barrier.wait()


def test_a_shard_nobody_ever_claims_times_out_too(tmp_path):
    barrier = ShardBarrier(tmp_path, 2, "gw0", poll=0.01, stall_timeout=0.2)
    assert barrier.claim(0)
    with barrier.working(0):
        pass
    with pytest.raises(pipeline.ShardTimeout, match="shard 1 of 2, claimed by no process"):
        barrier.wait()


def test_the_heartbeat_keeps_a_long_shard_alive(tmp_path):
    waiter = ShardBarrier(tmp_path, 1, "gw1", poll=0.01, stall_timeout=0.3)
    worker = ShardBarrier(tmp_path, 1, "gw0", heartbeat=0.05)
    assert worker.claim(0)
    done = threading.Event()

    def work():
        with worker.working(0):
            time.sleep(0.8)  # longer than the stall timeout
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    waiter.wait()
    thread.join()
    assert done.is_set()


def test_claims_are_exclusive_across_barriers(tmp_path):
    barriers = [ShardBarrier(tmp_path, 4, f"gw{i}") for i in range(4)]
    assert [b.claim("report") for b in barriers] == [True, False, False, False]
    assert barriers[3].owner_of("report") == "gw0"


# ---------------------------------------------------------------------------- the command


def test_bad_options_exit_with_status_2(tmp_path, capsys):
    assert cli.main(["run", "--limit", "3", "--fraction", "0.5"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert cli.main(["run", "--lmu-data", str(tmp_path / "absent"), "--quiet"]) == 2
    assert f"{tmp_path / 'absent'}" in capsys.readouterr().err
    assert cli.main(["run", "--reference", str(tmp_path / "none.toml"), "--store", str(tmp_path),
                        "--benchmark", "ChartQA_TEST", "--quiet"]) == 2


@pytest.mark.slow
def test_run_with_no_options_writes_a_report(tmp_path, capsys, monkeypatch):
    """``lavender-checks run`` on the built-in default: tiny pair, mini benchmarks, own reference."""
    reports = tmp_path / "reports"
    # The default store is shared with the benchmark tests: a run after theirs only reads it.
    code = cli.main(["run", "--reports", str(reports), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    report_dir = Path(out.strip().splitlines()[-1].removeprefix("report: "))
    assert report_dir.parent == reports
    for name in ("report.md", "report.json", "gains.png", "flips.jsonl"):
        assert (report_dir / name).is_file()
    assert "0 fail, 0 missing" in out

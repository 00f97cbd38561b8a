"""The main job: configuration, options, the data flow, shards and their barrier, the command.

Most tests drive the real pipeline (mini benchmarks, runner, store, scorers, gate) with a
stand-in model pair and a registered stand-in engine that answers instantly and counts what
it was asked; the end-to-end
test of ``lavender-checks run`` loads the real tiny pair.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from lavender_checks import FIXTURES, REPO_ROOT, cli
from lavender_checks.benchmarks import benchmark_names
from lavender_checks.engines import register_engine
from lavender_checks.gate.verdicts import load_reference
from lavender_checks.run import distributed, pipeline
from lavender_checks.run.collect import collect_results
from lavender_checks.run.config import (
    REPORT_OPTIONS,
    RUN_OPTIONS,
    SEED_REFERENCE,
    TINY_REFERENCE,
    RunConfig,
    RunInputError,
    config_from_options,
)
from lavender_checks.run.judge import judge_run, prune_reports
from lavender_checks.run.pair import LazyPair
from lavender_checks.run.reference import write_reference
from lavender_checks.run.shards import ShardBarrier, ShardFailed, ShardTimeout

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
    batch_invariant = True  # each answer is a function of its request

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
    assert config.reference_path() == TINY_REFERENCE
    assert config.profile == "seed-report" and config.gate_mode == "reproduce"
    assert config.label() == "tiny-mini"
    assert RunConfig(device="cuda:1").label() == "tiny-mini-cuda"  # other hardware, own snapshots


def test_real_weights_default_to_lmudata_and_the_seed_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("LMUData", str(tmp_path))
    config = RunConfig(base_model=tmp_path / "base", lora=tmp_path / "lavender-lora", limit=50)
    assert config.lmu_root() == tmp_path
    assert config.reference_path() == SEED_REFERENCE
    assert config.label() == "base+lavender-lora-lmudata-limit50"
    assert RunConfig(base_model=tmp_path / "b", lora=tmp_path / "l", device="cuda:0").label() == "b+l-lmudata"
    assert RunConfig(from_vlmeval=tmp_path).reference_path() == SEED_REFERENCE


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
    pytest_flags = {flag for flag, _ in (*RUN_OPTIONS, *REPORT_OPTIONS,
                                         *distributed.OPTIONS)}
    assert pytest_flags <= cli_flags
    assert cli_flags - pytest_flags == {"-h", "--help", "--quiet", "--write-reference", "--force"}
    # conftest.py registered them with pytest: the defaults read back as a RunConfig.
    assert config_from_options(pytestconfig.getoption).profile == "seed-report"
    assert pytestconfig.getoption("store_sharing") == "auto"
    args = parser.parse_args(["--benchmark", "MME", "--benchmark", "ChartQA_TEST", "--gate",
                              "no-regression", "--limit", "3"])
    config = config_from_options(lambda dest: getattr(args, dest))
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
    run = collect_results(stand_in_config(tmp_path), pair=pair, progress=False)
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
    first = collect_results(config, pair=StandInPair(), progress=False)
    again = StandInPair()
    second = collect_results(config, pair=again, progress=False)
    assert again.ledger == []
    assert second.metadata["predictions"]["ChartQA_TEST"]["lavender"]["reused"] == 24
    assert second.predictions == first.predictions
    assert second.results["ChartQA_TEST"]["lavender"].metrics == first.results["ChartQA_TEST"]["lavender"].metrics


def test_the_xlsx_round_trip_is_applied_before_scoring(tmp_path):
    says_none = StandInPair(answer=lambda request, variant: "None")  # a pandas NA token: VLMEvalKit reads 'nan'
    run = collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)),
                                   pair=says_none, progress=False)
    samples = run.results["ChartQA_TEST"]["base"].samples
    assert set(samples["prediction"]) == {"nan"}
    assert set(run.predictions["ChartQA_TEST"]["base"].values()) == {"None"}  # as generated


def test_a_benchmark_without_its_tsv_is_missing_and_the_others_run(tmp_path):
    lmu = tmp_path / "LMUData"
    shutil.copytree(MINI, lmu)
    (lmu / "MME.tsv").unlink()
    config = stand_in_config(tmp_path, lmu_data=lmu, reference=SEED_REFERENCE)
    run = collect_results(config, pair=StandInPair(), progress=False)
    assert run.missing == {"MME": f"{lmu / 'MME.tsv'} does not exist"}
    assert run.results["MME"] == {"base": None, "lavender": None}
    assert all(run.results[b]["lavender"] is not None for b in ("DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN"))
    outcome = judge_run(run)
    statuses = {v.status for v in outcome.verdicts if v.benchmark == "MME"}
    assert statuses == {"missing"}
    assert {v.status for v in outcome.verdicts if v.benchmark != "MME"} <= {"pass", "fail"}


def test_a_tsv_that_is_a_folder_is_said_to_be_one(tmp_path):
    lmu = tmp_path / "LMUData"
    shutil.copytree(MINI, lmu)
    (lmu / "MME.tsv").unlink()
    (lmu / "MME.tsv").mkdir()
    run = collect_results(stand_in_config(tmp_path, lmu_data=lmu, reference=SEED_REFERENCE),
                          pair=StandInPair(), progress=False)
    assert run.missing == {"MME": f"{lmu / 'MME.tsv'} is a folder, not a TSV file"}


def test_no_tsv_at_all_is_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunInputError, match="none of the benchmark TSVs is in"):
        collect_results(stand_in_config(tmp_path, lmu_data=tmp_path / "empty"),
                                 pair=StandInPair(), progress=False)
    with pytest.raises(RunInputError, match="does not exist"):
        collect_results(stand_in_config(tmp_path, lmu_data=tmp_path / "absent"),
                                 pair=StandInPair(), progress=False)


def test_limit_subsets_both_variants_alike(tmp_path):
    run = collect_results(stand_in_config(tmp_path, benchmarks=("MMBench_DEV_EN",), limit=20),
                                   pair=StandInPair(), progress=False)
    base = run.results["MMBench_DEV_EN"]["base"]
    assert len(base.units) == 20
    assert list(base.units["unit"]) == list(run.results["MMBench_DEV_EN"]["lavender"].units["unit"])


def test_a_run_recorded_as_reference_gates_itself(tmp_path):
    run = collect_results(stand_in_config(tmp_path), pair=StandInPair(), progress=False)
    path = write_reference(run, tmp_path / "own.toml", description="stand-in numbers")
    reference = load_reference(path)
    seed = load_reference(SEED_REFERENCE)
    assert [r.id for r in reference.rows] == [r.id for r in seed.rows]
    assert reference.gate == seed.gate and reference.run["description"] == "stand-in numbers"
    assert reference.run["base_fingerprint"] == "b" * 64
    mme_total = reference.row("MME-total")
    assert mme_total.base == round(run.results["MME"]["base"].metrics["total"], 2)
    outcome = judge_run(run, reference)
    assert outcome.passed, outcome.table()


def test_a_reference_is_not_recorded_from_a_partial_run(tmp_path):
    run = collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)),
                                   pair=StandInPair(), progress=False)
    with pytest.raises(RunInputError, match="not measured: DocVQA_VAL-Overall base"):
        write_reference(run, tmp_path / "own.toml")
    assert not (tmp_path / "own.toml").exists()


# ---------------------------------------------------------------------------- shards


def _shard_worker(args):
    """One pytest-xdist worker's share: shard i of n, then the union (run in its own process)."""
    config, barrier_dir, i, n = args
    pair = StandInPair()
    run = collect_results(config, pair=pair, shard=(i, n), writer=f"gw{i}", progress=False,
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
    single = collect_results(stand_in_config(tmp_path / "single", benchmarks=config.benchmarks),
                                      pair=StandInPair(), progress=False)
    for predictions, metrics, _ in outcomes:
        assert predictions == single.predictions
        assert metrics == {b: {v: r.metrics for v, r in by_variant.items()}
                           for b, by_variant in single.results.items()}
    writers = {p.stem for p in (tmp_path / "store").rglob("*.jsonl")}
    assert writers <= {"gw0", "gw1", "gw2"} and writers  # each process its own file


def test_a_shard_nobody_claims_is_generated_by_a_waiting_process(tmp_path):
    ledger: list = []
    run = collect_results(
        stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)), pair=StandInPair(ledger),
        shard=(0, 2), writer="gw0", progress=False,
        wait_for_shards=ShardBarrier(tmp_path / "barrier", 2, "gw0", poll=0.01))
    assert len(ledger) == 2 * 24 and len(run.results["ChartQA_TEST"]["base"].samples) == 24


def test_a_shard_alone_without_barrier_scores_only_its_rows(tmp_path):
    run = collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",)),
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
    with pytest.raises(ShardFailed, match="shard 1 of 2 failed in gw1: RuntimeError: CUDA out of memory"):
        barrier.wait()


def test_a_silent_shard_times_out_with_a_clear_message(tmp_path):
    barrier = ShardBarrier(tmp_path, 2, "gw0", poll=0.01, stall_timeout=0.5)
    assert barrier.claim(0)
    with barrier.working(0):
        pass
    assert ShardBarrier(tmp_path, 2, "gw1").claim(1)  # claimed, then its process dies
    old = time.time() - 60
    os.utime(tmp_path / "1.claim", (old, old))
    with pytest.raises(ShardTimeout, match="shard 1 of 2, claimed by gw1, has shown no sign of life"):
        barrier.wait()


def test_a_shard_nobody_ever_claims_times_out_too(tmp_path):
    barrier = ShardBarrier(tmp_path, 2, "gw0", poll=0.01, stall_timeout=0.2)
    assert barrier.claim(0)
    with barrier.working(0):
        pass
    with pytest.raises(ShardTimeout, match="shard 1 of 2, claimed by no process"):
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


# ------------------------------------------------------------ bad input before any work


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as building or loading a model."""
    from lavender_checks.run import pair

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pair, "load_model_pair", refuse)
    monkeypatch.setattr(pair, "pair_identity", refuse)


def one_error_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lavender-checks run: error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def test_a_store_or_reports_that_is_no_folder_is_one_line_before_any_model(tmp_path, capsys,
                                                                           no_model_load):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert cli.main(["run", "--store", str(afile), "--reports", str(tmp_path / "r"), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--store", str(afile), "not a folder")
    assert cli.main(["run", "--store", str(tmp_path / "s"), "--reports", str(afile), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--reports", str(afile), "not a folder")
    # /proc refuses new folders even to root: an unwritable place.
    assert cli.main(["run", "--store", str(tmp_path / "s"), "--reports", "/proc/lavender-reports",
                     "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--reports /proc/lavender-reports", "cannot write there")
    assert cli.main(["run", "--store", "/proc/lavender-store", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--store /proc/lavender-store", "cannot write there")


def test_a_reference_that_is_a_folder_is_one_line_before_any_model(tmp_path, capsys, no_model_load):
    folder = tmp_path / "refs"
    folder.mkdir()
    assert cli.main(["run", "--reference", str(folder), "--store", str(tmp_path / "s"), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"{folder}: a folder, not a reference file")


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x", "cpu:0:1"])
def test_an_unusable_device_is_refused_at_once(device, capsys, no_model_load):
    with pytest.raises(RunInputError, match=f"--device {device}: the model runs on cpu or cuda"):
        RunConfig(device=device)
    assert cli.main(["run", "--device", device, "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"--device {device}")


def test_cuda_without_cuda_is_refused_at_once(tmp_path, capsys, no_model_load):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    started = time.monotonic()
    assert cli.main(["run", "--device", "cuda", "--store", str(tmp_path / "s"),
                     "--reports", str(tmp_path / "r"), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--device cuda: CUDA is not available here")
    assert time.monotonic() - started < 5


def test_a_missing_model_is_reported_before_a_missing_lmudata(tmp_path, capsys, monkeypatch,
                                                              no_model_load):
    monkeypatch.delenv("LMUData", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.main(["run", "--base-model", str(tmp_path / "m"), "--lora", str(tmp_path / "l"),
                     "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"--base-model {tmp_path / 'm'}: no such folder")
    (tmp_path / "m").mkdir()
    (tmp_path / "l").mkdir()
    assert cli.main(["run", "--base-model", str(tmp_path / "m"), "--lora", str(tmp_path / "l"),
                     "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"LMUData folder {tmp_path / 'home' / 'LMUData'} does not exist")


def test_a_file_given_as_a_folder_is_named_as_a_file(tmp_path, capsys, no_model_load):
    """--lmu-data, --from-vlmeval and --base-model naming a file say so, not "does not exist"."""
    afile = tmp_path / "LMUData.tsv"
    afile.write_text("index\tquestion\n")
    assert cli.main(["run", "--lmu-data", str(afile), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"--lmu-data LMUData folder {afile}: is a file, not a folder")
    assert cli.main(["run", "--from-vlmeval", str(afile), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"--from-vlmeval {afile}: is a file, not a folder")
    assert cli.main(["run", "--profile", str(tmp_path), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"profile {tmp_path} is a folder, not a profile file")


@pytest.mark.parametrize("options, words", [
    (["--strict-data", "--allow-noncomparable"], ["--strict-data", "--allow-noncomparable", "one of them"]),
    (["--dist-timeout", "-5"], ["--dist-timeout must be a positive number of seconds, got -5"]),
    (["--dist-timeout", "nan"], ["--dist-timeout must be a positive number"]),
    (["--store-sharing", "gather"], ["--store-sharing gather", "not started by torchrun"]),
])
def test_options_that_cannot_work_together_or_here_are_refused(options, words, capsys, no_model_load,
                                                               monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # not under torchrun
    assert cli.main(["run", *options, "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, *words)


@pytest.mark.parametrize("sig, status, words", [
    (signal.SIGTERM, 143, "terminated (SIGTERM); finished predictions are kept and a rerun resumes"),
    (signal.SIGINT, 130, "interrupted; finished predictions are kept and a rerun resumes"),
])
def test_sigterm_ends_as_ctrl_c_does_with_its_own_status(sig, status, words, capsys, monkeypatch):
    """A scheduler's stop (SIGTERM) unwinds the run as Ctrl-C does (what it holds is released)
    and says what Ctrl-C says; the handler is put back afterwards."""
    unwound = []

    def run_until_signalled(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        finally:
            unwound.append(True)
        return 0

    monkeypatch.setattr(pipeline, "_run", run_until_signalled)
    ignored = lambda signum, frame: None  # noqa: E731 - a SIGTERM cli.main does not take ends nothing
    before = signal.signal(signal.SIGTERM, ignored)
    try:
        assert cli.main(["run", "--quiet"]) == status
        assert signal.getsignal(signal.SIGTERM) is ignored  # put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert unwound == [True]
    assert words in capsys.readouterr().err


# ------------------------------------------------------------ the model pair, loaded lazily


def test_a_run_whose_predictions_are_all_stored_loads_no_model(tmp_path):
    config = stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",))
    loads = []

    def load():
        loads.append(1)
        return StandInPair()

    first = collect_results(config, pair=LazyPair(StandInPair(), load), progress=False)
    assert loads == [1] and first.metadata["models"] == {"stand_in": True, "loaded": True}
    second = collect_results(config, pair=LazyPair(StandInPair(), load), progress=False)
    assert loads == [1]  # nothing to generate: the weights stayed on disk
    assert second.predictions == first.predictions
    assert second.metadata["models"]["loaded"] is False


def test_the_identity_read_from_the_folders_is_the_loaded_pairs(tiny_pair, tiny_checkpoints, monkeypatch):
    from lavender_checks.run import pair as pair_module
    from lavender_checks.synthetic import tiny

    monkeypatch.setattr(tiny, "ensure_tiny_checkpoints", lambda: tiny_checkpoints)
    identity = pair_module.pair_identity(RunConfig())
    assert (identity.base_fingerprint, identity.adapter_fingerprint) == \
        (tiny_pair.base_fingerprint, tiny_pair.adapter_fingerprint)
    assert (identity.device, identity.dtype) == (tiny_pair.device, tiny_pair.dtype)
    assert identity.processor.tokenizer.padding_side == "left"


# ------------------------------------------------------------ one meaning of --benchmark


def test_a_run_of_one_benchmark_is_judged_on_its_rows_only(tmp_path):
    run = collect_results(stand_in_config(tmp_path, benchmarks=("MME",)),
                                   pair=StandInPair(), progress=False)
    outcome = judge_run(run)
    assert outcome.verdicts and {v.benchmark for v in outcome.verdicts} == {"MME"}
    assert not [v for v in outcome.verdicts if v.status == "missing"]
    rows = load_reference(TINY_REFERENCE).rows
    assert len(outcome.verdicts) == 3 * sum(row.benchmark == "MME" for row in rows)


# ------------------------------------------------------------ --write-reference


def test_write_reference_does_not_replace_a_file_without_force(tmp_path, capsys, no_model_load):
    existing = tmp_path / "own.toml"
    existing.write_text("# mine\n")
    assert cli.main(["run", "--write-reference", str(existing), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(existing), "exists", "--force")
    assert existing.read_text() == "# mine\n"
    assert cli.main(["run", "--force", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--force only applies to --write-reference")
    run = collect_results(stand_in_config(tmp_path), pair=StandInPair(), progress=False)
    with pytest.raises(RunInputError, match="exists; add --force"):
        write_reference(run, existing)
    write_reference(run, existing, force=True)
    assert load_reference(existing).rows


@pytest.mark.parametrize("subset", [["--limit", "2"], ["--fraction", "0.5"]])
def test_write_reference_refuses_a_subset_before_any_model(tmp_path, capsys, no_model_load, subset):
    target = tmp_path / "own.toml"
    assert cli.main(["run", "--write-reference", str(target), *subset, "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--write-reference", "not a subset's", f"drop {subset[0]}")
    assert not target.exists()
    run = collect_results(stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",), limit=2),
                          pair=StandInPair(), progress=False)
    with pytest.raises(RunInputError, match="drop --limit"):
        write_reference(run, target)
    assert not target.exists()
@pytest.fixture
def no_work(monkeypatch, no_model_load):
    """Fails the test if the command gets as far as reading data or predictions."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started its work")

    monkeypatch.setattr(pipeline.series, "collect_run", refuse)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_write_reference_onto_a_folder_is_one_line_before_any_work(tmp_path, capsys, no_work, force):
    folder = tmp_path / "refs"
    folder.mkdir()
    assert cli.main(["run", "--write-reference", str(folder), *force, "--reports", str(tmp_path / "r"),
                     "--store", str(tmp_path / "s"), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"--write-reference {folder}: is a folder")
    assert list(folder.iterdir()) == []


def test_write_reference_where_no_file_can_be_written_is_one_line_before_any_work(tmp_path, capsys, no_work):
    (tmp_path / "plain").write_text("x")
    target = tmp_path / "plain" / "own.toml"
    assert cli.main(["run", "--write-reference", str(target), "--store", str(tmp_path / "s"), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"--write-reference {target}: {tmp_path / 'plain'} is a file")
    # /proc takes no new files, even from root: a folder that cannot be written.
    assert cli.main(["run", "--write-reference", "/proc/lavender-own.toml", "--force",
                     "--store", str(tmp_path / "s"), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--write-reference /proc/lavender-own.toml: cannot write there")


def test_a_recorded_reference_keeps_the_hand_written_layout(tmp_path):
    run = collect_results(stand_in_config(tmp_path), pair=StandInPair(), progress=False)
    text = write_reference(run, tmp_path / "own.toml").read_text()
    assert text.startswith("# Reference numbers recorded by `lavender-checks run --write-reference` "
                           "from fixtures/reported/seed-report.toml's rows.")
    assert text.count("[[row]]") == len(load_reference(SEED_REFERENCE).rows)
    assert "[gate.floor]" in text and "[derived.MME]" in text


# ------------------------------------------------------------ two runs on one store


def test_a_key_held_by_a_live_run_is_refused_naming_it(tmp_path):
    from lavender_checks.run.store import StoreLockedError

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        config = stand_in_config(tmp_path, benchmarks=("ChartQA_TEST",))
        collect_results(config, pair=StandInPair(), progress=False)
        (lock_dir,) = {p.parent for p in (tmp_path / "store").rglob("*.jsonl") if "+" not in p.parent.parent.name}
        (lock_dir / ".lock").write_text(json.dumps(
            {"run": "other", "pid": other.pid, "host": socket.gethostname(), "started": "now",
             "command": "lavender-checks run (the other one)"}))
        ledger: list = []
        with pytest.raises(StoreLockedError, match=f"another run is using these predictions: pid {other.pid}.*"
                                                   r"lavender-checks run \(the other one\)"):
            collect_results(config, pair=StandInPair(ledger), progress=False)
        assert ledger == []  # refused before generating anything
    finally:
        other.kill()
        other.wait()
    # Its process is gone: the lock is taken over, and released at the end of the run.
    run = collect_results(config, pair=StandInPair(), progress=False)
    assert run.results["ChartQA_TEST"]["base"] is not None
    assert not list((tmp_path / "store").rglob(".lock"))


def test_the_processes_of_one_sharded_run_share_the_locks(tmp_path):
    from lavender_checks.run.store import PredictionStore, StoreKey

    key = StoreKey("b" * 64, None, "MME", "0" * 32, "p", "1" * 64)
    first = PredictionStore(tmp_path, run_id="barrier:x")
    first.log(key, writer="gw0")
    second = PredictionStore(tmp_path, run_id="barrier:x")
    second.log(key, writer="gw1")  # the same run: no refusal
    first.release()
    assert not list(tmp_path.rglob(".lock"))


# ------------------------------------------------------------ leftovers


def test_partial_reports_of_killed_runs_go_at_the_next_report_and_keep_reports_prunes_old_runs(tmp_path):
    """A killed run's .partial folder goes at the next report however young it is (as the
    README says); one that another run is writing at that moment stays."""
    from lavender_checks.gate import report

    reports = tmp_path / "reports"
    runs = [reports / f"2026010{i}-000000-0000000{i}" for i in range(1, 5)]
    for run in runs:
        (run / "report.json").parent.mkdir(parents=True)
        (run / "report.json").write_text("{}")
    stale = reports / f".{report.new_run_id()}.partial"
    fresh = reports / f".{report.new_run_id()}.partial"  # killed a second ago
    being_written = reports / f".{report.new_run_id()}.partial"
    stale.mkdir()
    fresh.mkdir()
    orphan_lock = reports / f".{report.new_run_id()}.partial.lock"  # killed before its mkdir
    orphan_lock.write_bytes(b"")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    (reports / "store").mkdir()
    writer = report._lock_partial(being_written)  # as write_report holds it, before its mkdir
    being_written.mkdir()
    try:
        removed = prune_reports(reports, keep=2)
    finally:
        writer.close()
    assert set(removed) == {stale, fresh, orphan_lock, runs[0], runs[1]}
    assert sorted(p.name for p in reports.iterdir()) == sorted(
        [being_written.name, being_written.name + ".lock", "store", runs[2].name, runs[3].name])
    # Its writer gone (the lock is free), it goes at the next report, lock file and all.
    assert prune_reports(reports) == [being_written]
    assert sorted(p.name for p in reports.iterdir()) == sorted(["store", runs[2].name, runs[3].name])


def test_keep_reports_through_the_command(tmp_path, capsys, no_model_load):
    assert cli.main(["run", "--keep-reports", "0", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, "--keep-reports must be at least 1")


def test_stale_barrier_folders_go(tmp_path):
    from lavender_checks.run.shards import remove_stale_barriers

    old, new = tmp_path / "old-run", tmp_path / "new-run"
    for folder in (old, new):
        folder.mkdir()
        (folder / "0.done").write_text("gw0\n")
    before = time.time() - 7200
    for path in (old / "0.done", old):
        os.utime(path, (before, before))
    assert remove_stale_barriers(tmp_path) == [old]
    assert new.is_dir()


@pytest.mark.slow
def test_the_default_run_works_from_a_non_editable_install(tmp_path):
    """``pip install .`` (not -e): the package carries its fixtures, reports go to ./reports."""
    site, work, home = tmp_path / "site", tmp_path / "work", tmp_path / "home"
    work.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--no-build-isolation", "--target", str(site), str(REPO_ROOT)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    # setuptools builds in the checkout's build/: leave no trace there
    shutil.rmtree(REPO_ROOT / "build", ignore_errors=True)
    assert (site / "lavender_checks" / "fixtures" / "reported" / "tiny-mini.toml").is_file()
    env = dict(os.environ, PYTHONPATH=str(site), HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("LAVENDER_CHECKS_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "lavender_checks.cli", "run", "--benchmark", "ChartQA_TEST",
                           "--quiet"], capture_output=True, text=True, timeout=600, cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = Path(done.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.parent == work / "reports" and (report / "report.md").is_file()
    assert (home / ".cache" / "lavender-checks" / "tiny").is_dir()  # not inside site-packages
    assert not (site / "reports").exists() and not (site / ".cache").exists()

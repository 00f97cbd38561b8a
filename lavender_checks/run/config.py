"""What a run computes (``RunConfig``) and the options that set it, declared once for
``lavender-checks run`` and for pytest (``RUN_OPTIONS``), plus the checks a run makes before any
expensive work (``check_before_work``).

``--engine`` (``engines.make_engine`` turns the name into an engine) decides how fast
predictions come, not what they are (on CPU both engines give the
same tokens), so it is not part of the run label, the snapshot names or the prediction store's
key; the run metadata records it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lavender_checks import FIXTURES, REPORTS
from lavender_checks.benchmarks import Benchmark, benchmark_names, get_benchmark
from lavender_checks.engines import DEFAULT_ENGINE, FAST_ENGINE, engine_names

GATE_MODES = ("reproduce", "no-regression")
# A series of checkpoints (run/checkpoints.py): the exit status judges its last one, or all.
GATE_SERIES = ("last", "all")
DEVICE_KINDS = ("cpu", "cuda")  # what the model code supports; "cuda:N" picks a card
DEFAULT_PROFILE = "seed-report"
MINI_LMUDATA = FIXTURES / "lmudata-mini"
# The built-in default gates the tiny pair against its own numbers (the chain reproduces
# itself); real weights are gated against the seed reproduction report.
TINY_REFERENCE = FIXTURES / "reported" / "tiny-mini.toml"
SEED_REFERENCE = FIXTURES / "reported" / "seed-report.toml"
# The model names of the seed report's VLMEvalKit run (its `--model` arguments).
DEFAULT_BASE_NAME = "llama_vision_base"
DEFAULT_LAVENDER_NAME = "llama_vision_lavender"
DEFAULT_BATCH_SIZE = 8


class RunInputError(ValueError):
    """Options, folders or files that a run cannot use; the message says what and where."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Paths left None take their defaults."""

    base_model: Path | None = None  # None: the built-in tiny pair
    # One adapter folder, or a series (run/checkpoints.py): several folders, or a folder of them
    lora: Path | tuple[Path, ...] | None = None
    lmu_data: Path | None = None  # None: fixtures/lmudata-mini for the tiny pair, else $LMUData
    benchmarks: tuple[str, ...] = field(default_factory=lambda: tuple(benchmark_names()))
    profile: str = DEFAULT_PROFILE
    reference: Path | None = None  # None: tiny-mini.toml for the tiny pair, else seed-report.toml
    gate_mode: str = "reproduce"
    limit: int | None = None  # N resampling units of every benchmark, drawn per stratum (data.subset)
    fraction: float | None = None  # a fraction of every benchmark's units, per stratum
    batch_size: int = DEFAULT_BATCH_SIZE
    store: Path | None = None  # None: the prediction store's default folder
    device: str | None = None  # None: CPU for the tiny pair, else CUDA when there is one
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA (model.load_pair)
    from_vlmeval: Path | None = None  # a VLMEvalKit work dir: score its files, load no model
    base_name: str = DEFAULT_BASE_NAME  # VLMEvalKit model names inside from_vlmeval
    lavender_name: str | tuple[str, ...] = DEFAULT_LAVENDER_NAME  # several: a series
    shard: tuple[int, int] | None = None  # (i, n): generate and score shard i of n only
    # How predictions are generated; not what they are, so not part of label().
    engine: str = DEFAULT_ENGINE
    chunk_rows: int | None = None  # rows per fast-engine call; None: the fast engine's default
    # The fast engine's batch-invariant mode (engines/fast/invariant.py): predictions that do
    # not depend on -n, the slot count, chunking or the resume point. False: the throughput mode.
    batch_invariant: bool = True
    # Data that is not what the reference was measured on (gate.verdicts.noncomparable):
    strict_data: bool = False  # refuse it before any work
    allow_noncomparable: bool = False  # gate it anyway (the report still says so first)
    # Rounds of a seeded random sample, stopped once a failure is certain (run/rounds.py).
    stop_early: bool = False
    gate_series: str = "last"  # a series' exit status: its last checkpoint's verdicts, or all

    def __post_init__(self) -> None:
        # Given more than once (a series): a tuple; once: the value itself, as before.
        for name, kind in (("lora", Path), ("lavender_name", str)):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                values = tuple(kind(v) for v in value)
                object.__setattr__(self, name, values[0] if len(values) == 1 else values)
        for name in ("base_model", "lora", "lmu_data", "reference", "store", "from_vlmeval"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (Path, tuple)):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        self._check()

    def _check(self) -> None:
        if (self.base_model is None) != (self.lora is None):
            raise RunInputError("--base-model and --lora go together: give both (real weights) "
                                "or neither (the built-in tiny pair)")
        if self.from_vlmeval is not None and self.base_model is not None:
            raise RunInputError("--from-vlmeval scores the prediction files VLMEvalKit wrote and "
                                "loads no model: drop --base-model/--lora, or drop --from-vlmeval")
        if not self.benchmarks:
            raise RunInputError("no benchmark selected")
        known = benchmark_names()
        unknown = [b for b in self.benchmarks if b not in known]
        if unknown:
            raise RunInputError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise RunInputError(f"a benchmark is named twice: {', '.join(self.benchmarks)}")
        if self.gate_mode not in GATE_MODES:
            raise RunInputError(f"unknown gate mode {self.gate_mode!r}; modes: {', '.join(GATE_MODES)}")
        if self.limit is not None and self.fraction is not None:
            raise RunInputError("--limit and --fraction both pick a subset: give one of them")
        if self.limit is not None and self.limit < 1:
            raise RunInputError(f"--limit must be at least 1, got {self.limit}")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise RunInputError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.stop_early and (self.limit is not None or self.fraction is not None):
            raise RunInputError("--stop-early draws its own random sample of every benchmark, round by "
                                "round, and is judged against the whole benchmark: give it without "
                                "--limit/--fraction")
        if self.batch_size < 1:
            raise RunInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard is not None:
            index, count = self.shard
            if not (count >= 1 and 0 <= index < count):
                raise RunInputError(f"shard {index} of {count} does not exist (0 <= i < n)")
        if self.device is not None:
            kind, _, number = self.device.partition(":")
            if kind not in DEVICE_KINDS or (number and not (kind == "cuda" and number.isdigit())):
                raise RunInputError(f"--device {self.device}: the model runs on cpu or cuda "
                                    "(cuda:N for one card), not on this device")
        if self.engine not in engine_names():
            raise RunInputError(f"unknown engine {self.engine!r}; engines: {', '.join(engine_names())}")
        if self.chunk_rows is not None:
            if self.engine != FAST_ENGINE:
                raise RunInputError("--chunk-rows sets how many rows the fast engine is handed at a "
                                    "time: it needs --engine fast")
            if self.chunk_rows < 1:
                raise RunInputError(f"--chunk-rows must be at least 1, got {self.chunk_rows}")
        if not self.batch_invariant and self.engine != FAST_ENGINE:
            raise RunInputError("--no-batch-invariance switches the fast engine to its throughput mode: "
                                "it needs --engine fast")
        if self.strict_data and self.allow_noncomparable:
            raise RunInputError("--strict-data refuses data that is not the reference's and "
                                "--allow-noncomparable gates it anyway: give one of them")
        for name in ("base_name", "lavender_name"):
            value = getattr(self, name)
            if not value or (isinstance(value, tuple) and not all(value)):
                raise RunInputError(f"--{name.replace('_', '-')} must not be empty")
        if self.from_vlmeval is not None and self.base_name in self.lavender_names:
            raise RunInputError(f"--base-name and --lavender-name are both {self.base_name!r}: "
                                "a model cannot be compared with itself")
        if self.gate_series not in GATE_SERIES:
            raise RunInputError(f"unknown --gate-series {self.gate_series!r}; one of {', '.join(GATE_SERIES)}")

    @property
    def lora_paths(self) -> tuple[Path, ...]:
        """The folders given with --lora (one, several, or none)."""
        return () if self.lora is None else self.lora if isinstance(self.lora, tuple) else (self.lora,)

    @property
    def lavender_names(self) -> tuple[str, ...]:
        return self.lavender_name if isinstance(self.lavender_name, tuple) else (self.lavender_name,)

    @property
    def selected(self) -> tuple[Benchmark, ...]:
        """The run's benchmarks, looked up once (names were checked in ``_check``)."""
        return tuple(get_benchmark(name) for name in self.benchmarks)

    @property
    def builtin_model(self) -> bool:
        """The built-in tiny pair runs (no weights given, no VLMEvalKit folder)."""
        return self.base_model is None and self.from_vlmeval is None

    def lmu_root(self) -> Path:
        """The LMUData folder: --lmu-data, else the mini benchmarks for the tiny pair, else
        VLMEvalKit's own resolution ($LMUData, then ~/LMUData)."""
        if self.lmu_data is not None:
            return self.lmu_data
        if self.builtin_model:
            return MINI_LMUDATA
        from lavender_checks.data import lmudata_root

        return Path(lmudata_root(None))

    @property
    def default_device_kind(self) -> str:
        # The tiny pair runs on the CPU unless told otherwise: its recorded numbers and
        # snapshots were made there, in float32, and a GPU (bfloat16) decodes other tokens.
        return "cpu" if self.base_model is None else "cuda"

    @property
    def device_kind(self) -> str:
        return self.device.split(":")[0] if self.device else self.default_device_kind

    def reference_path(self) -> Path:
        if self.reference is not None:
            return self.reference
        return TINY_REFERENCE if self.builtin_model else SEED_REFERENCE

    def label(self) -> str:
        """A short name of what is run, for run ids and snapshot names.

        The tiny pair on the mini benchmarks is ``tiny-mini``; real weights are named by
        their folders (``<base>+<lora>``); a subset adds ``-limitN`` / ``-fractionF``.
        """
        if self.from_vlmeval is not None:
            model = f"vlmeval-{self.base_name}+{'+'.join(self.lavender_names)}"
        elif self.base_model is None:
            model = "tiny"
        else:  # a series: every folder's name (each checkpoint's own run has one)
            model = f"{self.base_model.name}+{'+'.join(p.name for p in self.lora_paths)}"
        mini = _same_path(self.lmu_data, MINI_LMUDATA) if self.lmu_data is not None else self.builtin_model
        parts = [model, "mini" if mini else "lmudata"]
        if self.limit is not None:
            parts.append(f"limit{self.limit}")
        if self.fraction is not None:
            parts.append(f"fraction{self.fraction:g}")
        if self.shard is not None:
            parts.append(f"shard{self.shard[0]}of{self.shard[1]}")
        if self.device_kind != self.default_device_kind:
            parts.append(self.device_kind)  # other hardware, other greedy tokens
        if self.dtype is not None:
            parts.append(self.dtype)
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))

    def describe(self) -> dict[str, Any]:
        """Plain data for reports."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = [str(v) if isinstance(v, Path) else v for v in value]
        data["reference"] = str(self.reference_path())
        data["label"] = self.label()
        return data


def _same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# --------------------------------------------------------------------- options (CLI and pytest)


# (flag, argparse keyword arguments). Shared by `lavender-checks run` and pytest
# (`conftest.py`), whose `addoption` takes the same keywords.
RUN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--base-model", dict(type=Path, metavar="DIR", default=None,
                          help="Hugging Face folder of Llama-3.2-11B-Vision-Instruct (with --lora); "
                               "default: the built-in tiny pair")),
    ("--lora", dict(type=Path, metavar="DIR", action="append", default=None,
                    help="the Lavender LoRA adapter folder (with --base-model); given again, or a "
                         "folder of checkpoint-N/ adapters: a series, each checkpoint gated")),
    ("--lmu-data", dict(type=Path, metavar="DIR", default=None,
                        help="the LMUData folder with the benchmark TSVs; default: "
                             "the mini benchmarks (fixtures/lmudata-mini) for the tiny pair, else $LMUData or ~/LMUData")),
    ("--benchmark", dict(dest="benchmarks", action="append", metavar="NAME", default=None,
                         help="run only this benchmark (repeatable); default: all of "
                              + ", ".join(benchmark_names()))),
    ("--profile", dict(metavar="NAME|FILE", default=DEFAULT_PROFILE,
                       help=f"run profile (fixtures/profiles/NAME.toml or a path); default {DEFAULT_PROFILE}")),
    ("--reference", dict(type=Path, metavar="FILE", default=None,
                         help="reference numbers to gate against; default: "
                              "fixtures/reported/tiny-mini.toml for the tiny pair, else seed-report.toml")),
    ("--gate", dict(dest="gate_mode", choices=GATE_MODES, default="reproduce",
                    help="reproduce: every number within its band; no-regression: the gain and "
                         "Lavender may also be better (default reproduce)")),
    ("--limit", dict(type=int, metavar="N", default=None,
                     help="only N units of every benchmark (questions, MMBench circular groups, "
                          "MME image pairs), drawn at random stratum by stratum")),
    ("--fraction", dict(type=float, metavar="F", default=None,
                        help="only a fraction F of every benchmark's units, in every stratum")),
    ("--batch-size", dict(type=int, metavar="N", default=DEFAULT_BATCH_SIZE,
                          help=f"generation batch size (default {DEFAULT_BATCH_SIZE})")),
    ("--from-vlmeval", dict(type=Path, metavar="DIR", default=None,
                            help="score the prediction files of a VLMEvalKit work dir instead of "
                                 "generating (no model, no GPU)")),
    ("--base-name", dict(metavar="NAME", default=DEFAULT_BASE_NAME,
                         help=f"VLMEvalKit model name of the base model (default {DEFAULT_BASE_NAME})")),
    ("--lavender-name", dict(metavar="NAME", action="append", default=None,
                             help=f"VLMEvalKit model name of Lavender (default {DEFAULT_LAVENDER_NAME}); "
                                  "given again: a series of checkpoints")),
    ("--gate-series", dict(dest="gate_series", choices=GATE_SERIES, default="last",
                           help="a series of checkpoints: the exit status judges the last one "
                                "(default) or all of them")),
    ("--store", dict(type=Path, metavar="DIR", default=None,
                     help="the prediction store (default ./reports/store); a rerun reuses it")),
    ("--device", dict(metavar="DEVICE", default=None,
                      help="torch device for the model (default: cpu for the built-in tiny pair, "
                           "else cuda when available)")),
    ("--dtype", dict(choices=("float32", "bfloat16", "float16"), default=None,
                     help="weights and compute dtype (default: float32 on CPU, bfloat16 on CUDA)")),
    ("--engine", dict(choices=engine_names(), default=DEFAULT_ENGINE,
                      help=f"generation engine: {FAST_ENGINE} (the default: rows leave the batch as they "
                           "finish, vision once per image, CUDA graphs; docs/speed.md) or generate "
                           "(batched model.generate)")),
    ("--chunk-rows", dict(type=int, metavar="N", default=None,
                          help="with --engine fast: rows handed to the engine at a time, grouped by "
                               "image (default: a whole benchmark); an interrupted run keeps every "
                               "finished row")),
    ("--no-batch-invariance", dict(dest="batch_invariant", action="store_false", default=True,
                                   help="with --engine fast: its throughput mode, whose bf16 predictions "
                                        "depend on which rows share a batch (-n, slots, chunks, resume "
                                        "point); by default each row's tokens depend on that row alone")),
    ("--strict-data", dict(action="store_true", default=False,
                           help="refuse, before any work, a TSV that is not the one the reference's "
                                "numbers came from (VLMEvalKit's: md5, row count)")),
    ("--allow-noncomparable", dict(action="store_true", default=False,
                                   help="gate a run on such data anyway (without it the run fails, "
                                        "saying why)")),
    ("--stop-early", dict(action="store_true", default=False,
                          help="take the rows in rounds of a seeded random order and stop as soon as a "
                               "case's failure is certain (confidence 1 - alpha, the reference's "
                               "stop_early_alpha); a pass always comes from the complete run")),
)

# Where reports go and how many are kept; not part of what a run computes, so not RunConfig fields.
REPORTS_OPTION = ("--reports", dict(type=Path, metavar="DIR", default=REPORTS,
                                    help="where <run-id>/ reports are written (default ./reports "
                                         "of the current folder)"))
KEEP_REPORTS_OPTION = ("--keep-reports", dict(type=int, metavar="N", default=None,
                                              help="after writing a report, delete all but the N "
                                                   "newest run folders under --reports (default: keep all)"))
REPORT_OPTIONS = (REPORTS_OPTION, KEEP_REPORTS_OPTION)

# The RunConfig field each option sets (its argparse dest).
_OPTION_FIELDS = {flag: kwargs.get("dest", flag[2:].replace("-", "_")) for flag, kwargs in RUN_OPTIONS}


def add_run_options(add: Callable[..., Any]) -> None:
    """Declare the run options, ``--reports`` and ``--keep-reports`` with ``add`` (argparse's
    ``add_argument`` or pytest's ``addoption``)."""
    from lavender_checks.run.distributed import OPTIONS as TORCHRUN_OPTIONS

    for flag, kwargs in (*RUN_OPTIONS, *REPORT_OPTIONS, *TORCHRUN_OPTIONS):
        add(flag, **kwargs)


def config_from_options(get: Callable[[str], Any]) -> RunConfig:
    """A RunConfig from parsed options; ``get(dest)`` reads one (argparse or pytest)."""
    values = {dest: get(dest) for dest in _OPTION_FIELDS.values()}
    for dest in ("benchmarks", "lavender_name"):  # repeatable options: None when not given
        if values[dest] is None:
            values.pop(dest)
    return RunConfig(**values)


def check_inputs(config: RunConfig) -> None:
    """The inputs that can be checked before data or a model is loaded, in the order a user
    fixes them: the model folders, then the data, then the reference and profile. Reads only
    (no torch, nothing written). Raises one of ``input_errors()`` with a one-line message."""
    if config.base_model is not None:
        for flag, path in (("--base-model", config.base_model), *(("--lora", p) for p in config.lora_paths)):
            if not path.is_dir():
                raise RunInputError(f"{flag} {path}: {not_a_folder(path)}")
        from lavender_checks.run.checkpoints import check_series

        check_series(config.base_model, config.lora)
    if config.from_vlmeval is not None:
        from lavender_checks.run.checkpoints import names_series

        names_series(config.lavender_name)  # two models of one name
        if not config.from_vlmeval.is_dir():
            raise RunInputError(f"--from-vlmeval {config.from_vlmeval}: {not_a_folder(config.from_vlmeval)}")
        if config.lmu_data is not None and not config.lmu_data.is_dir():
            raise RunInputError(f"--lmu-data {config.lmu_data}: {not_a_folder(config.lmu_data)}")
    else:
        root = config.lmu_root()
        if root.exists() and not root.is_dir():
            flag = "--lmu-data " if config.lmu_data is not None else ""
            raise RunInputError(f"{flag}LMUData folder {root}: {not_a_folder(root)}")
        if not root.is_dir():
            flag = "--lmu-data " if config.lmu_data is not None else ""
            raise RunInputError(f"{flag}LMUData folder {root} does not exist"
                                + ("" if flag else " (give --lmu-data, or set $LMUData)"))
    from lavender_checks.gate.verdicts import load_reference
    from lavender_checks.profiles import load_profile

    reference = load_reference(config.reference_path())
    if not set(config.benchmarks) & set(reference.benchmarks):
        # Nothing of the run would be gated: no verdict at all, which must not read as a pass
        # (nor cost a generation first), --allow-noncomparable or not.
        raise RunInputError(
            f"--reference {config.reference_path()} has no rows for {', '.join(config.benchmarks)}: "
            f"nothing of this run would be gated (its rows are of {', '.join(reference.benchmarks)})")
    if config.from_vlmeval is None:
        profile = load_profile(config.profile)
        for name in config.benchmarks:
            profile.for_benchmark(name)  # a benchmark the profile lacks
    if config.base_model is not None and not isinstance(config.lora, tuple):
        from lavender_checks.model import check_adapter_fits
        from lavender_checks.run.checkpoints import adapter_series

        if adapter_series(config.lora) is None:
            # One adapter, checked from the files' headers as a series' checkpoints are (above):
            # peft would find a misfit only after the base model's weights were read.
            check_adapter_fits(config.base_model, config.lora)


def not_a_folder(path: Path) -> str:
    """Why ``path``, which is no folder, cannot be used as one."""
    return "no such folder" if not Path(path).exists() else "is a file, not a folder"


def check_before_work(config: RunConfig, *, reports: Path | None = None,
                      keep_reports: int | None = None) -> None:
    """``check_inputs``, then the outputs (``--store``, ``--reports``: folders this process can
    write to, created if need be) and the device (CUDA there when asked for)."""
    check_inputs(config)
    if config.from_vlmeval is None:
        from lavender_checks.run.store import DEFAULT_ROOT

        check_writable_folder("--store", config.store or DEFAULT_ROOT)
    if reports is not None:
        check_writable_folder("--reports", reports)
    if keep_reports is not None and keep_reports < 1:
        raise RunInputError(f"--keep-reports must be at least 1, got {keep_reports}")
    if config.from_vlmeval is None and config.device is not None and config.device_kind == "cuda":
        check_cuda(config.device)


def check_writable_folder(flag: str, path: Path) -> None:
    """``path`` is (or can be made) a folder that this process can write a file into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunInputError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise RunInputError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def _no_cuda(device: str, torch_version: str, cuda_version: str | None) -> RunInputError:
    built = f"CUDA {cuda_version}" if cuda_version else "without CUDA"
    return RunInputError(f"--device {device}: CUDA is not available here (torch {torch_version}, "
                         f"built {built}); use --device cpu or run on a CUDA machine")


def check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise _no_cuda(device, torch.__version__, torch.version.cuda)
    _, _, number = device.partition(":")
    if number and int(number) >= torch.cuda.device_count():
        raise RunInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_cuda_without_torch(device: str, gpus: list[str]) -> None:
    """What ``check_cuda`` says in the common cases (a CPU build of torch; no GPU visible),
    found without importing torch: for a process that must not touch CUDA (pytest-xdist's
    controller). ``gpus``: the GPUs this process may use."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return  # no torch here: loading the model will say so
    try:
        text = (Path(spec.origin).parent / "version.py").read_text(encoding="utf-8")
    except OSError:
        return
    version = re.search(r"^__version__\s*=\s*'([^']*)'", text, re.M)
    cuda = re.search(r"^cuda(?:\s*:[^=]*)?=\s*(?:None|'([^']*)')", text, re.M)
    if version is None or cuda is None:
        return
    if cuda.group(1) is None or not gpus:
        raise _no_cuda(device, version.group(1), cuda.group(1))


def input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit status 2), as opposed to a failing gate or a bug."""
    from lavender_checks.benchmarks import UnknownBenchmark
    from lavender_checks.benchmarks.vlmeval_common import ScoringInputError
    from lavender_checks.data import DataError
    from lavender_checks.gate.verdicts import ReferenceFileError
    from lavender_checks.model import ModelLoadError
    from lavender_checks.outputs import OutputFileError
    from lavender_checks.profiles import ProfileError
    from lavender_checks.run.checkpoints import SeriesInputError
    from lavender_checks.run.distributed import DistributedUsageError
    from lavender_checks.run.store import PredictionStoreError, StoreLockedError
    from lavender_checks.vlmeval_io import PredictionFileError

    return (RunInputError, UnknownBenchmark, ScoringInputError, DataError, ReferenceFileError,
            ModelLoadError, PredictionStoreError, StoreLockedError, ProfileError, PredictionFileError,
            DistributedUsageError, OutputFileError, SeriesInputError)

"""The benchmark registry: name -> Benchmark, read from ``benchmarks.toml``."""

from __future__ import annotations

import importlib
import tomllib
from functools import cache
from pathlib import Path

from lavender_checks.benchmarks.base import Benchmark, BenchmarkSpec, Ratio, ScoreResult

__all__ = ["Benchmark", "BenchmarkSpec", "Ratio", "ScoreResult", "UnknownBenchmark",
           "get_benchmark", "get_spec", "benchmark_names", "all_benchmarks", "signature_of"]

_METADATA = Path(__file__).with_name("benchmarks.toml")


class UnknownBenchmark(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@cache
def _raw() -> dict:
    with _METADATA.open("rb") as fh:
        return tomllib.load(fh)


def signature_of(name: str) -> dict:
    """``[<name>.signature]`` of ``benchmarks.toml``: what every file of the benchmark shows
    (used by ``benchmarks.signature``)."""
    get_spec(name)
    return _raw()[name].get("signature", {})


@cache
def _specs() -> dict[str, BenchmarkSpec]:
    raw = _raw()
    specs = {}
    for name, entry in raw.items():
        specs[name] = BenchmarkSpec(
            name=name,
            module=entry["module"],
            tsv=entry["tsv"],
            md5=entry["md5"],
            rows=entry.get("rows"),
            image_folder=entry["image_folder"],
            kind=entry["kind"],
            required_columns=tuple(entry["required_columns"]),
            unit=entry["unit"],
            stratum=entry.get("stratum") or None,
            metric_keys=tuple(entry["metric_keys"]),
            metric_unit=entry["metric_unit"],
            url=entry.get("url"),
            metric_max=_metric_max(name, entry.get("metric_max")),
        )
    return specs


def _metric_max(name: str, raw) -> dict[str, float]:
    """``metric_max`` of ``benchmarks.toml``: a number (every key) or a table key -> number."""
    if raw is None:
        return {}
    table = raw if isinstance(raw, dict) else {"default": raw}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{_METADATA}: [{name}] metric_max.{key}: must be a positive number, got {value!r}")
    return {key: float(value) for key, value in table.items()}


def benchmark_names() -> list[str]:
    return list(_specs())


def get_spec(name: str) -> BenchmarkSpec:
    """The metadata of benchmark ``name`` without importing its scorer."""
    specs = _specs()
    if name not in specs:
        raise UnknownBenchmark(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(specs)}"
        )
    return specs[name]


@cache
def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; an unknown name lists the known ones."""
    spec = get_spec(name)
    module = importlib.import_module(f"{__name__}.{spec.module}")
    return module.BENCHMARK_CLASS(spec)


def all_benchmarks() -> list[Benchmark]:
    return [get_benchmark(name) for name in _specs()]

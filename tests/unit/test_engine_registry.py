"""Engines are looked up by name: the built-in ones are imported only when made, a test or
another backend registers its own, and a name nobody registered is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lavender_checks import engines


class Echo:
    name = "echo"

    def __init__(self, pair, **options):
        self.pair, self.options = pair, options

    def plan(self, keys, image_key_of):
        return [list(keys)]

    def generate(self, requests, variant, on_finish=None):
        return {r.key: variant for r in requests}

    def describe(self):
        return {"name": self.name}


def test_a_registered_engine_is_made_with_the_run_options(monkeypatch):
    monkeypatch.setitem(engines._FACTORIES, "echo", Echo)  # leaves the registry as it was
    assert "echo" in engines.engine_names()
    engine = engines.make_engine("echo", "the pair", batch_size=3, chunk_rows=7)
    assert isinstance(engine, Echo) and engine.pair == "the pair"
    assert engine.options == {"batch_size": 3, "chunk_rows": 7, "fast_config": None}


def test_register_engine_adds_a_name_and_refuses_the_built_in_ones(monkeypatch):
    monkeypatch.setattr(engines, "_FACTORIES", dict(engines._FACTORIES))
    engines.register_engine("echo", "tests.unit.test_engine_registry:Echo")  # imported when made
    assert isinstance(engines.make_engine("echo", None), Echo)
    for name in ("fast", "generate"):
        with pytest.raises(ValueError, match="built in"):
            engines.register_engine(name, Echo)
    assert engines.DEFAULT_ENGINE == "fast" and engines.engine_names()[:2] == ("fast", "generate")


def test_an_unknown_engine_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown generation engine 'slow'; engines: fast, generate"):
        engines.make_engine("slow", None)


def test_naming_the_engines_imports_neither_torch_nor_an_engine():
    code = ("import sys; from lavender_checks.engines import engine_names; engine_names(); "
            "sys.exit(any(m in sys.modules for m in ('torch', 'lavender_checks.engines.batched', "
            "'lavender_checks.engines.fast.engine')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

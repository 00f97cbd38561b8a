"""Shared fixtures of the suite's own tests: the tiny checkpoints (built once per session into
a temporary folder) and the tiny pairs loaded from them on CPU."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config):
    # A shell starts a background job with SIGINT ignored, and children inherit that: the
    # tests of Ctrl-C (the run's own and its child processes') would see no interrupt at all.
    # A Python-level handler is reset to the default in every child at exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _single_threaded_torch() -> None:
    # The tiny model gains nothing from intra-op threads, and on a busy machine OpenMP's
    # spinning makes more threads slower than one (figures in docs/speed.md).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

    _single_threaded_torch()
    return ensure_tiny_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"))


@pytest.fixture(scope="session")
def tiny_pair(tiny_checkpoints):
    """The tiny base + adapter on CPU (float32), loaded through ``load_pair``."""
    from lavender_checks.model import load_pair

    _single_threaded_torch()
    return load_pair(tiny_checkpoints.base, tiny_checkpoints.adapter, device="cpu")


@pytest.fixture(scope="session")
def tiny_base_pair(tiny_checkpoints):
    """The tiny base alone (a plain ``MllamaForConditionalGeneration``, no peft wrapper)."""
    from lavender_checks.model import load_pair

    _single_threaded_torch()
    return load_pair(tiny_checkpoints.base, None, device="cpu")

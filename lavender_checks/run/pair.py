"""The model pair of a run, loaded only when something is to be generated.

Which predictions a run can reuse depends on the pair's identity only (the fingerprints of
the weight folders, the processor's chat text, the device and dtype), all cheap to get; the
weights (11 B parameters on real ones) are loaded on the first ``generate``. A run whose
predictions are all stored never loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lavender_checks.run.config import RunConfig


def _folders(config: RunConfig) -> tuple[Path, Path, str | None]:
    """(base folder, adapter folder, device) of the run; the tiny pair's are built on first use."""
    if config.base_model is None:
        from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

        checkpoints = ensure_tiny_checkpoints()
        return checkpoints.base, checkpoints.adapter, config.device or "cpu"
    return config.base_model, config.lora, config.device


def load_model_pair(config: RunConfig):
    """The base model with the adapter, one weight copy (the tiny pair by default)."""
    from lavender_checks.model import load_pair

    base, adapter, device = _folders(config)
    return load_pair(base, adapter, device=device, dtype=config.dtype)


def pair_identity(config: RunConfig):
    """The ``model.PairIdentity`` ``load_model_pair`` would give, read from the folders
    without loading any weights."""
    from lavender_checks.model import read_pair_identity

    base, adapter, device = _folders(config)
    return read_pair_identity(base, adapter, device=device, dtype=config.dtype)


class LazyPair:
    """A model pair that loads its weights on the first ``generate`` (or on any use beyond
    its identity)."""

    def __init__(self, identity: Any, load: Callable[[], Any]):
        self.identity = identity
        self._load = load
        self._pair = None

    # getattr with a default: an AttributeError raised in a property would fall through to
    # __getattr__, which loads the weights.
    processor = property(lambda self: getattr(self.identity, "processor", None))
    base_fingerprint = property(lambda self: getattr(self.identity, "base_fingerprint", None))
    adapter_fingerprint = property(lambda self: getattr(self.identity, "adapter_fingerprint", None))
    adapter_fingerprints = property(lambda self: getattr(self.identity, "adapter_fingerprints", None))
    device = property(lambda self: getattr(self.identity, "device", None))
    dtype = property(lambda self: getattr(self.identity, "dtype", None))

    @property
    def loaded(self) -> bool:
        return self._pair is not None

    def get(self):
        """The loaded pair (loaded now if it was not)."""
        if self._pair is None:
            pair = self._load()
            for name in ("base_fingerprint", "adapter_fingerprint", "adapter_fingerprints"):
                if getattr(pair, name, None) != getattr(self.identity, name, None):
                    raise RuntimeError(f"the loaded pair's {name} differs from the one its "
                                       "folders gave before loading; were they changed meanwhile?")
            self._pair = pair
        return self._pair

    def generate(self, requests, variant, **options):
        return self.get().generate(requests, variant, **options)

    @property
    def engine_fallbacks(self) -> list:
        return list(getattr(self._pair, "engine_fallbacks", [])) if self.loaded else []

    def describe(self) -> dict[str, Any]:
        if self.loaded:
            return {**self._pair.describe(), "loaded": True}
        return {**self.identity.describe(), "loaded": False}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)

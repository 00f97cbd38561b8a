"""Generation engines: one interface, looked up by name.

An engine turns ``GenerationRequest`` objects (``engines.request``) into VLMEvalKit's
prediction strings for one variant of a ``ModelPair``. The run (``run.predict``) only talks
to this interface, so how predictions are computed (batched ``model.generate``, the fast
engine, a test's stand-in) is decided in one place: ``make_engine(name, pair, ...)``.

Registered engines:

* ``"fast"`` (the default of a run): ``engines.fast.FastEngine``, continuous batching with
  vision once per image; what it cannot take goes to ``"generate"``, logged and recorded;
* ``"generate"``: ``engines.batched.BatchedEngine``, batched ``model.generate``.

Factories are registered as ``"module:attribute"`` strings and imported on first use, so
naming an engine costs no torch import. Tests register their own engines with
``register_engine``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lavender_checks.engines.request import GenerationRequest, OnFinish

FAST_ENGINE = "fast"
GENERATE_ENGINE = "generate"
DEFAULT_ENGINE = FAST_ENGINE


class Engine(Protocol):
    """What a run needs of an engine."""

    name: str
    # True when each row's tokens are a function of that row alone, whatever else shares its
    # calls; the store keeps the predictions of engines that are not apart (run.predict.store_key).
    batch_invariant: bool

    def plan(self, keys: Sequence[Any], image_key_of: Callable[[Any], str]) -> list[list[Any]]:
        """How a run hands its rows (``keys``, in frame order) to ``generate``: the calls, in
        order. It depends on the whole frame only, so a resumed run cuts the same calls."""
        ...

    def generate(self, requests: "Sequence[GenerationRequest]", variant: str,
                 on_finish: "OnFinish | None" = None) -> dict[Any, str]:
        """``{request.key: prediction}`` in request order; ``on_finish([(key, prediction),
        ...])`` as rows finish, so the caller can store them at once."""
        ...

    def describe(self) -> dict[str, Any]:
        """What a report records about the engine: at least its ``name``."""
        ...


# A factory is called as factory(pair, batch_size=..., chunk_rows=..., fast_config=...).
EngineFactory = Callable[..., Engine]

_BUILT_IN: dict[str, str] = {
    FAST_ENGINE: "lavender_checks.engines.fast:FastEngine",
    GENERATE_ENGINE: "lavender_checks.engines.batched:BatchedEngine",
}
_FACTORIES: dict[str, str | EngineFactory] = dict(_BUILT_IN)


def register_engine(name: str, factory: str | EngineFactory) -> None:
    """Make ``name`` an engine (a test's stand-in, another backend). The built-in names
    cannot be taken; registering a name again replaces its factory."""
    if name in _BUILT_IN:
        raise ValueError(f"engine {name!r} is built in and cannot be replaced")
    _FACTORIES[name] = factory


def engine_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def make_engine(name: str, pair: Any, *, batch_size: int = 8, chunk_rows: int | None = None,
                fast_config: Any = None) -> Engine:
    """The engine ``name`` over ``pair``. batch_size: rows per ``model.generate`` call of the
    batched engine; chunk_rows: rows per fast-engine call; fast_config: a
    ``FastGenConfig`` (None: its defaults)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown generation engine {name!r}; engines: {', '.join(_FACTORIES)}")
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory(pair, batch_size=batch_size, chunk_rows=chunk_rows, fast_config=fast_config)

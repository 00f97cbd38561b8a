"""The model under test: the full-size architecture with random weights (or the tiny pair on
CPU) and the greedy generation settings every path shares."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavender_checks.engines.fast.config import GIB
from lavender_checks.speed.workload import Workload, WorkloadError

FORCE_NEVER_EOS = 1 << 30  # min_new_tokens that no row reaches


@dataclass
class Subject:
    """The model pair and the generation settings every path shares (one weight copy)."""

    pair: Any  # ModelPair: a peft.PeftModel over MllamaForConditionalGeneration
    generation_config: Any  # greedy; EOS off when lengths are forced
    description: dict = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.pair.model

    @property
    def processor(self) -> Any:
        return self.pair.processor

    @property
    def device(self) -> Any:
        return self.pair.device

    @property
    def variant_context(self) -> Any:  # variant -> context manager
        return self.pair.variant


def _greedy_config(model: Any, processor: Any, force_lengths: bool):
    from lavender_checks.engines.fast.mllama import unwrap
    from lavender_checks.engines.request import greedy_settings

    config = greedy_settings(unwrap(model).generation_config, processor.tokenizer).generation_config
    if force_lengths:
        # Forced lengths must be exact: EOS is made impossible (its score -inf at every step),
        # as min_new_tokens does in generate. The one-sample loop sets it to each row's budget;
        # the fast path reads this "never" value. Random weights hardly ever pick EOS anyway.
        config.min_new_tokens = FORCE_NEVER_EOS
    return config


def _adapter_settings(workload: Workload, adapter_config: str | None) -> dict:
    settings = {"r": workload.adapter["r"], "lora_alpha": workload.adapter["lora_alpha"],
                "target_modules": list(workload.adapter["target_modules"]), "source": str(workload.path)}
    if adapter_config:
        path = Path(adapter_config)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkloadError(f"{path}: cannot read adapter_config.json ({exc})") from exc
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in raw:
                raise WorkloadError(f"{path}: no {key!r} in adapter_config.json")
        settings = {"r": raw["r"], "lora_alpha": raw["lora_alpha"],
                    "target_modules": raw["target_modules"], "source": str(path)}
    return settings


def build_fullsize_subject(workload: Workload, args) -> Subject:
    """The full-size architecture with random weights on CUDA, and a random adapter."""
    import torch

    from lavender_checks.model import resolve_device
    from lavender_checks.synthetic.fullsize import fullsize_pair

    device = resolve_device(args.device)
    if args.dtype == "float32" and device.type == "cuda":
        # float32 means float32: no TF32 in matmuls or in the patch embedding's convolution,
        # whose kernel choice may differ between batch sizes.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    settings = _adapter_settings(workload, args.adapter_config)
    t0 = time.perf_counter()
    pair = fullsize_pair(device, args.dtype, seed=args.seed, lora=settings, attn=args.attn)
    sync(pair.device)
    built = time.perf_counter() - t0
    return _subject(pair, args, {"kind": "full-size, random weights", "build_seconds": built, "adapter": settings})


def build_tiny_subject(workload: Workload, args) -> Subject:
    """The tiny model and its adapter on CPU, loaded as the suite loads real weights."""
    import torch

    from lavender_checks.model import load_pair
    from lavender_checks.synthetic.tiny import ensure_tiny_checkpoints

    paths = ensure_tiny_checkpoints()
    pair = load_pair(paths.base, paths.adapter, device="cpu", dtype=torch.float32)
    return _subject(pair, args, {"kind": "tiny, CPU (timings meaningless)", "adapter": {"source": str(paths.adapter)}})


def _subject(pair: Any, args, description: dict) -> Subject:
    return Subject(pair=pair, generation_config=_greedy_config(pair.model, pair.processor, args.force_lengths),
                   description={**description, "lora_modules": pair.lora_modules_by_tower})


def sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: Any) -> float | None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / GIB
    return None

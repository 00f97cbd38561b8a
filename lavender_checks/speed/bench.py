"""``lavender-checks bench``: the speed benchmark on the full-size architecture.

Builds Llama-3.2-11B-Vision's architecture with random weights and a random LoRA shaped like
the Lavender authors' default (``workload.toml`` [adapter]; a real ``adapter_config.json``
overrides it), then runs the stated workload (``workload.toml``: the four benchmarks' rows,
images, tiles, prompt and output lengths) through, in one process on one GPU:

* ``a``: a one-sample loop like VLMEvalKit's (``processor`` + ``model.generate`` per row),
  on a stratified subset with output lengths capped, extrapolated to the whole workload from
  its measured per-row prefill time and per-token decode time;
* ``fast``: the fast runner (``lavender_checks.engines.fast.engine``) on a scaled copy of the workload
  (every benchmark and variant, rows in runner-sized chunks), projected to the full gate;
* ``plain`` (optional): the suite's batched ``generate`` on a few rows, for reference.

The ``a`` subset doubles as the correctness sample: the fast runner generates the same rows
and the report counts the sequences whose greedy tokens equal one-sample ``generate``'s.

Random weights never stop by themselves, so output lengths are forced: EOS is switched off in
the generation config and every row generates exactly its drawn number of tokens.

Writes ``reports/bench/bench-<time>.json`` (``--out``) and prints a summary. Without CUDA it
exits with an error unless ``--tiny-cpu`` runs the whole harness on the tiny model on CPU (for
tests; its timings mean nothing). Speed targets are printed next to the figures, never
asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lavender_checks import REPORTS
from lavender_checks.run.predict import DEFAULT_CHUNK_ROWS

WORKLOAD_PATH = Path(__file__).with_name("workload.toml")
BENCHMARK_ORDER = ("DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME")
GIB = 1 << 30
FORCE_NEVER_EOS = 1 << 30  # min_new_tokens that no row reaches

# Tile layouts the Mllama processor picks for an image of exactly rows x cols tiles.
TILE_LAYOUTS = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------
# The stated workload


@dataclass(frozen=True)
class Buckets:
    """A distribution as [weight, low, high] buckets; values uniform inside a bucket."""

    buckets: tuple[tuple[float, int, int], ...]

    def draw(self, rng: random.Random) -> int:
        pick = rng.random()
        for weight, low, high in self.buckets:
            if pick < weight:
                return rng.randint(low, high)
            pick -= weight
        _, low, high = self.buckets[-1]
        return rng.randint(low, high)

    def mean(self) -> float:
        return sum(w * (lo + hi) / 2 for w, lo, hi in self.buckets)


@dataclass(frozen=True)
class BenchmarkLoad:
    name: str
    rows: int
    images: int
    image_first: bool
    max_new_tokens: int
    tiles: tuple[tuple[float, int], ...]
    prompt_tokens: Buckets
    output_tokens: Buckets

    def draw_tiles(self, rng: random.Random) -> int:
        pick = rng.random()
        for weight, tiles in self.tiles:
            if pick < weight:
                return tiles
            pick -= weight
        return self.tiles[-1][1]


@dataclass(frozen=True)
class Workload:
    path: Path
    seed: int
    variants: tuple[str, ...]
    adapter: dict
    targets: dict
    benchmarks: tuple[BenchmarkLoad, ...]


def load_workload(path: str | Path | None = None) -> Workload:
    """Read and check a workload file (default: the package's ``workload.toml``)."""
    path = Path(path) if path is not None else WORKLOAD_PATH
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read the workload file ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise WorkloadError(f"{path}: not valid TOML ({exc})") from exc

    def need(table: dict, key: str, where: str, kind: type | tuple[type, ...]):
        if key not in table:
            raise WorkloadError(f"{path}: [{where}] has no {key!r}")
        value = table[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise WorkloadError(f"{path}: [{where}] {key} = {value!r} is not {getattr(kind, '__name__', kind)}")
        return value

    def buckets(table: dict, key: str, where: str, cap: int | None) -> Buckets:
        items = need(table, key, where, list)
        out = []
        for i, item in enumerate(items):
            if (not isinstance(item, list) or len(item) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)):
                raise WorkloadError(f"{path}: [{where}] {key}[{i}] = {item!r} is not [weight, low, high]")
            weight, low, high = float(item[0]), item[1], item[2]
            if low != int(low) or high != int(high) or not 1 <= low <= high or weight <= 0:
                raise WorkloadError(f"{path}: [{where}] {key}[{i}] = {item!r}: need weight > 0 and "
                                    "integers 1 <= low <= high")
            if cap is not None and high > cap:
                raise WorkloadError(f"{path}: [{where}] {key}[{i}] = {item!r} exceeds max_new_tokens {cap}")
            out.append((weight, int(low), int(high)))
        if not out or abs(sum(w for w, _, _ in out) - 1.0) > 1e-6:
            raise WorkloadError(f"{path}: [{where}] {key}: bucket weights must sum to 1")
        return Buckets(tuple(out))

    seed = need(raw, "seed", "top level", int)
    variants = tuple(need(raw, "variants", "top level", list))
    if not variants or not all(isinstance(v, str) for v in variants):
        raise WorkloadError(f"{path}: [top level] variants must be a non-empty list of names")
    adapter = need(raw, "adapter", "top level", dict)
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("target_modules", list)):
        need(adapter, key, "adapter", kind)
    targets = need(raw, "targets", "top level", dict)
    for key in ("gate_minutes", "speedup", "limit_ratio", "peak_gib", "equivalence"):
        need(targets, key, "targets", (int, float))
    tables = need(raw, "benchmarks", "top level", dict)
    loads = []
    for name, table in tables.items():
        where = f"benchmarks.{name}"
        rows = need(table, "rows", where, int)
        images = need(table, "images", where, int)
        if not 1 <= images <= rows:
            raise WorkloadError(f"{path}: [{where}] needs 1 <= images <= rows (images={images}, rows={rows})")
        cap = need(table, "max_new_tokens", where, int)
        tiles_raw = need(table, "tiles", where, list)
        tiles = []
        for i, item in enumerate(tiles_raw):
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], int)
                    or item[1] not in TILE_LAYOUTS or not isinstance(item[0], (int, float)) or item[0] <= 0):
                raise WorkloadError(f"{path}: [{where}] tiles[{i}] = {item!r} is not [weight, tiles 1..4]")
            tiles.append((float(item[0]), item[1]))
        if abs(sum(w for w, _ in tiles) - 1.0) > 1e-6:
            raise WorkloadError(f"{path}: [{where}] tiles: weights must sum to 1")
        loads.append(BenchmarkLoad(
            name=name, rows=rows, images=images,
            image_first=need(table, "image_first", where, bool),
            max_new_tokens=cap, tiles=tuple(tiles),
            prompt_tokens=buckets(table, "prompt_tokens", where, None),
            output_tokens=buckets(table, "output_tokens", where, cap),
        ))
    if not loads:
        raise WorkloadError(f"{path}: no [benchmarks.*] table")
    return Workload(path=path, seed=seed, variants=variants, adapter=dict(adapter),
                    targets=dict(targets), benchmarks=tuple(loads))


@dataclass(frozen=True)
class BenchRow:
    """One row of the synthetic workload."""

    benchmark: str
    key: str
    image_id: int  # rows with the same id get identical pixels
    tiles: int
    prompt_tokens: int  # target, chat markup included
    output_tokens: int
    image_first: bool


def sample_rows(load: BenchmarkLoad, seed: int, scale: float = 1.0) -> list[BenchRow]:
    """The rows of one benchmark at ``scale`` (rows and images both scaled, at least 1),
    deterministic for a seed. Rows are spread evenly over the images and come grouped by
    image, as a runner that sorts rows by image key hands them over."""
    rows = max(1, round(load.rows * scale))
    images = max(1, min(rows, round(load.images * scale)))
    rng = random.Random(f"{seed}:{load.name}")
    out = []
    for image in range(images):
        per_image = rows // images + (1 if image < rows % images else 0)
        tiles = load.draw_tiles(rng)
        for _ in range(per_image):
            out.append(BenchRow(
                benchmark=load.name, key=f"{load.name}:{len(out)}", image_id=image, tiles=tiles,
                prompt_tokens=load.prompt_tokens.draw(rng),
                output_tokens=load.output_tokens.draw(rng), image_first=load.image_first,
            ))
    return out


def workload_totals(workload: Workload) -> dict[str, dict[str, float]]:
    """Per benchmark, one variant, full scale: rows, images, drawn new and prompt tokens."""
    totals = {}
    for load in workload.benchmarks:
        rows = sample_rows(load, workload.seed, 1.0)
        totals[load.name] = {
            "rows": len(rows), "images": len({r.image_id for r in rows}),
            "new_tokens": sum(r.output_tokens for r in rows),
            "prompt_tokens": sum(r.prompt_tokens for r in rows),
        }
    return totals


# ---------------------------------------------------------------------------------------
# Synthetic requests: texts of a target token length, images of a given tile count


class RequestMaker:
    """Turns ``BenchRow``s into the suite's ``GenerationRequest``s for one processor."""

    def __init__(self, processor: Any, profile_name: str = "vlmevalkit", seed: int = 0):
        from lavender_checks.profiles import load_profile

        self.processor = processor
        self.profile = load_profile(profile_name)
        words = set()
        for prompting in self.profile.benchmarks.values():
            if prompting.template:
                words.update(w for w in prompting.template.replace("{question}", " ").split() if w.isalpha())
        self.words = sorted(words) + [str(n) for n in range(10, 100, 7)]
        self.seed = seed
        self.tile_px = int(processor.image_processor.size["height"])
        self._measured: dict[str, int] = {}

    def text(self, row: BenchRow) -> tuple[str, int]:
        """A chat text with as close to ``row.prompt_tokens`` tokens as whole words allow."""
        from lavender_checks.engines.fast.engine import encode_text
        from lavender_checks.prompts import Prompt, chat_text

        prompting = self.profile.for_benchmark(row.benchmark)
        rng = random.Random(f"{self.seed}:{row.key}")
        pool = [rng.choice(self.words) for _ in range(max(8, row.prompt_tokens))]

        def build(n: int) -> tuple[str, int]:
            question = " ".join(pool[:n])
            text = prompting.template.replace("{question}", question) if prompting.template else question
            chat = chat_text(self.processor, Prompt(text=text, image_first=row.image_first))
            return chat, len(encode_text(self.processor, chat, True))

        low, high = 0, len(pool)
        best = build(0)
        while low <= high:  # tokens grow with words: binary search the word count
            mid = (low + high) // 2
            chat, count = build(mid)
            if abs(count - row.prompt_tokens) < abs(best[1] - row.prompt_tokens):
                best = (chat, count)
            if count < row.prompt_tokens:
                low = mid + 1
            elif count > row.prompt_tokens:
                high = mid - 1
            else:
                break
        return best

    def image_loader(self, row: BenchRow):
        """A zero-argument callable making the row's image (noise, exactly its tiles)."""
        rows_, cols = TILE_LAYOUTS[row.tiles]
        height, width = rows_ * self.tile_px, cols * self.tile_px
        seed = f"{self.seed}:{row.benchmark}:{row.image_id}"

        def load():
            import numpy as np
            from PIL import Image

            # A digest of the whole seed string: distinct images must get distinct pixels.
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little"))
            noise = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
            return Image.fromarray(noise, "RGB").resize((width, height), Image.NEAREST)

        return load

    def requests(self, rows: list[BenchRow], cap: int | None = None) -> tuple[list, dict[str, int]]:
        """Requests (image loaders inside) and the prompt token count of each row."""
        from lavender_checks.engines.batched import GenerationRequest

        out, lengths = [], {}
        for row in rows:
            chat, count = self.text(row)
            lengths[row.key] = count
            tokens = row.output_tokens if cap is None else min(cap, row.output_tokens)
            # image_key as the runner passes data.image_key: rows of one image share features
            out.append(GenerationRequest(key=row.key, text=chat, images=[self.image_loader(row)],
                                         max_new_tokens=tokens, image_key=f"{row.benchmark}:{row.image_id}"))
        return out, lengths


# ---------------------------------------------------------------------------------------
# The model under test


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
    import copy

    from lavender_checks.engines.fast.engine import _unwrap

    config = copy.deepcopy(_unwrap(model).generation_config)
    config.do_sample = False
    config.num_beams = 1
    for name in ("temperature", "top_p", "top_k"):
        if hasattr(config, name):
            setattr(config, name, None)
    config.pad_token_id = processor.tokenizer.pad_token_id
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

    from lavender_checks.synthetic.fullsize import fullsize_pair
    from lavender_checks.model import resolve_device

    device = resolve_device(args.device)
    if args.dtype == "float32" and device.type == "cuda":
        # float32 means float32: no TF32 in matmuls or in the patch embedding's convolution,
        # whose kernel choice may differ between batch sizes.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    settings = _adapter_settings(workload, args.adapter_config)
    t0 = time.perf_counter()
    pair = fullsize_pair(device, args.dtype, seed=args.seed, lora=settings, attn=args.attn)
    _sync(pair.device)
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


# ---------------------------------------------------------------------------------------
# The card's ceilings and the workload's floor


def measure_card(device: Any) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matrix rate, measured as METHOD.md says."""
    import torch

    info = {"name": torch.cuda.get_device_name(device)}
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(8):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(stop) / 1000)
    info["bandwidth_bytes_per_s"] = 2 * src.numel() * 2 / sorted(times[2:])[len(times[2:]) // 2]
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(8):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        stop.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(stop) / 1000)
    info["matmul_flops_per_s"] = 2 * 8192**3 / sorted(times[2:])[len(times[2:]) // 2]
    del a, b
    torch.cuda.empty_cache()
    return info


def model_costs(model: Any) -> dict:
    """Bytes read per decode step (text decoder + lm_head, LoRA included) and FLOPs per image
    (vision tower over all tile slots, projector, cross-attention keys/values)."""
    from lavender_checks.engines.fast.engine import _unwrap

    mllama = _unwrap(model)
    text = mllama.model.language_model
    step_bytes = sum(p.numel() * p.element_size() for n, p in text.named_parameters()
                     if not n.startswith("embed_tokens"))
    step_bytes += sum(p.numel() * p.element_size() for p in mllama.lm_head.parameters())
    vc = mllama.config.vision_config
    tc = mllama.config.get_text_config()
    patches = (vc.image_size // vc.patch_size) ** 2 + 1
    tokens = vc.max_num_tiles * (patches + (8 - patches % 8) % 8)  # padded to a multiple of 8
    h, inter = vc.hidden_size, vc.intermediate_size
    layers = vc.num_hidden_layers + vc.num_global_layers
    tower = layers * (2 * tokens * (4 * h * h + 2 * h * inter) + 4 * tokens * tokens * h)
    tower += 2 * vc.max_num_tiles * (patches - 1) * vc.num_channels * vc.patch_size**2 * h
    vision_tokens = vc.max_num_tiles * patches
    projector = 2 * vision_tokens * vc.vision_output_dim * tc.hidden_size
    kv_dim = tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads)
    cross_kv = len(tc.cross_attention_layers) * 2 * 2 * vision_tokens * tc.hidden_size * kv_dim
    text_params = sum(p.numel() for n, p in text.named_parameters() if not n.startswith("embed_tokens"))
    cross_kv_bytes_per_row = (len(tc.cross_attention_layers) * 2 * vision_tokens * kv_dim
                              * mllama.lm_head.weight.element_size())
    return {
        "decode_step_weight_bytes": step_bytes,
        "vision_tower_flops_per_image": tower,
        "image_flops_per_image": tower + projector + cross_kv,
        "prefill_flops_per_token": 2 * text_params,
        "cross_kv_bytes_per_row": cross_kv_bytes_per_row,
    }


def card_limit(totals: dict, costs: dict, card: dict, slots: int, variants: int,
               vision_per_variant: bool) -> dict:
    """The card's limit for the whole gate: decode steps at ``slots`` rows each, reading the
    weights once per step at copy bandwidth, plus the image-side FLOPs at matrix rate. A
    fuller floor adds the text prefill FLOPs and the cross-attention keys/values per step."""
    bw, peak = card["bandwidth_bytes_per_s"], card["matmul_flops_per_s"]
    steps = variants * sum(math.ceil(t["new_tokens"] / slots) for t in totals.values())
    images = sum(t["images"] for t in totals.values()) * (variants if vision_per_variant else 1)
    decode_s = steps * costs["decode_step_weight_bytes"] / bw
    image_s = images * costs["image_flops_per_image"] / peak
    prefill_s = variants * sum(t["prompt_tokens"] for t in totals.values()) * costs["prefill_flops_per_token"] / peak
    cross_s = variants * sum(t["new_tokens"] for t in totals.values()) * costs["cross_kv_bytes_per_row"] / bw
    return {
        "decode_steps": steps, "images": images, "decode_seconds": decode_s, "image_seconds": image_s,
        "limit_seconds": decode_s + image_s,
        "fuller_floor_seconds": decode_s + image_s + prefill_s + cross_s,
        "prefill_seconds": prefill_s, "cross_kv_read_seconds": cross_s,
    }


# ---------------------------------------------------------------------------------------
# The paths


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / GIB
    return None


def run_one_sample(subject: Subject, requests: list, variant: str) -> dict[str, dict]:
    """VLMEvalKit's loop: per row, open the image, call the processor, ``generate`` alone.

    Per row: total seconds, seconds to the first token (prefill, preprocessing included) and
    the new token ids.
    """
    import copy

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                _sync(subject.device)
                self.at = time.perf_counter()
            return scores

    out = {}
    with torch.inference_mode(), subject.variant_context(variant):
        for request in requests:
            _sync(subject.device)
            t0 = time.perf_counter()
            image = request.images[0]() if callable(request.images[0]) else request.images[0]
            inputs = subject.processor(images=[[image]], text=[request.text], return_tensors="pt")
            inputs = inputs.to(subject.device)
            config = copy.deepcopy(subject.generation_config)
            config.max_new_tokens = request.max_new_tokens
            if config.min_new_tokens == FORCE_NEVER_EOS:
                config.min_new_tokens = request.max_new_tokens
            marker = FirstToken()
            output = subject.model.generate(**inputs, generation_config=config,
                                            logits_processor=LogitsProcessorList([marker]),
                                            output_scores=True, return_dict_in_generate=True)
            _sync(subject.device)
            t1 = time.perf_counter()
            ids = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            # Top-1 minus top-2 score of every step: a near tie is where bf16 noise can flip greedy.
            margins = [float(top[0] - top[1]) for top in
                       (step[0].float().topk(2).values for step in output.scores)]
            out[request.key] = {"seconds": t1 - t0, "prefill_seconds": (marker.at or t1) - t0,
                                "ids": ids, "margins": margins}
    return out


def run_hf_batched(subject: Subject, requests: list, variant: str, batch_size: int = 8) -> dict[str, list[int]]:
    """Plain batched ``generate`` (left padding, rows grouped by token budget), the way the
    suite's generate batches: its drift from one-sample ``generate`` is the noise floor that
    batching alone brings in bf16."""
    import copy

    import torch

    groups: dict[int, list] = {}
    for request in requests:
        groups.setdefault(request.max_new_tokens, []).append(request)
    out: dict[str, list[int]] = {}
    with torch.inference_mode(), subject.variant_context(variant):
        for budget, group in sorted(groups.items()):
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                images = [[r.images[0]() if callable(r.images[0]) else r.images[0]] for r in batch]
                inputs = subject.processor(images=images, text=[r.text for r in batch], padding=True,
                                           return_tensors="pt").to(subject.device)
                config = copy.deepcopy(subject.generation_config)
                config.max_new_tokens = budget
                if config.min_new_tokens == FORCE_NEVER_EOS:
                    config.min_new_tokens = budget
                output = subject.model.generate(**inputs, generation_config=config)
                for request, row in zip(batch, output[:, inputs["input_ids"].shape[1]:].tolist()):
                    out[request.key] = row
    return out


def run_fast(engine: Any, requests: list, variant: str, chunk_rows: int) -> dict:
    """The fast runner over ``requests`` in the runner's chunks (grouped by image, never cut
    inside one: ``runner.pack_groups``); ids, seconds, stats and the number of chunks."""
    from lavender_checks.engines.fast.engine import FastGenStats
    from lavender_checks.run.predict import pack_groups

    stats = FastGenStats()
    ids: dict[str, list[int]] = {}
    chunks = pack_groups(requests, lambda r: r.image_key, chunk_rows)
    _sync(engine.device)
    t0 = time.perf_counter()
    for chunk in chunks:
        ids.update(engine.generate_ids(chunk, variant))
        stats.add(engine.last_stats)
    _sync(engine.device)
    return {"seconds": time.perf_counter() - t0, "ids": ids, "stats": stats, "chunks": len(chunks)}


def shard_rows(rows: list[BenchRow], shard: tuple[int, int]) -> list[BenchRow]:
    """Shard i of n of one benchmark's rows, split as the gate splits a benchmark under
    pytest-xdist (``data.subset``): whole images, each to the shard with the fewest rows."""
    from lavender_checks.data import balanced_shards

    i, n = shard
    groups: dict[int, list[BenchRow]] = {}
    for row in rows:
        groups.setdefault(row.image_id, []).append(row)
    owners = balanced_shards([len(g) for g in groups.values()], n)
    return [row for group, owner in zip(groups.values(), owners) if owner == i for row in group]


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shard is i/n, e.g. 0/2, not {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= i < n")
    return i, n


# ---------------------------------------------------------------------------------------
# The command


def add_workload_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The workload and the fast path's knobs; returns their actions (``bench-gpus`` hands
    these options on to every process)."""
    added: list[argparse.Action] = []

    def add(*flags, **options) -> None:
        added.append(parser.add_argument(*flags, **options))

    add("--workload", default=None, help="workload TOML (default: the package's workload.toml)")
    add("--scale", type=float, default=0.2,
                        help="fraction of every benchmark's rows and images the fast path runs (default 0.2: "
                             "the smallest at which every benchmark's steady phase is longer than one batch "
                             "of 125 slots; a smaller run projects its decode more coarsely, and says so)")
    add("--slots", type=int, default=None, help="decode batch of the fast path (default: FastGenConfig)")
    add("--chunk-rows", type=int, default=None,
                        help="rows per fast-runner call, grouped by image as the runner hands them "
                             "(default: the runner's, runner.DEFAULT_CHUNK_ROWS)")
    add("--warmup-rows", type=int, default=32,
                        help="rows per benchmark and variant run through the fast runner, untimed, before "
                             "its timed pass (first-use costs of kernels and allocations; 0: none)")
    add("--vision-batch", type=int, default=None, help="images per vision-tower call")
    add("--no-graphs", action="store_true", help="decode without CUDA graphs")
    add("--vision-attention", choices=("transformers", "split"), default=None,
                        help="vision-tower attention of the fast path (default: FastGenConfig)")
    add("--buckets", choices=("double", "linear"), default=None,
                        help="key-length buckets of the decode step (default: FastGenConfig)")
    add("--admit-fraction", type=float, default=None,
                        help="prefill waiting rows once this fraction of the slots is free (default: FastGenConfig)")
    add("--max-output-tokens", type=int, default=None,
                        help="cap every drawn output length (quick runs; changes the workload, and says so)")
    add("--adapter-config", default=None,
                        help="a real adapter_config.json whose r, lora_alpha and target_modules the random adapter takes")
    add("--attn", default="sdpa", help="attention implementation of the model (default sdpa)")
    add("--seed", type=int, default=0, help="seed of the random weights")
    return added


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--paths", default="a,fast",
                        help="comma-separated paths to run: a (one-sample loop), fast, plain (default a,fast)")
    parser.add_argument("--a-rows", type=int, default=6,
                        help="rows per benchmark and variant for the one-sample loop and the correctness sample")
    parser.add_argument("--a-max-new-tokens", type=int, default=16,
                        help="output cap for the one-sample loop's rows (its per-token cost is extrapolated)")
    parser.add_argument("--plain-rows", type=int, default=8, help="rows per benchmark for the plain path")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                        help="run shard I of N of every benchmark's scaled rows on the fast path (whole "
                             "images, as the gate shards under pytest-xdist); `bench-gpus` starts one per GPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights and compute of the full-size model (default bfloat16 on CUDA). float32 "
                             "(TF32 off) makes the correctness sample immune to bf16 near ties; its "
                             "timings are not the gate's")
    parser.add_argument("--tie-margin", type=float, default=0.1,
                        help="score margin below which a first difference counts as a near tie (report only)")
    parser.add_argument("--no-force-lengths", dest="force_lengths", action="store_false",
                        help="keep EOS on (outputs may end early; lengths no longer follow the workload)")
    parser.add_argument("--tiny-cpu", action="store_true",
                        help="run the whole harness on the tiny model on CPU (a test of the harness; timings mean nothing)")
    parser.add_argument("--device", default="cuda",
                        help="device of the full-size model (default cuda; cpu only makes sense for a scaled-down config)")
    parser.add_argument("--out", default=None, help="JSON report path (default reports/bench/bench-<time>.json)")


def main(args: argparse.Namespace) -> int:
    import torch

    if not args.tiny_cpu and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("lavender-checks bench: CUDA is required (this torch sees no CUDA device); "
              "use --tiny-cpu to run the harness on the tiny model on CPU", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - {"a", "fast", "plain"})
    if unknown or not paths:
        print(f"lavender-checks bench: unknown path(s) {unknown or paths}; choose from a, fast, plain",
              file=sys.stderr)
        return 2
    if not 0 < args.scale <= 1:
        print(f"lavender-checks bench: --scale must be in (0, 1], got {args.scale}", file=sys.stderr)
        return 2
    if args.shard is not None and paths != ["fast"]:
        print("lavender-checks bench: --shard runs the fast path only (add --paths fast)", file=sys.stderr)
        return 2
    if args.chunk_rows is not None and args.chunk_rows < 1:
        print(f"lavender-checks bench: --chunk-rows must be at least 1, got {args.chunk_rows}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.tiny_cpu:
        torch.set_num_threads(1)  # the tiny model's ops are too small to split across threads
    try:
        workload = load_workload(args.workload)
        report = run_bench(workload, args, paths)
    except WorkloadError as exc:
        print(f"lavender-checks bench: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(summary_text(report))
    return 0


def run_bench(workload: Workload, args, paths: list[str]) -> dict:
    """Run the chosen paths and return the report (also written to ``--out`` as it grows)."""
    import torch

    from lavender_checks.engines.fast.engine import FastGenConfig, FastGenerator

    started = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.out) if args.out else REPORTS / "bench" / f"bench-{started}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": started, "workload": str(workload.path), "scale": args.scale, "paths": paths,
        "shard": list(args.shard) if args.shard else None,
        "targets": workload.targets, "versions": _versions(),
        "notes": [],
    }

    def save() -> None:
        out.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")

    cap = args.max_output_tokens
    if cap is not None:
        report["notes"].append(f"every output length capped at {cap}: not the stated workload")
    if not args.force_lengths:
        report["notes"].append("EOS left on: outputs may end before their drawn length")
    if args.tiny_cpu:
        report["notes"].append("tiny model on CPU: a test of the harness; its timings and targets say "
                               "nothing about the full-size model on a GPU")
    subject = build_tiny_subject(workload, args) if args.tiny_cpu else build_fullsize_subject(workload, args)
    mllama_config = subject.model.get_base_model().config if hasattr(subject.model, "get_base_model") else subject.model.config
    report["device"] = (torch.cuda.get_device_name(subject.device) if subject.device.type == "cuda" else "cpu")
    report["model"] = dict(subject.description, attn_implementation=getattr(mllama_config, "_attn_implementation", None))
    report["dtype"] = str(subject.model.dtype if hasattr(subject.model, "dtype") else "").replace("torch.", "")
    if report["dtype"] == "float32" and not args.tiny_cpu:
        report["notes"].append("float32 weights and compute: the correctness sample is the point of this run; "
                               "its timings are not the gate's (bfloat16)")
    costs = model_costs(subject.model)
    report["costs"] = costs
    if subject.device.type == "cuda" and args.shard is None:
        report["card"] = measure_card(subject.device)
    save()

    totals = workload_totals(workload)
    if cap is not None:
        for load in workload.benchmarks:
            totals[load.name]["new_tokens"] = sum(min(cap, r.output_tokens)
                                                  for r in sample_rows(load, workload.seed, 1.0))
    report["workload_totals"] = totals
    maker = RequestMaker(subject.processor, seed=workload.seed)

    cfg = FastGenConfig()
    overrides = {}
    if args.slots:
        overrides["max_slots"] = args.slots
    if args.vision_batch:
        overrides["vision_batch"] = args.vision_batch
    if args.no_graphs:
        overrides["cuda_graphs"] = False
    if args.vision_attention:
        overrides["vision_attention"] = args.vision_attention
    if args.buckets:
        overrides["bucket_growth"] = args.buckets
    if args.admit_fraction:
        overrides["admit_fraction"] = args.admit_fraction
    cfg = FastGenConfig(**{**asdict(cfg), **overrides, "phase_timing": True})
    engine = FastGenerator(subject.model, subject.processor, variant_context=subject.variant_context,
                           generation_config=subject.generation_config, config=cfg)
    report["fast_config"] = asdict(cfg)
    save()

    # The correctness sample and the one-sample loop's subset: the first a_rows rows of every
    # benchmark (at the run's scale), with output lengths capped. Requests are made once, before
    # any timing (making a text of a given token length takes a few tokenizer calls); image
    # loaders inside them run in the timed part.
    scaled = {load.name: sample_rows(load, workload.seed, args.scale) for load in workload.benchmarks}
    # The share of the full gate this process stands for (1 unless sharded).
    share = {name: 1.0 for name in scaled}
    if args.shard is not None:
        for name, rows in scaled.items():
            mine = shard_rows(rows, args.shard)
            share[name] = len(mine) / len(rows)
            scaled[name] = mine
    chunk_rows = args.chunk_rows or DEFAULT_CHUNK_ROWS
    if "a" in paths:
        a_cap = min(args.a_max_new_tokens, cap or args.a_max_new_tokens)
        a_requests = {name: maker.requests(rows[: args.a_rows], cap=a_cap)[0] for name, rows in scaled.items()}
        a_section: dict[str, Any] = {"rows": {}, "max_new_tokens_cap": a_cap}
        compared: dict[str, dict] = {}
        per_bench: dict[str, dict] = {}
        first = next(iter(a_requests.values()))[:1]
        run_one_sample(subject, first, workload.variants[0])  # warm-up, not timed
        _reset_peak(subject.device)
        for variant in workload.variants:
            for name, requests in a_requests.items():
                timed = run_one_sample(subject, requests, variant)
                for key, value in timed.items():
                    a_section["rows"][f"{variant}/{key}"] = {k: v for k, v in value.items()
                                                             if k not in ("ids", "margins")}
                acc = per_bench.setdefault(name, {"rows": 0, "prefill": 0.0, "decode": 0.0, "decode_tokens": 0,
                                                  "seconds": 0.0, "new_tokens": 0})
                for value in timed.values():
                    acc["rows"] += 1
                    acc["seconds"] += value["seconds"]
                    acc["prefill"] += value["prefill_seconds"]
                    acc["decode"] += value["seconds"] - value["prefill_seconds"]
                    acc["decode_tokens"] += max(0, len(value["ids"]) - 1)
                    acc["new_tokens"] += len(value["ids"])
                for key, value in timed.items():
                    compared[f"{variant}/{key}"] = {"one_sample": value["ids"], "margins": value["margins"]}
        a_section["peak_gib"] = _peak_gib(subject.device)
        a_section["per_benchmark"] = per_bench
        a_section["projection"] = project_one_sample(per_bench, totals, len(workload.variants))
        report["a"] = a_section
        save()
        # The same rows through the fast runner (all benchmarks of a variant in one call, as in
        # a run) and through plain batched generate.
        # With the split vision attention, the fast path runs once more with transformers' own
        # vision attention: a difference between the two points at the vision tower.
        fast_paths = {"fast": engine.config}
        if engine.config.vision_attention != "transformers":
            fast_paths["fast_hf_vision"] = FastGenConfig(**{**asdict(engine.config), "vision_attention": "transformers"})
        for variant in workload.variants:
            everything = [r for requests in a_requests.values() for r in requests]
            for path, path_config in fast_paths.items():
                engine.config = path_config
                fast = engine.generate_ids(everything, variant)
                for request in everything:
                    compared[f"{variant}/{request.key}"][path] = fast[request.key]
            engine.config = fast_paths["fast"]
            batched = run_hf_batched(subject, everything, variant)
            for request in everything:
                compared[f"{variant}/{request.key}"]["hf_batched"] = batched[request.key]
        report["equivalence"] = equivalence_section(compared, args.tie_margin)
        save()

    if "fast" in paths:
        _reset_peak(subject.device)
        fast_section: dict[str, Any] = {"per_run": {}, "chunk_rows": chunk_rows}
        report["fast"] = fast_section  # saved as it grows
        total = _new_stats()
        made = {name: maker.requests(rows, cap=cap) for name, rows in scaled.items()}
        fast_section["warmup"] = run_warmup(engine, made, workload.variants, args.warmup_rows, chunk_rows)
        save()
        # Benchmark by benchmark, both variants each: a run cut short still projects whole benchmarks.
        for load in workload.benchmarks:
            for variant in workload.variants:
                rows = scaled[load.name]
                if not rows:  # a shard of a tiny scaled benchmark can be empty: its share is 0
                    continue
                requests, lengths = made[load.name]
                result = run_fast(engine, requests, variant, chunk_rows)
                stats = result["stats"]
                total.add(stats)
                tokens = sum(len(v) for v in result["ids"].values())
                expected_images = len({r.image_id for r in rows})
                if stats.images != expected_images:
                    report["notes"].append(
                        f"{variant}/{load.name}: the fast path encoded {stats.images} images for "
                        f"{expected_images} distinct image ids: the projection of this run is not valid")
                full_rows = totals[load.name]["rows"] * share[load.name]
                fast_section["per_run"][f"{variant}/{load.name}"] = {
                    "rows": len(rows), "full_rows": full_rows,
                    "chunks": result["chunks"], "full_chunks": max(1, math.ceil(full_rows / chunk_rows)),
                    "images": stats.images, "distinct_image_ids": expected_images,
                    "seconds": result["seconds"], "capture_seconds": stats.seconds.get("capture", 0.0),
                    "decode_seconds": stats.seconds.get("decode", 0.0),
                    "drain_seconds": stats.seconds.get("drain", 0.0), "drain_rows": stats.drain_rows,
                    "slots": stats.slots,
                    "new_tokens": tokens, "prompt_tokens": sum(lengths.values()),
                    "prompt_tokens_drawn": sum(r.prompt_tokens for r in rows),
                    "stats": stats.as_dict(),
                }
                print(f"fast {variant}/{load.name}: {len(rows)} rows, {tokens} new tokens in "
                      f"{result['seconds']:.1f} s", file=sys.stderr)
                save()
        fast_section["peak_gib"] = _peak_gib(subject.device)
        fast_section["stats"] = total.as_dict()
        fast_section["projection"] = project_fast(fast_section["per_run"], fast_section["warmup"])
        # What this process spent on the gate's work, start-up included (what a pytest-xdist
        # worker spends): building the model, the warm-up and the timed pass.
        fast_section["process_gate_seconds"] = (subject.description.get("build_seconds", 0.0)
                                                + fast_section["warmup"]["seconds"]
                                                + fast_section["projection"]["measured"]["seconds"])
        save()

    if "plain" in paths:
        report["plain"] = run_plain_section(subject, workload, maker, args, cap)
        save()

    report["figures"] = figures(report, workload, costs, engine)
    save()
    report["report_path"] = str(out)
    save()
    return report


def _new_stats():
    from lavender_checks.engines.fast.engine import FastGenStats

    return FastGenStats()


def run_plain_section(subject: Subject, workload: Workload, maker: RequestMaker, args, cap) -> dict:
    """The suite's batched generate on a few rows per benchmark (the first variant)."""
    from lavender_checks.engines.batched import generate as suite_generate

    variant = workload.variants[0]
    section: dict[str, Any] = {"variant": variant, "per_benchmark": {}}
    _reset_peak(subject.device)
    for load in workload.benchmarks:
        rows = sample_rows(load, workload.seed, args.scale)[: args.plain_rows]
        requests, _ = maker.requests(rows, cap=cap)
        loaded = [type(r)(key=r.key, text=r.text, images=[r.images[0]()], max_new_tokens=r.max_new_tokens)
                  for r in requests]
        _sync(subject.device)
        t0 = time.perf_counter()
        predictions = suite_generate(subject.pair, loaded, variant, batch_size=8, progress=False)
        _sync(subject.device)
        section["per_benchmark"][load.name] = {"rows": len(loaded), "seconds": time.perf_counter() - t0,
                                               "predictions": len(predictions)}
    section["peak_gib"] = _peak_gib(subject.device)
    return section


def equivalence_section(compared: dict[str, dict], tie_margin: float) -> dict:
    """How many sequences of the fast runner (and of plain batched generate) equal one-sample
    ``generate``'s, token for token, and where the others first differ.

    With random weights the top two scores are often nearly equal, and any change of kernel
    (a batch of another size) can flip such a near tie in bf16. So for every first difference
    the one-sample run's margin (top-1 minus top-2 score) at that step is reported, and a
    second count takes as agreeing the sequences whose first difference falls on a step with
    a margin below ``tie_margin``. A bug shows as differences at large margins.
    """
    out: dict[str, Any] = {"sequences": len(compared), "tie_margin": tie_margin,
                           "note": "greedy new tokens compared whole against one-sample generate, "
                                   "same rows and capped lengths"}
    for path in ("fast", "fast_hf_vision", "hf_batched"):
        rows = {k: v for k, v in compared.items() if path in v}
        if not rows:
            continue
        same = sum(v[path] == v["one_sample"] for v in rows.values())
        differing = {}
        for key, v in rows.items():
            if v[path] == v["one_sample"]:
                continue
            at = _first_difference(v["one_sample"], v[path])
            margins = v.get("margins") or []
            differing[key] = {"step": at, "margin": margins[at] if at is not None and at < len(margins) else None}
        near_tie = sum(1 for d in differing.values() if d["margin"] is not None and d["margin"] < tie_margin)
        out[path] = {
            "identical": same, "fraction": same / len(rows) if rows else None,
            "identical_or_near_tie": (same + near_tie) / len(rows) if rows else None,
            "first_token_differs": sum(1 for d in differing.values() if d["step"] == 0),
            "first_differences": dict(sorted(differing.items())[:48]),
        }
    all_margins = sorted(m for v in compared.values() for m in (v.get("margins") or []))
    out["one_sample_margin_quantiles"] = ({q: all_margins[int(q * (len(all_margins) - 1))]
                                          for q in (0.05, 0.25, 0.5)} if all_margins else None)
    both = [v for v in compared.values() if "fast" in v and "hf_batched" in v]
    out["fast_vs_hf_batched"] = {
        "identical": sum(v["fast"] == v["hf_batched"] for v in both),
        "fraction": sum(v["fast"] == v["hf_batched"] for v in both) / len(both) if both else None,
    }
    split = [v for v in compared.values() if "fast" in v and "fast_hf_vision" in v]
    if split:
        out["fast_vs_fast_hf_vision"] = {"identical": sum(v["fast"] == v["fast_hf_vision"] for v in split),
                                         "sequences": len(split)}
    out["fraction"] = out["fast"]["fraction"]
    return out


def project_one_sample(per_bench: dict, totals: dict, variants: int) -> dict:
    """The one-sample loop on the whole workload: rows x prefill + new tokens x per-token decode,
    both measured per benchmark on the subset."""
    seconds = 0.0
    detail = {}
    for name, acc in per_bench.items():
        if not acc["rows"]:
            continue
        prefill = acc["prefill"] / acc["rows"]
        per_token = acc["decode"] / acc["decode_tokens"] if acc["decode_tokens"] else None
        full = totals[name]
        est = full["rows"] * prefill + (full["new_tokens"] - full["rows"]) * (per_token or 0.0)
        detail[name] = {"prefill_seconds_per_row": prefill, "decode_seconds_per_token": per_token,
                        "seconds_per_variant": est}
        seconds += variants * est
    rows = variants * sum(t["rows"] for t in totals.values())
    tokens = variants * sum(t["new_tokens"] for t in totals.values())
    return {"seconds": seconds, "rows": rows, "new_tokens": tokens,
            "samples_per_s": rows / seconds if seconds else None,
            "new_tokens_per_s": tokens / seconds if seconds else None,
            "per_benchmark": detail,
            "method": "extrapolated from the subset: per benchmark, measured prefill seconds per row "
                      "x full rows + measured decode seconds per token x full new tokens"}


def run_warmup(engine: Any, made: dict, variants: list[str], rows: int, chunk_rows: int) -> dict:
    """The first ``rows`` rows of every benchmark and variant through the fast runner, outputs
    capped at 16 tokens, untimed in the projection: the first call of a shape pays for kernel
    selection and allocator growth, which a scaled run would otherwise multiply by its scale.
    The graph captures it makes are one-off costs and go into the projection."""
    import dataclasses

    out = {"rows_per_run": rows, "seconds": 0.0, "capture_seconds": 0.0}
    if rows <= 0:
        return out
    _sync(engine.device)
    t0 = time.perf_counter()
    for requests, _ in made.values():
        head = [dataclasses.replace(r, max_new_tokens=min(16, r.max_new_tokens)) for r in requests[:rows]]
        for variant in variants:
            result = run_fast(engine, head, variant, chunk_rows)
            out["capture_seconds"] += result["stats"].seconds.get("capture", 0.0)
    _sync(engine.device)
    out["seconds"] = time.perf_counter() - t0
    return out


def project_decode(run: dict) -> tuple[float, str]:
    """One benchmark/variant's decode seconds at full size, and how they were projected.

    A call's batch fills, runs steadily (rows leave, waiting rows take their slots), then
    drains: after the last admission it only empties. The drain lasts about as long whatever
    the call's size, and the rows in it are about one batch, so at full size: the steady
    decode seconds x full steady rows / ran steady rows, plus the drain once per call. That
    needs a steady phase of at least one batch of rows in the run; a smaller run is scaled by
    rows whole, drain included (which errs slow), and says so.
    """
    decode = run["decode_seconds"] - run["capture_seconds"]
    drain, drain_rows = run["drain_seconds"], run["drain_rows"]
    chunks, full_chunks = run.get("chunks", 1), run.get("full_chunks", 1)
    steady_rows = run["rows"] - drain_rows
    if steady_rows < max(1, run["slots"]):
        return decode * run["full_rows"] / run["rows"], "row-scaled (steady phase shorter than one batch)"
    full_steady_rows = run["full_rows"] - drain_rows * full_chunks / chunks
    return ((decode - drain) * full_steady_rows / steady_rows + drain * full_chunks / chunks,
            "steady phase scaled by rows, drain once per call")


def project_fast(per_run: dict, warmup: dict | None = None) -> dict:
    """The fast runner on the whole workload, per benchmark and variant: vision, prefill and
    host work (everything but decode) scaled by full/ran rows, decode by ``project_decode``;
    plus the one-off graph captures (the warm-up's included). Runs without a decode split
    (older reports) are scaled by rows whole."""
    per_row = decode = 0.0
    methods = {}
    for name, r in per_run.items():
        if "decode_seconds" not in r:
            per_row += (r["seconds"] - r["capture_seconds"]) * r["full_rows"] / r["rows"]
            methods[name] = "row-scaled"
            continue
        per_row += (r["seconds"] - r["decode_seconds"]) * r["full_rows"] / r["rows"]
        seconds, methods[name] = project_decode(r)
        decode += seconds
    capture = sum(r["capture_seconds"] for r in per_run.values()) + (warmup or {}).get("capture_seconds", 0.0)
    rows = sum(r["full_rows"] for r in per_run.values())
    tokens = sum(r["new_tokens"] * r["full_rows"] / r["rows"] for r in per_run.values())
    seconds = per_row + decode + capture
    measured_seconds = sum(r["seconds"] for r in per_run.values())
    measured_rows = sum(r["rows"] for r in per_run.values())
    measured_tokens = sum(r["new_tokens"] for r in per_run.values())
    return {"seconds": seconds, "per_row_seconds": per_row, "decode_seconds": decode, "capture_seconds": capture,
            "decode_methods": methods, "rows": rows, "new_tokens": tokens,
            "samples_per_s": rows / seconds if seconds else None,
            "new_tokens_per_s": tokens / seconds if seconds else None,
            "measured": {"seconds": measured_seconds, "rows": measured_rows, "new_tokens": measured_tokens,
                         "samples_per_s": measured_rows / measured_seconds if measured_seconds else None,
                         "new_tokens_per_s": measured_tokens / measured_seconds if measured_seconds else None},
            "method": "measured on the scaled workload; per benchmark and variant, everything but decode x full "
                      "rows / ran rows, decode as project_decode says (decode_methods), graph captures once"}


def figures(report: dict, workload: Workload, costs: dict, engine: Any) -> dict:
    """The headline numbers, each next to its target; a figure not measured is None."""
    targets = workload.targets
    out: dict[str, Any] = {"device": report.get("device")}
    a = report.get("a", {}).get("projection")
    fast = report.get("fast", {}).get("projection")
    out["a_projected_minutes"] = a["seconds"] / 60 if a else None
    out["fast_projected_minutes"] = fast["seconds"] / 60 if fast else None
    out["a_samples_per_s"] = a["samples_per_s"] if a else None
    out["a_new_tokens_per_s"] = a["new_tokens_per_s"] if a else None
    out["fast_samples_per_s"] = fast["samples_per_s"] if fast else None
    out["fast_new_tokens_per_s"] = fast["new_tokens_per_s"] if fast else None
    out["speedup"] = a["seconds"] / fast["seconds"] if a and fast and fast["seconds"] else None
    peaks = [report.get(p, {}).get("peak_gib") for p in ("a", "fast", "plain")]
    peaks = [p for p in peaks if p is not None]
    out["peak_gib"] = max(peaks) if peaks else None
    eq = report.get("equivalence")
    out["equivalence"] = eq["fraction"] if eq else None
    card = report.get("card")
    if card and fast:
        slots = report["fast"]["stats"]["slots"] or engine.config.max_slots
        limit = card_limit(report["workload_totals"], costs, card, slots, len(workload.variants),
                           vision_per_variant=True)
        out["card_limit"] = limit
        out["limit_ratio"] = fast["seconds"] / limit["limit_seconds"]
        out["fraction_of_limit"] = limit["limit_seconds"] / fast["seconds"]
    else:
        limit = None
        out["card_limit"] = None
        out["limit_ratio"] = None
        out["fraction_of_limit"] = None
    out["breakdown"] = time_breakdown(report["fast"], limit) if fast else None
    checks = {
        "gate_minutes": (out["fast_projected_minutes"], "<=", targets["gate_minutes"]),
        "speedup": (out["speedup"], ">=", targets["speedup"]),
        "limit_ratio": (out["limit_ratio"], "<=", targets["limit_ratio"]),
        "peak_gib": (out["peak_gib"], "<=", targets["peak_gib"]),
        "equivalence": (out["equivalence"], ">=", targets["equivalence"]),
    }
    out["targets"] = {name: {"value": value, "target": f"{op} {goal}",
                             "met": None if value is None else (value <= goal if op == "<=" else value >= goal)}
                      for name, (value, op, goal) in checks.items()}
    return out


def time_breakdown(fast_section: dict, limit: dict | None) -> dict:
    """Where the projected full gate goes, phase by phase, each next to its floor on this card
    (None without a card): what limits the time, in the report itself."""
    projection = fast_section["projection"]
    phases = {"vision": 0.0, "prefill": 0.0, "prep_wait": 0.0}
    for run in fast_section["per_run"].values():
        for phase in phases:
            phases[phase] += run["stats"]["seconds"].get(phase, 0.0) * run["full_rows"] / run["rows"]
    phases["decode"] = projection.get("decode_seconds", 0.0)
    phases["other"] = projection["seconds"] - sum(phases.values())  # host work, graph captures
    floors = ({"vision": limit["image_seconds"], "prefill": limit["prefill_seconds"],
               "decode": limit["decode_seconds"] + limit["cross_kv_read_seconds"]} if limit else {})
    total = projection["seconds"]
    return {phase: {"seconds": seconds, "share": seconds / total if total else None,
                    "floor_seconds": floors.get(phase),
                    "over_floor": seconds / floors[phase] if floors.get(phase) else None}
            for phase, seconds in phases.items()}


def summary_text(report: dict) -> str:
    f = report["figures"]

    def fmt(value, spec=".2f"):
        return "not measured" if value is None else format(value, spec)

    lines = [f"lavender-checks bench on {f['device']} (report: {report.get('report_path')})"]
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  one-sample loop (a): {fmt(f['a_samples_per_s'], '.3f')} samples/s, "
                 f"{fmt(f['a_new_tokens_per_s'], '.1f')} new tokens/s, full gate {fmt(f['a_projected_minutes'], '.1f')} min "
                 "(extrapolated from a subset)")
    lines.append(f"  fast runner (b):     {fmt(f['fast_samples_per_s'], '.2f')} samples/s, "
                 f"{fmt(f['fast_new_tokens_per_s'], '.0f')} new tokens/s, full gate {fmt(f['fast_projected_minutes'], '.1f')} min "
                 f"(projected from scale {report['scale']})")
    for phase, part in (f.get("breakdown") or {}).items():
        floor = (f", {part['over_floor']:.1f}x its floor of {part['floor_seconds']:.0f} s"
                 if part["over_floor"] else "")
        lines.append(f"    {phase:9s} {part['seconds']:8.0f} s of the projected gate ({part['share']:.0%}){floor}")
    for name, check in f["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
        lines.append(f"  {name:13s} {fmt(check['value'], '.3f'):>14s}  target {check['target']:>8s}  {met}")
    return "\n".join(lines)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="lavender-checks bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

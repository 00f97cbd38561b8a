"""The stated workload of the speed benchmark (``workload.toml``) and synthetic rows and
requests drawn from it: texts of a target token length, images of a given tile count."""

from __future__ import annotations

import hashlib
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKLOAD_PATH = Path(__file__).with_name("workload.toml")


BENCHMARK_ORDER = ("DocVQA_VAL", "ChartQA_TEST", "MMBench_DEV_EN", "MME")


# Tile layouts the Mllama processor picks for an image of exactly rows x cols tiles.
TILE_LAYOUTS = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the file and the key."""


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
        from lavender_checks.engines.fast.inputs import encode_text
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
        from lavender_checks.engines.request import GenerationRequest

        out, lengths = [], {}
        for row in rows:
            chat, count = self.text(row)
            lengths[row.key] = count
            tokens = row.output_tokens if cap is None else min(cap, row.output_tokens)
            # image_key as the runner passes data.image_key: rows of one image share features
            out.append(GenerationRequest(key=row.key, text=chat, images=[self.image_loader(row)],
                                         max_new_tokens=tokens, image_key=f"{row.benchmark}:{row.image_id}"))
        return out, lengths

"""Run profiles: the prompts and decoding of one run, as data.

A profile lives in ``fixtures/profiles/<name>.toml``. It names the VLMEvalKit revision whose
rules it follows and fixes, per benchmark, where the prompt comes from (a template of the
model wrapper, or the benchmark's own dataset prompt), where the image sits in the user turn
and how many new tokens may be generated. Decoding is always greedy.

A profile's fingerprint is a hash of everything that can change a generation, so stored
predictions made under other rules are never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavender_checks import FIXTURES

PROFILES_DIR = FIXTURES / "profiles"
QUESTION_FIELD = "{question}"
PROMPT_SOURCES = ("template", "dataset")

# Keys that only document the profile; they do not change what the model is given.
_DOCUMENTATION_KEYS = ("name", "description")


class ProfileError(ValueError):
    """A profile that cannot be found or read; the message names the file and the key."""


@dataclass(frozen=True)
class BenchmarkPrompting:
    """How one benchmark is prompted under a profile."""

    source: str  # "template" (the model wrapper's prompt) or "dataset" (Benchmark.dataset_prompt)
    template: str | None  # with exactly one "{question}" when source == "template", else None
    image_first: bool  # True: [image, text] in the user turn; False: [text, image]
    max_new_tokens: int


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    path: Path
    vlmevalkit_revision: str
    vlmevalkit_revision_date: str | None
    do_sample: bool
    add_special_tokens: bool  # passed to the processor; True reproduces VLMEvalKit's double BOS
    clean_up_tokenization_spaces: bool  # transformers 4.x decode clean-up (" ." -> "."), see prompts
    image_dump_suffix: str  # VLMEvalKit's <index><suffix> dump name (no image_path): ".png" or ".jpg"
    benchmarks: dict[str, BenchmarkPrompting]
    fingerprint: str  # sha256 of the canonical content (everything but name and description)

    def for_benchmark(self, name: str) -> BenchmarkPrompting:
        """The prompting of benchmark ``name``; a benchmark the profile lacks is an error."""
        try:
            return self.benchmarks[name]
        except KeyError:
            raise ProfileError(
                f"{self.path}: profile {self.name!r} has no [benchmarks.{name}] table; "
                f"it covers: {', '.join(self.benchmarks) or 'no benchmark'}"
            ) from None

    def describe(self) -> dict[str, Any]:
        """Plain data for reports: everything a reader needs to know how the run was prompted."""
        return {
            "name": self.name,
            "description": self.description,
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "vlmevalkit_revision": self.vlmevalkit_revision,
            "vlmevalkit_revision_date": self.vlmevalkit_revision_date,
            "decoding": {"do_sample": self.do_sample, "add_special_tokens": self.add_special_tokens,
                         "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces},
            "images": {"dump_suffix": self.image_dump_suffix},
            "benchmarks": {
                name: {
                    "source": p.source,
                    "template": p.template,
                    "image_first": p.image_first,
                    "max_new_tokens": p.max_new_tokens,
                }
                for name, p in self.benchmarks.items()
            },
        }


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (``fixtures/profiles/<name>.toml``) or by path to a TOML file."""
    path = _resolve(name_or_path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return _parse(raw, path)


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text
    if looks_like_path:
        path = Path(name_or_path)
        if path.is_dir():
            raise ProfileError(f"profile {path} is a folder, not a profile file (NAME.toml)")
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return path
    path = PROFILES_DIR / f"{text}.toml"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {text!r}; available profiles: "
            f"{', '.join(available_profiles()) or 'none'} (in {PROFILES_DIR})"
        )
    return path


def _get(table: dict, key: str, kind: type | tuple[type, ...], path: Path, where: str,
         default: Any = ...) -> Any:
    """``table[key]`` checked against ``kind``; errors name the file and the dotted key."""
    dotted = f"{where}.{key}" if where else key
    if key not in table:
        if default is not ...:
            return default
        raise ProfileError(f"{path}: missing key {dotted!r}")
    value = table[key]
    # bool is an int subclass: refuse true/false where a number is wanted.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ProfileError(f"{path}: key {dotted!r} must be {names}, got {value!r}")
    return value


def _parse(raw: dict, path: Path) -> Profile:
    name = _get(raw, "name", str, path, "")
    description = _get(raw, "description", str, path, "")
    revision = _get(raw, "vlmevalkit_revision", str, path, "")
    revision_date = _get(raw, "vlmevalkit_revision_date", str, path, "", default=None)

    decoding = _get(raw, "decoding", dict, path, "")
    do_sample = _get(decoding, "do_sample", bool, path, "decoding")
    if do_sample:
        raise ProfileError(
            f"{path}: key 'decoding.do_sample' is true, but runs decode greedily only "
            "(sampled predictions cannot be compared or reused)"
        )
    add_special_tokens = _get(decoding, "add_special_tokens", bool, path, "decoding")
    clean_up = _get(decoding, "clean_up_tokenization_spaces", bool, path, "decoding")
    unknown = set(decoding) - {"do_sample", "add_special_tokens", "clean_up_tokenization_spaces"}
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) in [decoding]: {', '.join(sorted(unknown))}")

    images = _get(raw, "images", dict, path, "")
    dump_suffix = _get(images, "dump_suffix", str, path, "images")
    if dump_suffix not in (".png", ".jpg"):
        raise ProfileError(f"{path}: key 'images.dump_suffix' is {dump_suffix!r}; VLMEvalKit "
                           "revisions dump to '.png' (lossless) or '.jpg' (JPEG quality 75)")
    unknown = set(images) - {"dump_suffix"}
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) in [images]: {', '.join(sorted(unknown))}")

    tables = _get(raw, "benchmarks", dict, path, "")
    if not tables:
        raise ProfileError(f"{path}: key 'benchmarks' has no benchmark table")
    benchmarks = {bench: _parse_benchmark(table, path, f"benchmarks.{bench}")
                  for bench, table in tables.items()}

    unknown = set(raw) - {"name", "description", "vlmevalkit_revision", "vlmevalkit_revision_date",
                          "decoding", "images", "benchmarks"}
    if unknown:
        raise ProfileError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))}")

    return Profile(
        name=name,
        description=description,
        path=path,
        vlmevalkit_revision=revision,
        vlmevalkit_revision_date=revision_date,
        do_sample=do_sample,
        add_special_tokens=add_special_tokens,
        clean_up_tokenization_spaces=clean_up,
        image_dump_suffix=dump_suffix,
        benchmarks=benchmarks,
        fingerprint=_fingerprint(raw),
    )


def _parse_benchmark(table: Any, path: Path, where: str) -> BenchmarkPrompting:
    if not isinstance(table, dict):
        raise ProfileError(f"{path}: key {where!r} must be a table, got {table!r}")
    source = _get(table, "source", str, path, where)
    if source not in PROMPT_SOURCES:
        raise ProfileError(
            f"{path}: key '{where}.source' must be one of {', '.join(PROMPT_SOURCES)}, got {source!r}"
        )
    template = None
    if source == "template":
        template = _get(table, "template", str, path, where)
        if template.count(QUESTION_FIELD) != 1:
            raise ProfileError(
                f"{path}: key '{where}.template' must contain {QUESTION_FIELD} exactly once"
            )
    elif "template" in table:
        raise ProfileError(f"{path}: key '{where}.template' is given but source is 'dataset'")
    image_first = _get(table, "image_first", bool, path, where)
    max_new_tokens = _get(table, "max_new_tokens", int, path, where)
    if max_new_tokens < 1:
        raise ProfileError(f"{path}: key '{where}.max_new_tokens' must be at least 1")
    unknown = set(table) - {"source", "template", "image_first", "max_new_tokens"}
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) in [{where}]: {', '.join(sorted(unknown))}")
    return BenchmarkPrompting(source, template, image_first, max_new_tokens)


def _fingerprint(raw: dict) -> str:
    # Canonical JSON (sorted keys, no whitespace choices) of everything that changes a run.
    content = {k: v for k, v in raw.items() if k not in _DOCUMENTATION_KEYS}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

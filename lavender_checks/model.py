"""Loading the base model and the Lavender adapter from one copy of the weights, and proving
that the adapter really loaded.

``load_pair(base, adapter)`` returns a ``ModelPair``: one ``MllamaForConditionalGeneration``
wrapped by peft, so that the base variant is the same model inside ``disable_adapter()``.
Nothing from a model folder is ever executed: no ``trust_remote_code``, and weights are read
from safetensors only (``allow_pickle=True`` of the Python API aside; no command offers it).

Why the checks are this strict: peft only *warns* about adapter keys that match no module
("Found missing adapter keys") and drops unexpected keys silently, and transformers 4.52
moved the Mllama towers (``language_model.model.*`` -> ``model.language_model.*``,
``vision_model.*`` -> ``model.vision_model.*``), so an adapter saved before that can load as
a partial no-op. With transformers 5.24 + peft 0.21.2 such an adapter loads its text-tower
weights and silently drops every vision-tower weight. Here every tensor of the adapter file
must end up, bit for bit, in the model, every LoRA module must have its weights from the
file, and the adapter must change the logits of a fixed input; otherwise ``ModelLoadError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch

ADAPTER_NAME = "default"
PAD_TOKEN = "<|finetune_right_pad_id|>"
PEFT_PREFIX = "base_model.model."

# transformers >= 4.52 (and 5.x) module paths, from the pre-4.52 ones. Adapters for Mllama
# trained before that carry the old paths in their keys.
OLD_TO_CURRENT_LAYOUT = {
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head": "lm_head",
    r"^vision_model\.": "model.vision_model.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
}

# Files besides the weights that decide what the model computes or sees; part of the base
# fingerprint when present (all small).
FINGERPRINTED_BASE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# The two variants one pair computes: the base model (the adapter disabled) and Lavender.
BASE_VARIANT = "base"
LAVENDER_VARIANT = "lavender"
VARIANTS = (BASE_VARIANT, LAVENDER_VARIANT)


class AdapterBaseWarning(UserWarning):
    """The adapter's config names a base model that does not look like the one loaded."""


class ModelLoadError(RuntimeError):
    """A model or adapter folder that cannot be used as it is; the message says why."""


# ---------------------------------------------------------------------------------------
# The pair


@dataclass
class ModelPair:
    """One base model in memory, with or without the adapter wrapped around it.

    ``model`` is a ``peft.PeftModel`` when an adapter is loaded, else the plain
    ``MllamaForConditionalGeneration``. Generation is the engines' business
    (``lavender_checks.engines``); the pair only describes what is loaded.
    """

    model: Any
    processor: Any
    device: "torch.device"
    dtype: "torch.dtype"
    base_path: Path | None  # None for a model built in memory (fullsize.fullsize_pair)
    base_fingerprint: str
    adapter_path: Path | None = None
    adapter_fingerprint: str | None = None
    lora_modules_applied: int = 0
    lora_modules_by_tower: dict[str, int] = field(default_factory=dict)
    adapter_key_layout: str | None = None  # "current" or "transformers<4.52 (remapped)"
    adapter_logit_change: float | None = None  # max |logit difference| on the fixed input

    @property
    def has_adapter(self) -> bool:
        return self.adapter_fingerprint is not None

    @property
    def base_model(self):
        """The ``MllamaForConditionalGeneration`` (inside the peft wrapper when there is one)."""
        return self.model.get_base_model() if self.has_adapter else self.model

    @contextmanager
    def variant(self, name: str):
        """Yield the model that computes ``name`` ("base" or "lavender")."""
        if name == BASE_VARIANT:
            with self.model.disable_adapter() if self.has_adapter else nullcontext():
                yield self.model
        elif name == LAVENDER_VARIANT:
            if not self.has_adapter:
                raise ValueError("variant 'lavender' needs an adapter; this pair was loaded without one")
            yield self.model
        else:
            raise ValueError(f"unknown variant {name!r}; expected 'base' or 'lavender'")

    def describe(self) -> dict:
        """What a report needs to say which model produced the predictions."""
        import peft
        import torch
        import transformers

        return {
            "base_path": str(self.base_path) if self.base_path else None,
            "base_fingerprint": self.base_fingerprint,
            "adapter_path": str(self.adapter_path) if self.adapter_path else None,
            "adapter_fingerprint": self.adapter_fingerprint,
            "adapter_key_layout": self.adapter_key_layout,
            "lora_modules_applied": self.lora_modules_applied,
            "lora_modules_by_tower": dict(self.lora_modules_by_tower),
            "adapter_logit_change": self.adapter_logit_change,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "base_parameters": sum(p.numel() for n, p in self.base_model.named_parameters() if "lora_" not in n),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }


# ---------------------------------------------------------------------------------------
# Loading


def load_pair(
    base_path: str | Path,
    adapter_path: str | Path | None = None,
    *,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
    allow_pickle: bool = False,
    check_logits: bool = True,
) -> ModelPair:
    """Load the base model (and the adapter) from Hugging Face folders; see the module doc.

    device: None picks CUDA when available, else CPU. dtype: None means bfloat16 on CUDA and
    float32 on CPU. check_logits: run the fixed-input check that the adapter changes logits.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    base_path = Path(base_path)
    weights = _check_base_folder(base_path, allow_pickle)
    base_fingerprint = _fingerprint_base(base_path, weights)
    model = _load_base_model(base_path, weights, device, dtype)
    processor = _load_processor(base_path)

    pair = ModelPair(
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        base_path=base_path,
        base_fingerprint=base_fingerprint,
    )
    if adapter_path is not None:
        _attach_adapter(pair, Path(adapter_path), allow_pickle, check_logits)
    pair.model.eval()
    for param in pair.model.parameters():
        param.requires_grad_(False)
    return pair


@dataclass
class PairIdentity:
    """What a pair's predictions are keyed by (fingerprints, processor, device, dtype),
    without the weights in memory."""

    processor: Any
    base_fingerprint: str
    adapter_fingerprint: str | None
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    base_path: Path | None = None
    adapter_path: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"base_path": str(self.base_path) if self.base_path else None,
                "base_fingerprint": self.base_fingerprint,
                "adapter_path": str(self.adapter_path) if self.adapter_path else None,
                "adapter_fingerprint": self.adapter_fingerprint,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


def read_pair_identity(
    base_path: str | Path,
    adapter_path: str | Path | None = None,
    *,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
    allow_pickle: bool = False,
) -> PairIdentity:
    """The fingerprints, processor, device and dtype ``load_pair`` would give for these
    folders, read from them with the same checks but without loading any weights."""
    device = resolve_device(device)
    base_path = Path(base_path)
    weights = _check_base_folder(base_path, allow_pickle)
    adapter_fingerprint = None
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        adapter_file = _check_adapter_folder(adapter_path, allow_pickle)
        adapter_fingerprint = _fingerprint_adapter(adapter_path, adapter_file)
    return PairIdentity(
        processor=_load_processor(base_path),
        base_fingerprint=_fingerprint_base(base_path, weights),
        adapter_fingerprint=adapter_fingerprint,
        device=device, dtype=resolve_dtype(dtype, device),
        base_path=base_path, adapter_path=adapter_path,
    )


def resolve_device(device: "str | torch.device | None") -> "torch.device":
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise ModelLoadError(
            f"device {str(device)!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}, built {built}); use device='cpu' or run on a CUDA machine"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype, device) -> "torch.dtype":
    """None: bfloat16 on CUDA, float32 on CPU; a name such as 'float32' or a torch dtype."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16' or 'float32'")
        return resolved
    return dtype


@dataclass(frozen=True)
class _Weights:
    files: tuple[Path, ...]
    safetensors: bool


def _folder_config(folder: Path, role: str, kind: str, config_name: str) -> tuple[Path, dict]:
    """(path, content) of the config file that makes ``folder`` a ``kind``; each way it is not
    one (absent, not a folder, no config file) is a ModelLoadError naming the path."""
    if not folder.exists():
        raise ModelLoadError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"{role} path {folder} is not a folder ({kind} is expected)")
    config_path = folder / config_name
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no {config_name}: not {kind}")
    return config_path, _read_json(config_path)


def _check_base_folder(base: Path, allow_pickle: bool) -> _Weights:
    config_path, config = _folder_config(base, "base model", "a Hugging Face model folder", "config.json")
    model_type = config.get("model_type")
    if model_type != "mllama":
        raise ModelLoadError(
            f"{config_path}: model_type is {model_type!r}, expected 'mllama' "
            "(MllamaForConditionalGeneration, e.g. Llama-3.2-11B-Vision-Instruct)"
        )
    weights = _find_weight_files(base, allow_pickle)
    if weights.safetensors:
        for path in weights.files:
            read_safetensors_header(path)
    if not (base / "tokenizer.json").is_file():
        # Without it transformers falls back to a sentencepiece path and fails with a text
        # about sentencepiece that names no file.
        raise ModelLoadError(
            f"{base} has no tokenizer.json: the Llama 3.2 Vision tokenizer is read from that file "
            "(it is in the model's Hugging Face repository, next to config.json); copy it there")
    return weights


def _find_weight_files(folder: Path, allow_pickle: bool) -> _Weights:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no 'weight_map' with entries")
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are missing from {folder}: {missing[:5]}")
        return _Weights(files, True)
    single = folder / "model.safetensors"
    if single.is_file():
        return _Weights((single,), True)
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} has only pickle weights ({pickles[0].name}); loading pickle files can execute "
                "code, so only safetensors are read. Convert them once, where you trust the files: "
                "load the folder with transformers and save_pretrained() it (safetensors is its "
                "default format), or take the safetensors files from the model's Hugging Face repository."
            )
        return _Weights(tuple(pickles), False)
    raise ModelLoadError(f"{folder} has no model weights (model.safetensors or model.safetensors.index.json)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors_header(path: Path) -> bytes:
    """Return the raw JSON header of a safetensors file after checking that it is whole.

    Checks what the format allows without reading the tensors: the header length, the JSON,
    and that the tensors' byte ranges exactly fill the rest of the file (a truncated or
    padded file fails). Raises ModelLoadError naming the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"file is {size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            raw = handle.read(header_len)
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - header_len
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            if not 0 <= start <= stop <= data_len:
                raise ValueError(f"tensor {name!r} lies outside the file (bytes {start}..{stop} of {data_len})")
            end = max(end, stop)
        if end != data_len:
            raise ValueError(f"tensor data ends at byte {end} but the file holds {data_len} data bytes")
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupted safetensors file ({exc})") from exc
    return raw


# Bytes of tensor data sampled per weight file for the base fingerprint: two checkpoints of
# one architecture (a base and a fine-tune) share names, shapes and file sizes, and differ in
# nearly every byte, so a spread sample tells them apart without reading 20 GiB.
FINGERPRINT_SAMPLES_PER_FILE = 64
FINGERPRINT_SAMPLE_BYTES = 4096


def _fingerprint_base(base: Path, weights: _Weights) -> str:
    """sha256 over the config/tokenizer files and, per weight file, its name, size, header and
    a spread sample of its tensor bytes (64 × 4 KiB at fixed offsets).

    Cheap (about 256 KiB read per file) yet changes with any change of shapes, dtypes, tensor
    names, file sizes, or weights that differ over more than a few bytes; a bit flip between
    the sampled blocks would go unnoticed.
    """
    digest = hashlib.sha256()
    for name in FINGERPRINTED_BASE_FILES:
        path = base / name
        if path.is_file():
            digest.update(f"file:{name}\n".encode())
            digest.update(path.read_bytes())
    for path in weights.files:
        size = path.stat().st_size
        digest.update(f"weights:{path.name}:{size}\n".encode())
        if weights.safetensors:
            digest.update(read_safetensors_header(path))
        with path.open("rb") as fh:
            for k in range(FINGERPRINT_SAMPLES_PER_FILE):
                fh.seek(size * k // FINGERPRINT_SAMPLES_PER_FILE)
                digest.update(fh.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def _load_base_model(base: Path, weights: _Weights, device, dtype):
    from transformers import MllamaForConditionalGeneration

    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        use_safetensors=weights.safetensors,
        trust_remote_code=False,
        local_files_only=True,
    )
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # materialise straight on the card
    try:
        model = MllamaForConditionalGeneration.from_pretrained(base, **kwargs)
    except Exception as exc:  # transformers raises many types here; all mean "cannot load"
        raise ModelLoadError(f"{base}: cannot load MllamaForConditionalGeneration: {type(exc).__name__}: {exc}") from exc
    if device.type != "cuda":
        model = model.to(device)
    return model


def _load_processor(base: Path):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(base, trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{base}: cannot load the processor: {type(exc).__name__}: {exc}") from exc
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(f"{base}: the processor ({type(processor).__name__}) is not an image+text processor")
    # Batched generation pads on the left so every row's last prompt token is at the end,
    # with Llama 3's <|finetune_right_pad_id|> (the real tokenizer already declares it).
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = PAD_TOKEN
    # The decode clean-up is the run profile's (engines.request.clean_up_tokenization),
    # applied once after decoding. Llama 3's tokenizer_config asks the tokenizer for it too,
    # which transformers 5 ignores for BPE tokenizers with a notice on every run.
    if getattr(processor.tokenizer, "clean_up_tokenization_spaces", False):
        processor.tokenizer.clean_up_tokenization_spaces = False
    return processor


# ---------------------------------------------------------------------------------------
# The adapter


def _attach_adapter(pair: ModelPair, folder: Path, allow_pickle: bool, check_logits: bool) -> None:
    loaded = _load_proven_adapter(pair, folder, allow_pickle, ADAPTER_NAME)
    pair.model = loaded.model
    pair.adapter_fingerprint = loaded.fingerprint
    pair.adapter_path = folder
    pair.adapter_key_layout = loaded.key_layout
    pair.lora_modules_applied = len(loaded.modules)
    pair.lora_modules_by_tower = count_by_tower(loaded.modules)
    if check_logits:
        change = adapter_logit_change(pair)
        _check_logit_change(folder, change, pair.dtype)
        pair.adapter_logit_change = change


@dataclass
class _LoadedAdapter:
    model: Any  # the peft model holding the adapter
    fingerprint: str
    key_layout: str
    modules: list[str]  # the LoRA modules that carry it


def _load_proven_adapter(pair: ModelPair, folder: Path, allow_pickle: bool, adapter_name: str) -> _LoadedAdapter:
    """The adapter of ``folder`` loaded under ``adapter_name`` (beside any adapter already on
    ``pair.model``), every tensor of its file proven to be in the model."""
    weights_file = _check_adapter_folder(folder, allow_pickle)
    _warn_if_adapter_names_another_base(folder, pair)
    fingerprint = _fingerprint_adapter(folder, weights_file)
    tensors = _load_adapter_tensors(weights_file)
    plain = pair.model.get_base_model() if hasattr(pair.model, "peft_config") else pair.model
    module_names = {name for name, _ in plain.named_modules()}
    mapping, layout = _key_mapping_for(tensors, module_names, folder)

    peft_model = _peft_from_pretrained(pair.model, folder, mapping, weights_file.suffix == ".safetensors",
                                       adapter_name)
    loaded = _verify_loaded(peft_model, tensors, mapping, folder, adapter_name)
    return _LoadedAdapter(peft_model, fingerprint, layout, loaded)


def _check_logit_change(folder: Path, change: float, dtype) -> None:
    """The adapter must change the fixed input's logits, by a finite amount."""
    if not math.isfinite(change):
        raise ModelLoadError(
            f"{folder}: with the adapter the logits of a fixed input are not finite "
            f"(max |difference| = {change}): its weights overflow in {dtype}; "
            "try --dtype float32, or export the adapter again")
    if not change > 0.0:
        raise ModelLoadError(
            f"{folder}: the adapter loads but does not change the logits on a fixed input "
            f"(max |difference| = {change}); its lora_B weights may be all zero"
        )


def _check_adapter_folder(folder: Path, allow_pickle: bool) -> Path:
    config_path, config = _folder_config(folder, "adapter", "a peft adapter folder", "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    safetensors_file = folder / "adapter_model.safetensors"
    pickle_file = folder / "adapter_model.bin"
    if safetensors_file.is_file():
        read_safetensors_header(safetensors_file)
        return safetensors_file
    if pickle_file.is_file():
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} has only a pickle adapter ({pickle_file.name}); loading pickle files can execute "
                "code, so only safetensors are read. Convert it once, where you trust the file: "
                f"python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{pickle_file}', weights_only=True), "
                f"'{folder / 'adapter_model.safetensors'}')\""
            )
        return pickle_file
    raise ModelLoadError(f"{folder} has no adapter weights (adapter_model.safetensors)")


def _fingerprint_adapter(folder: Path, weights_file: Path) -> str:
    digest = hashlib.sha256()
    digest.update(b"adapter_config.json\n")
    digest.update((folder / "adapter_config.json").read_bytes())
    digest.update(f"{weights_file.name}\n".encode())
    with weights_file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_adapter_tensors(weights_file: Path) -> dict:
    import torch

    try:
        if weights_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(weights_file)
        else:
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{weights_file}: cannot read adapter weights: {type(exc).__name__}: {exc}") from exc
    bad = [key for key in tensors if not key.startswith("base_model.")]
    if bad:
        raise ModelLoadError(f"{weights_file}: keys without peft's 'base_model.' prefix, e.g. {bad[:3]}")
    broken = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise ModelLoadError(
            f"{weights_file}: {len(broken)} of {len(tensors)} adapter tensors hold NaN or infinite "
            f"values (e.g. {broken[:3]}): the adapter is broken (a diverged training run, or a "
            "failed export); export it again from a good checkpoint")
    return tensors


# A model size in a name: "Llama-3.1-8B" -> 8, "Llama-3.2-11B-Vision-Instruct" -> 11.
_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)b(?![a-z])", re.IGNORECASE)


def _warn_if_adapter_names_another_base(folder: Path, pair: ModelPair) -> None:
    """adapter_config.json's base_model_name_or_path is only a name (folders get renamed), so a
    mismatch warns, naming both: a size in the name that is not the loaded model's, or a Llama
    that is not a Vision one (the base is always Mllama)."""
    name = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return
    last = name.rstrip("/").split("/")[-1].lower()
    if last == pair.base_path.name.lower():
        return
    billions = sum(p.numel() for p in pair.model.parameters()) / 1e9
    reasons = []
    size = _SIZE_IN_NAME.search(last)
    if size and abs(float(size.group(1)) - billions) > 0.25 * max(float(size.group(1)), billions):
        reasons.append(f"a {size.group(1)}B model, while the base has {billions:.1f}B parameters")
    if "llama" in last and not any(word in last for word in ("vision", "mllama")):
        reasons.append("a Llama without Vision, while the base is Mllama (Llama 3.2 Vision)")
    if reasons:
        warnings.warn(
            f"{folder / 'adapter_config.json'}: base_model_name_or_path is {name!r} "
            f"({'; '.join(reasons)}), but the base model loaded is {pair.base_path}: the adapter "
            "may have been trained for another model", AdapterBaseWarning, stacklevel=4)


def _module_of(key: str) -> str:
    """Module path of an adapter key, without peft's prefix: '...q_proj.lora_A.weight' -> '...q_proj'."""
    path = key.removeprefix(PEFT_PREFIX).removeprefix("base_model.")
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])  # e.g. modules_to_save: '<module>.weight'


def _apply_mapping(path: str, mapping: dict[str, str]) -> str:
    for pattern, replacement in mapping.items():
        new, count = re.subn(pattern, replacement, path)
        if count:
            return new
    return path


def _key_mapping_for(tensors: dict, module_names: set[str], folder: Path) -> tuple[dict[str, str], str]:
    """Choose the key mapping that makes every adapter key name a module of this model.

    Returns ({}, "current") when the keys already match, the old-to-current layout mapping
    when that makes them match, and raises ModelLoadError listing keys otherwise.
    """
    modules = {_module_of(key) for key in tensors}
    unmatched = sorted(m for m in modules if m not in module_names)
    if not unmatched:
        return {}, "current"
    remapped = sorted(m for m in modules if _apply_mapping(m, OLD_TO_CURRENT_LAYOUT) not in module_names)
    if not remapped:
        return dict(OLD_TO_CURRENT_LAYOUT), "transformers<4.52 (remapped)"
    examples = [k for k in sorted(tensors) if _module_of(k) in set(remapped)][:5]
    raise ModelLoadError(
        f"{folder}: {len(remapped)} of {len(modules)} adapter modules match no module of the base model "
        f"(also after mapping transformers<4.52 paths to the current layout), e.g. {examples}. "
        "The adapter was made for a different model, or its keys were renamed."
    )


def _peft_from_pretrained(model, folder: Path, mapping: dict[str, str], safetensors: bool,
                          adapter_name: str = ADAPTER_NAME):
    """``model`` wrapped by peft with the adapter of ``folder``; a model peft already wraps
    gets it beside its other adapters (``load_adapter``)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # An explicit mapping ({} included) stops peft from guessing one of its own.
            if isinstance(model, PeftModel):
                model.load_adapter(folder, adapter_name=adapter_name, is_trainable=False,
                                   key_mapping=mapping, use_safetensors=safetensors)
                peft_model = model
            else:
                peft_model = PeftModel.from_pretrained(
                    model,
                    folder,
                    adapter_name=adapter_name,
                    is_trainable=False,
                    key_mapping=mapping,
                    use_safetensors=safetensors,
                )
        except RuntimeError as exc:
            text = str(exc)
            if "size mismatch" in text:
                lines = [line.strip() for line in text.splitlines() if "size mismatch" in line][:3]
                raise ModelLoadError(
                    f"{folder}: the adapter was made for a base model of another shape (different widths "
                    f"or layers); peft could not copy its tensors: {' | '.join(lines)}"
                ) from exc
            raise ModelLoadError(f"{folder}: peft could not load the adapter: {text[:800]}") from exc
        except ValueError as exc:
            raise ModelLoadError(
                f"{folder}: peft could not apply the adapter ({exc}). If its target_modules name "
                "transformers<4.52 paths (language_model.model.*, vision_model.*), they no longer exist."
            ) from exc
    for warning in caught:
        text = str(warning.message)
        if "missing adapter keys" in text or "unexpected" in text.lower():
            raise ModelLoadError(f"{folder}: peft reported a partial load: {text[:800]}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return peft_model


def _verify_loaded(peft_model, tensors: dict, mapping: dict[str, str], folder: Path,
                   adapter_name: str = ADAPTER_NAME) -> list[str]:
    """Every file tensor must be in the model bit for bit, and every LoRA module from the file.

    Returns the names of the LoRA modules that carry the adapter.
    """
    import torch

    state = peft_model.state_dict()
    absent, different = [], []
    for key, tensor in tensors.items():
        path = _apply_mapping(key.removeprefix(PEFT_PREFIX), mapping)
        model_key = _model_state_key(path, state, adapter_name)
        if model_key is None:
            absent.append(key)
            continue
        param = state[model_key]
        if param.shape != tensor.shape or not torch.equal(param.detach().cpu(), tensor.to(param.dtype)):
            different.append(key)
    if absent or different:
        raise ModelLoadError(
            f"{folder}: adapter tensors did not load: {len(absent)} match no model parameter "
            f"(e.g. {absent[:3]}), {len(different)} differ from the file after loading (e.g. {different[:3]})"
        )

    file_modules = {_apply_mapping(_module_of(key), mapping) for key in tensors}
    lora_modules = lora_module_names(peft_model, adapter_name)
    without_weights = sorted(set(lora_modules) - file_modules)
    if without_weights:
        raise ModelLoadError(
            f"{folder}: {len(without_weights)} LoRA modules got no weights from the file "
            f"(e.g. {without_weights[:3]}); the adapter's target_modules reach modules its weights do not cover"
        )
    return sorted(lora_modules)


def _model_state_key(path: str, state: dict, adapter_name: str = ADAPTER_NAME) -> str | None:
    """Model state-dict key of an adapter key path (peft inserts the adapter name)."""
    parts = path.split(".")
    candidates = []
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            candidates.append(".".join(parts[: i + 1] + [adapter_name] + parts[i + 1 :]))
            break
    else:  # modules_to_save: '<module>.<param>' -> '<module>.modules_to_save.<adapter>.<param>'
        candidates.append(".".join(parts[:-1] + ["modules_to_save", adapter_name, parts[-1]]))
    for candidate in candidates:
        key = PEFT_PREFIX + candidate
        if key in state:
            return key
    return None


def lora_module_names(peft_model, adapter_name: str = ADAPTER_NAME) -> list[str]:
    """Names (without peft's prefix) of the modules that carry the LoRA adapter ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        name.removeprefix(PEFT_PREFIX)
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {})
    ]


def count_by_tower(modules: list[str]) -> dict[str, int]:
    """LoRA module names (without peft's prefix) counted per tower."""
    counts = {"vision": 0, "text_self_attention": 0, "text_cross_attention": 0, "other": 0}
    for name in modules:
        if ".vision_model." in f".{name}":
            counts["vision"] += 1
        elif ".cross_attn." in name:
            counts["text_cross_attention"] += 1
        elif ".language_model." in f".{name}":
            counts["text_self_attention"] += 1
        else:
            counts["other"] += 1
    return counts


def fixed_probe_inputs(processor, device):
    """A fixed image + prompt, processed as generation processes prompts."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 48, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.full((48, 48), 128.0)], -1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    return inputs.to(device)


def adapter_logit_change(pair: ModelPair, variant: str = LAVENDER_VARIANT) -> float:
    """Max |logit difference| between the adapter (``variant`` of the pair) and the base on
    the fixed probe input."""
    import torch

    inputs = fixed_probe_inputs(pair.processor, pair.device)
    with torch.inference_mode():
        with pair.variant(BASE_VARIANT) as model:
            base = model(**inputs).logits.float()
        with pair.variant(variant) as model:
            adapted = model(**inputs).logits.float()
    return float((adapted - base).abs().max())


# ---------------------------------------------------------------------------------------
# A series of adapters (checkpoints of one fine-tuning run) on one weight copy


class AdapterRefused(RuntimeError):
    """A checkpoint of a series whose adapter failed the fixed-input check (it changes
    nothing, or overflows): it has no predictions, and its verdicts say why."""


@dataclass
class SeriesAdapter:
    """One adapter of a ``SeriesPair``: its checkpoint name, folder and proof."""

    name: str
    path: Path
    fingerprint: str
    peft_name: str  # its name inside peft (checkpoint names may hold dots, which peft's may not)
    key_layout: str | None = None
    lora_modules_applied: int = 0
    logit_change: float | None = None
    refused: str | None = None  # why it failed the fixed-input check

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "fingerprint": self.fingerprint,
                "key_layout": self.key_layout, "lora_modules_applied": self.lora_modules_applied,
                "logit_change": self.logit_change, "refused": self.refused}


@dataclass
class SeriesPair(ModelPair):
    """One base model with several adapters loaded beside each other (peft's named adapters).

    Its variants are ``base`` (every adapter disabled) and each checkpoint's name (that adapter
    active, the others idle), so an engine keeps one set of buffers, and keys its captured
    graphs by variant, for the whole series. ``adapter_fingerprint`` stays None: each variant
    has its own (``adapter_fingerprints``).
    """

    adapters: dict[str, SeriesAdapter] = field(default_factory=dict)

    @property
    def base_model(self):
        return self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model

    @property
    def adapter_fingerprints(self) -> dict[str, str]:
        return {name: adapter.fingerprint for name, adapter in self.adapters.items()}

    def check_variant(self, name: str) -> None:
        """Raise ``AdapterRefused`` for a checkpoint whose adapter failed its proof."""
        adapter = self.adapters.get(name)
        if adapter is not None and adapter.refused:
            raise AdapterRefused(adapter.refused)

    @contextmanager
    def variant(self, name: str):
        if name == BASE_VARIANT:
            with self.model.disable_adapter() if self.adapters else nullcontext():
                yield self.model
            return
        if name not in self.adapters:
            raise ValueError(f"unknown variant {name!r}; expected 'base' or one of {', '.join(self.adapters)}")
        self.check_variant(name)
        # inference_mode: peft would otherwise make the adapter's weights trainable again
        self.model.set_adapter(self.adapters[name].peft_name, inference_mode=True)
        yield self.model

    def describe(self) -> dict:
        described = super().describe()
        described["adapters"] = [adapter.describe() for adapter in self.adapters.values()]
        return described


def load_series_pair(
    base_path: str | Path,
    adapters: "list[tuple[str, Path]]",
    *,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
    allow_pickle: bool = False,
) -> SeriesPair:
    """The base model once and every (checkpoint name, adapter folder) beside it, each proven
    as ``load_pair`` proves one. An adapter that loads but fails the fixed-input check (no
    change to the logits, or not finite) is kept, marked ``refused``, instead of failing the
    load: in a series that is a finding about one checkpoint (a step-0 checkpoint has all-zero
    lora_B), not bad input."""
    plain = load_pair(base_path, None, device=device, dtype=dtype, allow_pickle=allow_pickle)
    pair = SeriesPair(**{name: getattr(plain, name) for name in ModelPair.__dataclass_fields__})
    for position, (name, folder) in enumerate(adapters):
        folder = Path(folder)
        loaded = _load_proven_adapter(pair, folder, allow_pickle, f"series_{position}")
        pair.model = loaded.model
        adapter = SeriesAdapter(name=name, path=folder, fingerprint=loaded.fingerprint,
                                peft_name=f"series_{position}", key_layout=loaded.key_layout,
                                lora_modules_applied=len(loaded.modules))
        pair.adapters[name] = adapter
        change = adapter_logit_change(pair, name)
        try:
            _check_logit_change(folder, change, pair.dtype)
        except ModelLoadError as exc:
            adapter.refused = str(exc)
        else:
            adapter.logit_change = change
    pair.model.eval()
    for param in pair.model.parameters():
        param.requires_grad_(False)
    return pair


def _check_adapter_matches_config(adapter_path: Path, header: dict) -> None:
    """The adapter's tensors are those its adapter_config.json describes: its rank ``r``
    (unless a ``rank_pattern`` sets ranks per module) and, when ``target_modules`` is a list,
    a targeted module for every tensor. Otherwise peft would build other layers than the file
    holds and the load fails only after the base model's weights are read."""
    config_path, config = _folder_config(adapter_path, "adapter", "a peft adapter folder", "adapter_config.json")
    rank = config.get("r") if not config.get("rank_pattern") else None
    targets = config.get("target_modules")
    for key, info in header.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        shape = info.get("shape", [])
        if isinstance(rank, int) and len(shape) == 2 and shape[0 if ".lora_A." in key else 1] != rank:
            have = shape[0 if ".lora_A." in key else 1]
            raise ModelLoadError(f"{config_path}: r is {rank}, but {key} has rank {have}: the config "
                                 "does not describe these adapter weights")
        module = _module_of(key)
        if isinstance(targets, list) and targets and not any(
                module == target or module.endswith(f".{target}") for target in targets):
            raise ModelLoadError(f"{config_path}: target_modules {targets} do not include {module}, "
                                 f"which the adapter weights hold ({key}): the config does not "
                                 "describe these adapter weights")


def adapter_fingerprint(folder: str | Path, allow_pickle: bool = False) -> str:
    """The fingerprint ``load_pair`` gives the adapter of ``folder``, read without loading it."""
    folder = Path(folder)
    return _fingerprint_adapter(folder, _check_adapter_folder(folder, allow_pickle))


def check_adapter_fits(base_path: str | Path, adapter_path: str | Path) -> None:
    """Every LoRA tensor of the adapter must fit a linear weight of the base model: the
    module exists (after mapping transformers<4.52 paths) and lora_A's input width and
    lora_B's output width are the weight's. Read from the safetensors headers only, so an
    adapter made for another model is refused before any weights load; pickle files are left
    to the load's own checks."""
    base_path, adapter_path = Path(base_path), Path(adapter_path)
    adapter_file = _check_adapter_folder(adapter_path, allow_pickle=True)
    weights = _find_weight_files(base_path, allow_pickle=True)
    if adapter_file.suffix != ".safetensors" or not weights.safetensors:
        return
    adapter_header = json.loads(read_safetensors_header(adapter_file))
    _check_adapter_matches_config(adapter_path, adapter_header)
    shapes: dict[str, list[int]] = {}
    for path in weights.files:
        for key, info in json.loads(read_safetensors_header(path)).items():
            if key != "__metadata__":
                shapes[_apply_mapping(key, OLD_TO_CURRENT_LAYOUT)] = info["shape"]
    misfits = []
    lora_keys = [k for k in adapter_header if ".lora_A." in k or ".lora_B." in k]
    for key in lora_keys:
        shape = adapter_header[key]["shape"]
        weight = _apply_mapping(_module_of(key), OLD_TO_CURRENT_LAYOUT) + ".weight"
        base_shape = shapes.get(weight)
        if base_shape is None or len(base_shape) != 2 or len(shape) != 2:
            misfits.append(f"{key} (the base has no 2-D {weight})")
        elif ".lora_A." in key and shape[1] != base_shape[1]:
            misfits.append(f"{key}: input width {shape[1]}, the base's {weight} takes {base_shape[1]}")
        elif ".lora_B." in key and shape[0] != base_shape[0]:
            misfits.append(f"{key}: output width {shape[0]}, the base's {weight} gives {base_shape[0]}")
    if misfits:
        raise ModelLoadError(
            f"{adapter_path}: made for another base model than {base_path}: {len(misfits)} of "
            f"{len(lora_keys)} LoRA tensors do not fit it, e.g. {misfits[0]}")

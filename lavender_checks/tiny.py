"""The offline tiny Mllama: model, tokenizer, processor and LoRA adapters for tests and demos.

Everything is built here from nothing (no download), deterministically, and saved with
``save_pretrained`` so that tests load it through exactly the path real weights take
(``model.load_pair``). The tiny model keeps the real architecture's shape of things: a tiled
vision tower with local and global (gated) layers and intermediate-layer features, text
self-attention layers interleaved with gated cross-attention layers, Llama 3's special
tokens and chat template, a vocabulary whose ``<|image|>`` id lies just past the text
vocabulary (as 128256 does), and a generation config with several EOS ids.

Two constraints make a tiny ``MllamaForConditionalGeneration`` work at all:
``pad_token_id`` must lie inside the (tiny) embedding table, and the vision tower's
``vision_output_dim`` must equal ``hidden_size * (len(intermediate_layers_indices) + 1)``
because the projector reads the last hidden state concatenated with each intermediate one.

A random model at the usual initialisation scale gives near-uniform logits (argmax decided
by noise) and never emits EOS. Here:

* the weights are scaled up, so greedy choices have clear margins;
* the gates of the cross-attention and vision layers are opened, so the image and the
  vision-tower LoRA reach the logits (they are zero at initialisation);
* ``lm_head`` rows of special tokens other than ``<|eot_id|>`` and of tokens that decode to
  lone bytes or control characters are zero, so outputs are printable text;
* the ``<|eot_id|>`` row points along the mean final hidden state, and the generation config
  carries transformers' ``exponential_decay_length_penalty`` (EOS logit boosted from the
  10th new token on). Alone, the EOS row gave either an immediate EOS or a loop to the
  token budget; with the penalty every greedy generation ends within a few tens of tokens
  (measured on 340 generations: median 14-18 new tokens, maximum 26).

Without torchvision the processor uses ``MllamaImageProcessorPil``; ``AutoProcessor``
chooses the backend when loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lavender_checks import REPO_ROOT

# Bump when anything the builder writes changes; the cache folder name depends on it.
TINY_FORMAT_VERSION = 2
DEFAULT_ROOT = REPO_ROOT / ".cache" / "tiny"
SEED = 20241127

# ---------------------------------------------------------------------------------------
# Tokenizer

# Llama 3's pre-tokenizer split pattern (byte-level BPE after this split).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3's first special tokens, in Llama 3's order (128000..128010 there; here they follow
# the trained vocabulary). Reserved tokens fill the rest of the text vocabulary, and
# <|image|> takes the id just past it, as 128256 does.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"
BOS_TOKEN = "<|begin_of_text|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
EOS_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # 128001, 128008, 128009 in Llama 3.2
BPE_VOCAB_TARGET = 960
TEXT_VOCAB_MULTIPLE = 64

# Llama 3.2 Vision Instruct's chat template (the image-aware Llama 3.2 template). With an
# image present it emits no system block and no date line; content items are rendered in
# order, {'type': 'image'} as <|image|>.
LLAMA32_VISION_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {{- "Cutting Knowledge Date: December 2023\\n" }}
    {{- "Today Date: " + date_string + "\\n\\n" }}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif content['type'] == 'text' %}
                {{- content['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# The text the tiny BPE is trained on: the benchmark prompt wording, common English, digits,
# option letters and yes/no, so prompts tokenize into a realistic number of tokens.
TOKENIZER_CORPUS = (
    "Read the text in the image carefully and answer the question with the text as seen exactly "
    "in the image. For yes/no questions, just respond Yes or No. If the answer is numeric, just "
    "respond with the number and nothing else. If the answer has multiple words, just respond with "
    "the words and absolutely nothing else. Never respond in a sentence or a phrase.\n Question: ",
    "You are provided a chart image and will be asked a question. You have to think through your "
    "answer and provide a step-by-step solution. Once you have the solution, write the final answer "
    'in at most a few words at the end with the phrase "FINAL ANSWER:". The question is: '
    "<cot_start>Let's think step by step.",
    "Hint: The picture is a photo.\nQuestion: What is shown?\nOptions:\nA. cat\nB. dog\nC. bird\n"
    "D. fish\nPlease select the correct answer from the options above. \n",
    "Is there a dog in this image? Please answer yes or no. Is this photo taken indoors? "
    "Are there two people in the image? Is the word in the logo 'OPEN'? Yes No yes no",
    "What is the total amount? What is the date mentioned in the letter? Who is the sender? "
    "What is the title of the document? Which year has the highest value? How many bars are there? "
    "What is the difference between the largest and the smallest value? What percentage of people "
    "answered yes? Which country has the lowest share? What was the revenue in 2019?",
    "The answer is A. The answer is B. The answer is C. The answer is D. The correct answer is "
    "(A) (B) (C) (D) A B C D a b c d Option A Option B FINAL ANSWER: 42 FINAL ANSWER: Yes",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 75 100 1000 2010 2015 2019 2020 2021 2022 2023 2024 "
    "3.5 12.7 0.25 45% 60% $1,250 1/8/93 January February March April May June July August "
    "September October November December Monday Tuesday",
    "the of and to in is it that for on with as was are be this by at from or an have not they "
    "which one you all were there when what we can more if out so about up into than them only "
    "other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three",
    "image picture photo chart graph table document page letter form report figure text number "
    "value total price cost sales growth share percent market company government public school "
    "city country water food color red blue green yellow black white left right top bottom "
    "person people man woman child dog cat bird fish car house tree sky sun building street sign",
    "Step 1: Look at the chart. Step 2: Find the value. Step 3: Compare the values. "
    "So the answer is 12. Therefore, the final answer is 25%. I cannot determine the answer. "
    "Sorry, I can't help with images of people yet.",
)

# ---------------------------------------------------------------------------------------
# Model shape (tiny) and weight scales

TILE_SIZE = 56  # 4 x 4 patches of 14 pixels per tile; the real model uses 560
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_global_layers=1,
    attention_heads=2,
    intermediate_size=64,
    intermediate_layers_indices=[1],
    vision_output_dim=32 * (1 + 1),  # hidden_size * (len(intermediate_layers_indices) + 1)
    image_size=TILE_SIZE,
    patch_size=14,
    max_num_tiles=4,
    norm_eps=1e-5,
)
TEXT = dict(
    hidden_size=64,
    num_hidden_layers=4,
    cross_attention_layers=[1, 3],
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
# The differently shaped tiny model that `adapter_other_base/` is made for.
OTHER_TEXT_HIDDEN = 48

WEIGHT_STD = 0.25  # linear layers and embeddings (0.02 gives near-uniform logits)
GATE_VALUE = 1.0  # cross-attention and vision gates (0 at init would hide the image)
EOT_LOGIT_SCALE = 8.0  # length of the <|eot_id|> row of lm_head along the mean hidden direction
EOT_LENGTH_PENALTY = (10, 1.15)  # (start, factor): EOS logit * 1.15**n after 10 new tokens

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
LORA_B_STD = 0.5


@dataclass(frozen=True)
class TinyCheckpoints:
    """Paths of one tiny build (all Hugging Face folders)."""

    root: Path
    base: Path  # MllamaForConditionalGeneration + MllamaProcessor
    adapter: Path  # LoRA over q_proj/v_proj of both towers, current module layout
    adapter_old_layout: Path  # the same LoRA with transformers 4's key layout
    adapter_other_base: Path  # a LoRA made for a differently shaped tiny model


def _build_stamp() -> dict:
    import peft
    import tokenizers
    import transformers

    # A library update can change what save_pretrained writes: rebuild then.
    return {
        "format": TINY_FORMAT_VERSION,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
    }


def ensure_tiny_checkpoints(root: Path | str | None = None) -> TinyCheckpoints:
    """Build the tiny checkpoints under ``root`` unless a build with the same stamp exists.

    Safe when several processes call it at once: each builds in its own temporary folder
    and renames it into place; the first rename wins and the others discard their copy.
    """
    root = Path(root) if root is not None else DEFAULT_ROOT
    stamp = _build_stamp()
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    final = root / f"tiny-{digest}"
    if not (final / "stamp.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            _build_all(tmp)
            (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "stamp.json").is_file():
                    raise
                # another process finished first; its build is identical
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final)


def _paths(folder: Path) -> TinyCheckpoints:
    return TinyCheckpoints(
        root=folder,
        base=folder / "base",
        adapter=folder / "adapter",
        adapter_old_layout=folder / "adapter_old_layout",
        adapter_other_base=folder / "adapter_other_base",
    )


def _build_all(folder: Path) -> None:
    paths = _paths(folder)
    processor = build_tiny_processor(TILE_SIZE)
    model = build_tiny_model(processor.tokenizer)
    model.save_pretrained(paths.base, safe_serialization=True)
    processor.save_pretrained(paths.base)
    for name in ("config.json", "generation_config.json"):
        _drop_writer_version(paths.base / name)

    save_random_lora(model, paths.adapter, seed=SEED + 1)
    write_old_layout_adapter(paths.adapter, paths.adapter_old_layout)

    other = build_tiny_model(processor.tokenizer, text_hidden_size=OTHER_TEXT_HIDDEN)
    save_random_lora(other, paths.adapter_other_base, seed=SEED + 2)


# ---------------------------------------------------------------------------------------
# Tokenizer and processor


def build_tiny_tokenizer():
    """A byte-level BPE with Llama 3's pre-tokenizer, special tokens and BOS post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_TARGET,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(list(TOKENIZER_CORPUS), trainer)

    n_regular = tok.get_vocab_size()
    text_vocab = -(-(n_regular + len(LLAMA3_SPECIAL_TOKENS)) // TEXT_VOCAB_MULTIPLE) * TEXT_VOCAB_MULTIPLE
    specials = list(LLAMA3_SPECIAL_TOKENS)
    specials += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + text_vocab - n_regular - len(specials))]
    tok.add_special_tokens(specials + [IMAGE_TOKEN])
    if tok.token_to_id(IMAGE_TOKEN) != text_vocab:
        raise RuntimeError(f"<|image|> got id {tok.token_to_id(IMAGE_TOKEN)}, expected {text_vocab}")

    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like Llama 3's tokenizer.json: every encode with special tokens starts with BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=131072,
        # As Llama 3's tokenizer_config.json; transformers 5 ignores it for BPE (with a warning).
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=LLAMA32_VISION_CHAT_TEMPLATE,
    )


def build_tiny_processor(tile_size: int = TILE_SIZE, tokenizer=None):
    """``MllamaProcessor`` with the tiny tokenizer and square tiles of ``tile_size`` pixels."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    # The PIL backend needs no torchvision; AutoProcessor picks the backend when loading.
    image_processor = MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=4)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return MllamaProcessor(image_processor, tokenizer, chat_template=LLAMA32_VISION_CHAT_TEMPLATE)


def special_token_ids(tokenizer) -> dict[str, int | list[int]]:
    """The ids a Mllama config needs, read from the tokenizer."""
    return {
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "eos_token_id": [tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS],
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    }


# ---------------------------------------------------------------------------------------
# Model


def tiny_config(tokenizer, text_hidden_size: int | None = None):
    from transformers import MllamaConfig

    ids = special_token_ids(tokenizer)
    text = dict(TEXT)
    if text_hidden_size is not None:
        text["hidden_size"] = text_hidden_size
    text.update(
        vocab_size=ids["image_token_index"],  # <|image|> is the first id past the text vocabulary
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        initializer_range=WEIGHT_STD,
        tie_word_embeddings=False,
    )
    config = MllamaConfig(
        vision_config=dict(VISION, initializer_range=WEIGHT_STD),
        text_config=text,
        image_token_index=ids["image_token_index"],
    )
    return config


def build_tiny_model(tokenizer, text_hidden_size: int | None = None):
    """A tiny ``MllamaForConditionalGeneration`` with deterministic, not-too-degenerate weights."""
    import torch
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    config = tiny_config(tokenizer, text_hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MllamaForConditionalGeneration(config).eval()
        _open_gates(model)
    ids = special_token_ids(tokenizer)
    _shape_lm_head(model, tokenizer, ids)
    # Mirrors the real generation_config.json (sampling defaults included): generation code
    # must switch to greedy itself.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
        exponential_decay_length_penalty=EOT_LENGTH_PENALTY,
    )
    return model


def _open_gates(model) -> None:
    """Set the gates that initialise to zero (cross-attention, positional and tile
    embeddings: parameter names ending in "gate") to GATE_VALUE. The global vision layers'
    gate_attn/gate_ffn are already random and non-zero."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(GATE_VALUE)


def _shape_lm_head(model, tokenizer, ids) -> None:
    """Silence the special tokens and aim <|eot_id|> at the mean final hidden state.

    Rows of special tokens other than <|eot_id|> are zeroed (logit 0 while ordinary tokens
    reach clearly positive maxima), so greedy output is ordinary text ending in <|eot_id|>.
    """
    import torch

    head = model.lm_head.weight
    n_regular = ids["bos_token_id"]  # the specials follow the trained vocabulary
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    hidden = _mean_final_hidden(model, tokenizer)
    with torch.no_grad():
        head[n_regular:] = 0.0
        for token_id in range(n_regular):
            if not _printable(tokenizer.decode([token_id])):
                head[token_id] = 0.0
        head[eot] = EOT_LOGIT_SCALE * hidden / hidden.norm()


def _printable(text: str) -> bool:
    # Lone bytes of multi-byte characters decode to U+FFFD; control characters are noise too.
    return text.isascii() and (text.isprintable() or text.strip(" \n") == "")


def _mean_final_hidden(model, tokenizer):
    """Mean of the final (normed) hidden states over the training corpus, text only."""
    import torch

    texts = [t for t in TOKENIZER_CORPUS]
    with torch.no_grad():
        states = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            out = model.model.language_model(input_ids=ids)
            states.append(out.last_hidden_state[0])
        return torch.cat(states).mean(0)


# ---------------------------------------------------------------------------------------
# Adapters


def save_random_lora(model, folder: Path, seed: int) -> None:
    """Wrap ``model`` with a LoRA over every q_proj/v_proj (both towers), random non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**LORA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(std=LORA_B_STD)
    peft_model.save_pretrained(folder, safe_serialization=True)
    _make_reproducible(folder)
    peft_model.unload()  # give the caller its plain model back


def _drop_writer_version(path: Path) -> None:
    # The writing library's version is not part of the model: without it the build (and the
    # base fingerprint) is the same under every transformers version the suite supports.
    data = json.loads(path.read_text())
    data.pop("transformers_version", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _make_reproducible(folder: Path) -> None:
    # peft records the base model's path (here a temporary folder) and writes target_modules
    # from a set (order varies with the hash seed): pin both so builds are byte-identical.
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tiny-mllama"
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card template


# transformers >= 4.52 moved the towers under `model.`; adapters trained before carry the old keys.
_NEW_TO_OLD_PREFIXES = (
    ("base_model.model.model.language_model.", "base_model.model.language_model.model."),
    ("base_model.model.model.vision_model.", "base_model.model.vision_model."),
    ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."),
)


def write_old_layout_adapter(source: Path, dest: Path) -> Path:
    """Copy an adapter, renaming its keys to transformers 4's Mllama layout."""

    def rename(key: str) -> str:
        for new, old in _NEW_TO_OLD_PREFIXES:
            if key.startswith(new):
                return old + key[len(new):]
        return key

    return _rewrite_adapter(source, dest, rename)


def write_mismatched_adapter(source: Path, dest: Path) -> Path:
    """Copy an adapter with keys that match no module of the model (``q_proj`` -> ``qx_proj``)."""
    return _rewrite_adapter(source, dest, lambda key: key.replace(".q_proj.", ".qx_proj."))


def write_inert_adapter(source: Path, dest: Path) -> Path:
    """Copy an adapter with every ``lora_B`` set to zero: it loads but changes nothing."""
    import torch

    return _rewrite_adapter(source, dest, lambda key: key, lambda key, t: torch.zeros_like(t) if ".lora_B." in key else t)


def _rewrite_adapter(source: Path, dest: Path, rename, transform=None) -> Path:
    from safetensors.torch import load_file, save_file

    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_config.json", dest / "adapter_config.json")
    tensors = load_file(source / "adapter_model.safetensors")
    out = {}
    for key, tensor in tensors.items():
        out[rename(key)] = transform(key, tensor) if transform else tensor
    save_file(out, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest

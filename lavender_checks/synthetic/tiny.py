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

A random model answers with text no scorer can read and never emits EOS, so every score
of the built-in run would be 0 and the default gate would check nothing. The tiny model
therefore answers like a (poor) benchmark model: one short answer token, then
``<|eot_id|>`` (``_shape_answers``):

* ``Yes`` / ``No`` to yes/no questions, an option letter to multiple-choice prompts, a
  number or a word (``ANSWERS["short"]``) to the document and chart templates;
* which answer depends mainly on the question's words (a hash of its content words) and,
  for options, on a fixed random preference among option texts, so that a question tends
  to get the same option in every rotation (MMBench's circular evaluation can score it);
* the LoRA adapter changes a share of the answers (about 10 to 60 percent of the rows of
  a mini benchmark), so base and Lavender differ by gains and losses.

This is built from a few hand-made parts (uniform-attention heads that read marker words,
a content hash and option lines) and an ``lm_head`` fitted in closed form on synthetic
calibration prompts, all deterministic. The gates of the cross-attention and vision layers
are opened (they are zero at initialisation) so that the image and the vision-tower LoRA
reach the hidden states. ``lm_head`` rows of special tokens other than ``<|eot_id|>`` and of
tokens that decode to lone bytes or control characters are zero, so outputs are printable.
The generation config keeps transformers' ``exponential_decay_length_penalty`` as a safety
net: should a prompt get no answer, the EOS logit grows from the 10th new token on.

Without torchvision the processor uses ``MllamaImageProcessorPil``; ``AutoProcessor``
chooses the backend when loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavender_checks import CACHE_ROOT
from lavender_checks.engines.request import EOT_TOKEN
from lavender_checks.model import PAD_TOKEN

# Bump when anything the builder writes changes; the cache folder name depends on it.
TINY_FORMAT_VERSION = 6
DEFAULT_ROOT = CACHE_ROOT / "tiny"
SEED = 20241127
ADAPTER_SEED = SEED + 1  # the adapter of the tiny pair (the answers are calibrated with it too)

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

# Prompt wording the tiny model is trained and calibrated on (VLMEvalKit's llama_vision
# templates for DocVQA and ChartQA, its MMBench option block and MME's yes/no suffix). They
# only shape a synthetic model: the suite's own prompts come from the run profile.
DOCUMENT_PROMPT = (
    "Read the text in the image carefully and answer the question with the text as seen exactly "
    "in the image. For yes/no questions, just respond Yes or No. If the answer is numeric, just "
    "respond with the number and nothing else. If the answer has multiple words, just respond with "
    "the words and absolutely nothing else. Never respond in a sentence or a phrase.\n Question: "
)
CHART_PROMPT = (
    "You are provided a chart image and will be asked a question. You have to think through your "
    "answer and provide a step-by-step solution. Once you have the solution, write the final answer "
    'in at most a few words at the end with the phrase "FINAL ANSWER:". The question is: '
)
CHART_PROMPT_END = "<cot_start>Let's think step by step."
OPTIONS_INSTRUCTION = "Please select the correct answer from the options above. \n"
YES_NO_SUFFIX = " Please answer yes or no."

# Words whose share of a prompt the first layer measures (see _add_prompt_head), single
# tokens: the markers of each kind of prompt, of the instruction after an option list, and
# the option letters (where each option's line begins).
PROMPT_MARKERS = {
    "yes_no": (" yes", " no"),
    "option": ("Options",),
    "options_end": (" select", " options"),
    "short": (" respond", " chart", " step", " solution", "FINAL"),
    "option_a": ("A",),
    "option_b": ("B",),
    "option_c": ("C",),
    "option_d": ("D",),
}
OPTION_LETTERS = ("option_a", "option_b", "option_c", "option_d")  # the groups of the letters, in order

# What the tiny model answers, by the kind of prompt: single tokens of the tiny BPE (the
# builder checks). The kind of the prompt decides the kind of answer; its words decide which
# answer of that kind wins. The short answers are numbers and words that occur among the
# answers of the mini benchmarks (fixtures/lmudata-mini), so that a few rows score there.
ANSWERS = {
    "yes_no": ("Yes", "No"),
    "option": ("A", "B", "C", "D"),
    "short": ("4", "8", "12", "16", "20", "25", "40", "45", "50", "60", "West", "Blue", "Mon", "Brown"),
}

# Words kept out of the content hash of the prompt head (_add_prompt_head): the prompt
# templates and the words any question is made of, so the hash follows what a question is
# about. Listed spaced and at line starts, the two forms a word takes as a token.
_HASH_STOP_WORDS = (
    "the of and to in is it that for on with as was are be this by at from or an a have not "
    "which what who where when how many much there their does do did can will would should "
    "picture image photo shown show Is Are Does Do What Which Who Where When How Please "
    "answer question Question Hint Options yes no user assistant system"
).split()
HASH_STOP_TEXT = (
    DOCUMENT_PROMPT + CHART_PROMPT + CHART_PROMPT_END + OPTIONS_INSTRUCTION + YES_NO_SUFFIX
    + "Question: Options:\nHint: " + " ".join(_HASH_STOP_WORDS) + "\n" + "\n".join(_HASH_STOP_WORDS)
)

# The text the tiny BPE is trained on: the benchmark prompt wording, common English, digits,
# option letters and yes/no, so prompts tokenize into a realistic number of tokens. The
# answers stand alone on their lines (several times) so that each becomes one token without
# a leading space, as an answer starts.
TOKENIZER_CORPUS = (
    DOCUMENT_PROMPT,
    CHART_PROMPT + CHART_PROMPT_END,
    "Hint: The picture is a photo.\nQuestion: What is shown?\nOptions:\nA. cat\nB. dog\nC. bird\n"
    "D. fish\n" + OPTIONS_INSTRUCTION,
    "Is there a dog in this image?" + YES_NO_SUFFIX + " Is this photo taken indoors? "
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
    "\n".join(answer for kind in ANSWERS.values() for answer in kind for _ in range(4)),
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

WEIGHT_STD = 0.12  # linear layers and embeddings
GATE_VALUE = 1.0  # cross-attention and vision gates (0 at init would hide the image)

# The answer circuit (see _shape_answers). Hidden states are RMS-normed to length
# sqrt(hidden_size) = 8 wherever a layer reads them.
ANSWER_EMBEDDING_NORM = 24.0  # answer tokens' embeddings: this far along one shared direction
MARKER_EMBEDDING_NORM = 24.0  # marker words' embeddings: this far along their group's direction
HASH_EMBEDDING_NORM = 2.0  # content words' embeddings: this long in the hash plane
OPTION_LETTER_SCORE = 4.0  # option letters' embeddings: this far along the option-score direction
MARKER_GAIN = 200.0  # what the prompt head writes per unit of marker share it reads
HASH_GAIN = 50.0  # what the prompt head writes per unit of content hash it reads
OPTION_LINE_GATE = 5.0  # gate of the option-line neurons per unit of (normed) marker share
OPTION_LINE_GAIN = 20.0  # what an option-line neuron writes per unit of its output
OPTION_HEAD_LAYER = 2  # the self-attention layer whose uniform heads sum the option lines
OPTION_GAIN = 200.0  # what those heads write per unit of option score they read
# The rebuilt (uniform) heads are query heads 0 and 1 of text layers 0 and OPTION_HEAD_LAYER
# and the key/value head they share. The adapter leaves their queries and the first layer's
# marker values (the kind of prompt) alone and shifts the option scores only a little, so
# both variants answer in the prompt's kind; it changes the content hash and the rest.
PROMPT_HEAD_LAYERS = (0, OPTION_HEAD_LAYER)
OPTION_ADAPTER_SHARE = 0.05  # the share the adapter keeps of its change to the option scores
PROMPT_HEAD_QUERY_HEADS = 2
FIT_LOGIT = 40.0  # an answer's logit where it fits the prompt (fitted to 1, else 0), times this
CHOICE_LOGIT = 4.0  # an answer's logit per standard deviation of its choice readout
STOP_LOGIT = 40.0  # <|eot_id|> logit right after an answer (fitted to 1, 0 before it), times this
RIDGE = 10.0  # ridge penalty of the readout fit (in squared hidden units)
CALIBRATION_PER_KIND = 64  # calibration prompts per kind of prompt
CALIBRATION_BATCH = 32  # calibration prompts per forward pass
# Safety net for a prompt unlike any calibration one: the EOS logit grows by 1.15**n after
# 10 new tokens, so every greedy generation still ends within tens of tokens.
EOT_LENGTH_PENALTY = (10, 1.15)

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
LORA_B_STD = 0.4  # the tiny adapter's B (A: peft's initialisation)


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
    _record_weights_digest(paths.base)

    save_random_lora(model, paths.adapter, seed=ADAPTER_SEED)
    write_old_layout_adapter(paths.adapter, paths.adapter_old_layout)

    other = build_tiny_model(processor.tokenizer, text_hidden_size=OTHER_TEXT_HIDDEN, answers=False)
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


def build_tiny_model(tokenizer, text_hidden_size: int | None = None, *, answers: bool = True):
    """A tiny ``MllamaForConditionalGeneration`` with deterministic, not-too-degenerate weights.

    answers: shape the model to give short scorable answers (``_shape_answers``); off for a
    model that only lends its shapes (the differently shaped base of ``adapter_other_base``).
    """
    import torch
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    config = tiny_config(tokenizer, text_hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MllamaForConditionalGeneration(config).eval()
        _open_gates(model)
    ids = special_token_ids(tokenizer)
    if answers:
        _shape_answers(model, build_tiny_processor(TILE_SIZE, tokenizer))
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


# ---------------------------------------------------------------------------------------
# Answers


def answer_token_ids(tokenizer) -> dict[str, list[int]]:
    """The token id of every answer in ``ANSWERS``, by kind; each answer must be one token."""
    return _single_token_ids(tokenizer, ANSWERS, "answer")


def _single_token_ids(tokenizer, words_by_group: dict[str, tuple[str, ...]], role: str) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for group, words in words_by_group.items():
        ids[group] = []
        for word in words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise RuntimeError(f"tiny tokenizer: {role} {word!r} ({group}) is {len(tokens)} tokens, "
                                   "not one; add it to TOKENIZER_CORPUS")
            ids[group].append(tokens[0])
    return ids


@dataclass
class _Directions:
    """Orthonormal directions of the text residual stream that the answer circuit uses."""

    answer: Any  # shared by the answer tokens' embeddings
    marker_read: Any  # (marker groups, hidden): carried by the marker tokens' embeddings
    marker_write: Any  # where the prompt head writes each group's share
    hash_read: Any  # (2, hidden): the hash plane of the content tokens' embeddings
    hash_write: Any  # where the prompt head writes the content hash
    line_write: Any  # (4, hidden): where layer 0's MLP writes each option line's word scores
    option_write: Any  # (4, hidden): where layer 2's head writes each option's preference


def _shape_answers(model, processor) -> None:
    """Make greedy decoding answer in one scorable token that depends on the input, then stop.

    A random model gives text no scorer can read and never emits EOS. After the random
    initialisation a few parts of the model are rebuilt by hand and ``lm_head`` is fitted
    on calibration prompts:

    1. the answer tokens' embeddings get a long shared component, so the final hidden state
       right after an answer token looks alike whatever came before;
    2. the first layer's prompt head (``_add_prompt_head``) gives every position the share
       of each group of marker words among the tokens so far (the kind of prompt; where the
       option lines begin) and a hash of the content words so far;
    3. the first layer's MLP and the third layer's attention (``_add_option_preference``)
       give every position, per option letter, the scores of the words on that option's
       line: a fixed random preference among option texts, wherever an option stands;
    4. calibration prompts of each kind (``calibration_prompts``) run through the model with
       and without the tiny adapter; one ridge regression on the final hidden states of both
       reads out whether each answer fits the prompt (1 before the answer to a prompt of its
       kind, 0 elsewhere), whether an answer was just given (1 right after it, 0 before),
       the content hash and the four option scores;
    5. each answer's ``lm_head`` row is FIT_LOGIT times its fit readout plus CHOICE_LOGIT
       times its choice readout: for an option letter its option's score, so the model picks
       its favourite option text in every rotation of a question (an option the prompt does
       not list has no line and scores nothing, while a listed one gets its letter's score);
       for the other answers a direction in the plane of the content hash (the answers of a
       kind spread evenly around it), so the question's words decide, and template and
       function words do not;
    6. the ``<|eot_id|>`` row is STOP_LOGIT times the after-an-answer readout: the
       generation ends right after its answer;
    7. rows of special tokens other than ``<|eot_id|>`` and of tokens that decode to lone
       bytes or control characters are zero (printable output, no other EOS id).

    The adapter leaves the rebuilt heads' attention and markers alone and shifts the option
    scores only a little (``_limit_adapter_on_prompt_heads``): both variants answer in the prompt's
    kind, and the adapter changes answers through the content hash, the option scores and
    the rest of the hidden state. Everything
    is closed-form linear algebra on a fixed set of inputs: deterministic.
    """
    import math

    import torch

    tokenizer = processor.tokenizer
    answer_ids = answer_token_ids(tokenizer)
    kinds = list(ANSWERS)
    n_regular = tokenizer.convert_tokens_to_ids(BOS_TOKEN)  # the specials follow the trained vocabulary
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    embed = model.get_input_embeddings().weight
    head = model.lm_head.weight
    hidden_size = head.shape[1]
    generator = torch.Generator().manual_seed(SEED + 3)
    groups = len(PROMPT_MARKERS)
    basis = torch.linalg.qr(torch.randn(hidden_size, 1 + 2 * groups + 4 + 8, generator=generator)).Q.T
    directions = _Directions(*basis.split([1, groups, groups, 2, 2, 4, 4]))
    directions.answer = directions.answer[0]

    with torch.no_grad():
        embed[[token for kind in kinds for token in answer_ids[kind]]] += ANSWER_EMBEDDING_NORM * directions.answer
        _add_prompt_head(model, tokenizer, directions, generator)
        _add_option_preference(model, directions)

        prompts = calibration_prompts(processor)
        appended = [answer_ids[kind][int(torch.randint(len(answer_ids[kind]), (1,), generator=generator))]
                    for kind, _, _ in prompts]
        before, after, features = _calibration_states(model, processor, prompts, appended)
        # Fitted on the adapted model's states too, so that the readouts hold for both variants.
        with random_lora(model, ADAPTER_SEED) as adapted:
            adapted_before, adapted_after, adapted_features = _calibration_states(adapted, processor, prompts, appended)

        answers = [(kind, token) for kind in kinds for token in answer_ids[kind]]
        fits = torch.tensor([[float(answer_kind == kind) for answer_kind, _ in answers] for kind, _, _ in prompts])
        # Not centred: zero is no content (hash) and no preference (options), whatever the template.
        scale = features.std(0)
        no_stop = torch.zeros(len(prompts), 1)
        before_targets = torch.cat([fits, no_stop, features / scale], dim=1)
        adapted_targets = torch.cat([fits, no_stop, adapted_features / scale], dim=1)
        after_targets = torch.zeros_like(before_targets)
        after_targets[:, len(answers)] = 1.0
        states = torch.cat([before, adapted_before, after, adapted_after])
        targets = torch.cat([before_targets, adapted_targets, after_targets, after_targets])
        gram = states.T @ states + RIDGE * torch.eye(hidden_size, dtype=states.dtype)
        readouts = torch.linalg.solve(gram, states.T @ targets).T
        fit_dirs, stop_dir = readouts[: len(answers)], readouts[len(answers)]
        hash_dirs, option_dirs = readouts[len(answers) + 1 :].split([2, 4])

        head[n_regular:] = 0.0
        for token_id in range(n_regular):
            if not _printable(tokenizer.decode([token_id])):
                head[token_id] = 0.0
        for (kind, token_id), fit_dir in zip(answers, fit_dirs):
            position = answer_ids[kind].index(token_id)
            if kind == "option":
                choice = option_dirs[position]
            else:
                angle = 2 * math.pi * position / len(answer_ids[kind])
                choice = math.cos(angle) * hash_dirs[0] + math.sin(angle) * hash_dirs[1]
            head[token_id] = FIT_LOGIT * fit_dir + CHOICE_LOGIT * choice
        head[eot] = STOP_LOGIT * stop_dir


def _add_prompt_head(model, tokenizer, directions: _Directions, generator) -> None:
    """Turn the first layer's attention heads 0 and 1 into a reader of the prompt's words.

    Their queries are zero, so they attend uniformly to every token so far, and their shared
    values read a few directions of the (normed) token embeddings, which head 0 writes back
    along directions of its own:

    * one direction per group of ``PROMPT_MARKERS``, carried (long) by that group's tokens
      and by no other embedding: each position gets the share of each group's words among
      the tokens so far, which tells the kind of prompt and the option lines begun so far;
    * the hash plane: every content token's embedding holds a vector of length
      HASH_EMBEDDING_NORM at a random angle in it; the tokens of ``HASH_STOP_TEXT``
      (templates, function words), punctuation and special tokens have none. The mean is a
      hash of the content words, centred on zero whatever the prompt's template.

    A random model keeps these only in a tangle that does not generalise from calibration
    prompts to others; bag-of-words features do.
    """
    import math

    import torch

    marker_ids = _single_token_ids(tokenizer, PROMPT_MARKERS, "prompt marker")
    embed = model.get_input_embeddings().weight
    attention = model.model.language_model.layers[0].self_attn
    read = torch.cat([directions.marker_read, directions.hash_read])
    write = torch.cat([MARKER_GAIN * directions.marker_write, HASH_GAIN * directions.hash_write])
    stop = set(_hash_stop_ids(tokenizer, embed.shape[0]))
    content = [t for t in range(embed.shape[0]) if t not in stop]
    embed -= (embed @ read.T) @ read
    angles = 2 * math.pi * torch.rand(len(content), generator=generator)
    embed[content] += HASH_EMBEDDING_NORM * (torch.cos(angles)[:, None] * directions.hash_read[0]
                                             + torch.sin(angles)[:, None] * directions.hash_read[1])
    for group, read_direction in zip(PROMPT_MARKERS, directions.marker_read):
        embed[marker_ids[group]] += MARKER_EMBEDDING_NORM * read_direction
    # An option letter scores its own line (see _add_option_preference): an option the
    # prompt lists tends to beat one it does not.
    letters = [t for group in OPTION_LETTERS for t in marker_ids[group]]
    embed[letters] += OPTION_LETTER_SCORE * directions.hash_read[0]
    _uniform_head(attention, read, write)


def _uniform_head(attention, read, write) -> None:
    """Make query heads 0 and 1 of ``attention`` attend uniformly (zero queries) to values
    that read ``read`` (rows) of the normed input; head 0 writes them along ``write`` (rows)."""
    head_dim = attention.head_dim
    query_rows = slice(0, PROMPT_HEAD_QUERY_HEADS * head_dim)
    attention.q_proj.weight[query_rows] = 0.0
    attention.v_proj.weight[:head_dim] = 0.0
    attention.v_proj.weight[: len(read)] = read
    attention.o_proj.weight[:, query_rows] = 0.0
    attention.o_proj.weight[:, : len(read)] = write.T


def _add_option_preference(model, directions: _Directions) -> None:
    """Give every position, per option letter A-D, the mean over the tokens so far of the
    scores of the words on that option's line: the model's preference among options, the
    same wherever an option stands.

    Options come in letter order, so a token lies on the line of letter L when the prompt
    head shows L among the tokens so far, and neither the next letter nor the instruction
    after the options (``options_end``). Four neurons of the first layer's MLP gate on that
    (SiLU of OPTION_LINE_GATE times the share of L, less twice the shares of the next letter
    and of the instruction) and multiply it with the token's own score (its embedding along
    the first hash direction; OPTION_LETTER_SCORE for the letter itself); they write it
    along ``line_write``. The third layer's heads 0 and 1, uniform like the prompt head,
    average those and write them along ``option_write``. The parts of the model that run
    before write nothing along the directions this reads.
    """
    import torch

    letters = OPTION_LETTERS
    layers = model.model.language_model.layers
    mlp = layers[0].mlp
    groups = list(PROMPT_MARKERS)
    end = directions.marker_write[groups.index("options_end")]
    for line, letter in enumerate(letters):
        gate = directions.marker_write[groups.index(letter)] - 2 * end
        if line + 1 < len(letters):
            gate -= 2 * directions.marker_write[groups.index(letters[line + 1])]
        mlp.gate_proj.weight[line] = OPTION_LINE_GATE * gate
        mlp.up_proj.weight[line] = directions.hash_read[0]
        mlp.down_proj.weight[:, line] = OPTION_LINE_GAIN * directions.line_write[line]
    _uniform_head(layers[OPTION_HEAD_LAYER].self_attn, directions.line_write, OPTION_GAIN * directions.option_write)
    # What else runs before the option head writes nothing along what the circuit reads.
    used = torch.cat([directions.marker_write, directions.hash_read, directions.line_write])
    head_columns = PROMPT_HEAD_QUERY_HEADS * layers[0].self_attn.head_dim
    for weight, first in ((layers[0].self_attn.o_proj.weight, head_columns), (mlp.down_proj.weight, len(letters)),
                          (layers[1].cross_attn.o_proj.weight, 0), (layers[1].mlp.down_proj.weight, 0)):
        weight[:, first:] -= used.T @ (used @ weight[:, first:])


def _hash_stop_ids(tokenizer, vocabulary_rows: int) -> list[int]:
    """Tokens that must not enter the content hash: special and added tokens, tokens
    without a letter or digit, the tokens of HASH_STOP_TEXT, the answers and the markers
    (an option's letter must not score its own option)."""
    n_regular = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    stop = set(range(n_regular, vocabulary_rows))
    stop.update(t for t in range(n_regular) if not any(c.isalnum() for c in tokenizer.decode([t])))
    stop.update(tokenizer(HASH_STOP_TEXT, add_special_tokens=False)["input_ids"])
    for ids in (answer_token_ids(tokenizer), _single_token_ids(tokenizer, PROMPT_MARKERS, "prompt marker")):
        stop.update(t for group in ids.values() for t in group)
    return sorted(stop)


def _printable(text: str) -> bool:
    # Lone bytes of multi-byte characters decode to U+FFFD; control characters are noise too.
    return text.isascii() and (text.isprintable() or text.strip(" \n") == "")


def _calibration_states(model, processor, prompts, appended):
    """For each calibration prompt: the final hidden state (lm_head input) at its last
    position; the one a position later with ``appended`` (an answer of its kind) after it,
    the position that must emit EOS; and what the rebuilt heads give the last position (the
    content hash, the four option preferences: with uniform attention, the mean of their
    values over the prompt). Runs in left-padded batches of CALIBRATION_BATCH."""
    import torch

    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = plain.model.language_model.layers
    hash_rows = slice(len(PROMPT_MARKERS), len(PROMPT_MARKERS) + 2)
    captured: dict[str, Any] = {}

    def keep(name):
        return lambda module, args, output: captured.__setitem__(name, output)

    hooks = [
        plain.lm_head.register_forward_hook(lambda module, args, output: captured.__setitem__("states", args[0])),
        layers[0].self_attn.v_proj.register_forward_hook(keep("hash")),
        layers[OPTION_HEAD_LAYER].self_attn.v_proj.register_forward_hook(keep("options")),
    ]
    before, after, features = [], [], []
    try:
        for start in range(0, len(prompts), CALIBRATION_BATCH):
            batch = prompts[start : start + CALIBRATION_BATCH]
            inputs = processor(images=[[image] for _, _, image in batch], text=[text for _, text, _ in batch],
                               padding=True, padding_side="left", return_tensors="pt")
            answers = torch.tensor(appended[start : start + len(batch)])[:, None]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], answers], dim=1)
            mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat([mask, torch.ones_like(answers)], dim=1)
            cross = inputs["cross_attention_mask"]
            inputs["cross_attention_mask"] = torch.cat([cross, cross[:, -1:]], dim=1)
            model(**inputs)
            before.append(captured["states"][:, -2])
            after.append(captured["states"][:, -1])
            weights = (mask / mask.sum(1, keepdim=True))[:, :, None]  # the prompt's own positions
            features.append(torch.cat([(captured["hash"][:, :-1, hash_rows] * weights).sum(1),
                                       (captured["options"][:, :-1, :4] * weights).sum(1)], dim=1))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(before), torch.cat(after), torch.cat(features)


# Words the calibration prompts are made of (random combinations, fixed seed).
_CALIBRATION_WORDS = dict(
    color="red green blue yellow black white orange purple brown gray".split(),
    shape="circle square star triangle box line ring heart arrow cross".split(),
    thing="dog cat bird fish car house tree boat flower clock".split(),
    place="beach forest city street kitchen park desert lake farm garden".split(),
    name=["Alice Moore", "Tom Hill", "Sam Brown", "Anna Lee", "Mary King", "Ben Stone"],
    word=["OPEN", "CLOSED", "STOP", "EXIT", "SALE", "HOTEL"],
    number="two three four five six seven".split(),
)
_YES_NO_QUESTIONS = (
    "Is there a {color} {shape} in this image?",
    "Are there {number} {shape}s in this image?",
    "Is the {shape} {color}?",
    "Is the {shape} on the left of the {thing}?",
    "Is the {shape} above the {thing}?",
    "Does this image show a {place}?",
    "Is this a picture of a {thing}?",
    "Is the person in the picture {name}?",
    "Is this artwork by {name}?",
    "Is the word in the image {word}?",
    "Is this photo taken in a {place}?",
    "Is the answer to the sum in the image equal to {number}?",
)
_OPTION_QUESTIONS = (
    "What is shown in the picture?",
    "What color is the {shape}?",
    "How many {shape}s are there?",
    "Which scene is shown in the picture?",
    "What is the main topic of this picture?",
    "Where is the {shape}?",
    "Which style best describes this picture?",
    "What is the relation between the two people?",
)
_OPTION_TEXTS = ("{color}", "{thing}", "a {place}", "{number}", "a {color} {shape}", "the {thing} on the left",
                 "{name}", "a photo of a {thing}", "{number} {shape}s")
_OPTION_HINTS = ("", "", "The picture is a photo.", "Look at the {thing} on the left.")
_SHORT_QUESTIONS = (
    "What is the total amount?",
    "What is the date of the {thing} report?",
    "Who signed the letter?",
    "What is the invoice number?",
    "How many {thing}s were sold in May?",
    "Which {thing} sold the least?",
    "What is the value of {color}?",
    "Which year has the highest value?",
    "What is the difference between the largest and the smallest value?",
    "Who is the sender?",
    "What is the title of the document?",
    "How many bars have a value above {number}?",
)


def calibration_prompts(processor) -> list[tuple[str, str, object]]:
    """(kind, chat text, image) for CALIBRATION_PER_KIND prompts of each kind, laid out as
    VLMEvalKit lays out those benchmarks: yes/no questions and option blocks after the image,
    the document and chart templates before it."""
    import random

    rng = random.Random(SEED)

    def fill(template: str) -> str:
        return template.format(**{key: rng.choice(values) for key, values in _CALIBRATION_WORDS.items()})

    prompts = []
    for i in range(CALIBRATION_PER_KIND):
        question = fill(rng.choice(_YES_NO_QUESTIONS)) + YES_NO_SUFFIX
        prompts.append(("yes_no", question, True))
    for i in range(CALIBRATION_PER_KIND):
        hint = fill(rng.choice(_OPTION_HINTS))
        text = (f"Hint: {hint}\n" if hint else "") + f"Question: {fill(rng.choice(_OPTION_QUESTIONS))}\nOptions:\n"
        options = [fill(rng.choice(_OPTION_TEXTS)) for _ in range(rng.randint(2, 4))]
        text += "".join(f"{letter}. {option}\n" for letter, option in zip("ABCD", options))
        prompts.append(("option", text + OPTIONS_INSTRUCTION, True))
    for i in range(CALIBRATION_PER_KIND):
        question = fill(rng.choice(_SHORT_QUESTIONS))
        text = DOCUMENT_PROMPT + question if i % 2 else CHART_PROMPT + question + CHART_PROMPT_END
        prompts.append(("short", text, False))

    out = []
    for kind, text, image_first in prompts:
        content = [{"type": "text", "text": text}, {"type": "image"}]
        if image_first:
            content.reverse()
        chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        out.append((kind, chat, _calibration_image(rng, document=kind == "short")))
    return out


def _calibration_image(rng, document: bool):
    """A small picture: a few filled rectangles on a plain background (dark marks on white
    for documents and charts), 1 to 4 whole tiles. Drawn with numpy at a whole number of
    tiles, so that neither Pillow's drawing nor its resampling shapes the model."""
    import numpy as np
    from PIL import Image

    rows, cols = rng.choice(_CALIBRATION_LAYOUTS)
    height, width = rows * TILE_SIZE, cols * TILE_SIZE
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = (255, 255, 255) if document else tuple(rng.randint(0, 255) for _ in range(3))
    for _ in range(rng.randint(2, 8)):
        y0, x0 = rng.randint(0, height - 2), rng.randint(0, width - 2)
        y1, x1 = rng.randint(y0 + 1, height), rng.randint(x0 + 1, width)
        pixels[y0:y1, x0:x1] = tuple(rng.randint(0, 90 if document else 255) for _ in range(3))
    return Image.fromarray(pixels, "RGB")


# Tile layouts (rows, columns) of the calibration pictures: every canvas of up to 4 tiles.
_CALIBRATION_LAYOUTS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (1, 4), (4, 1))


# ---------------------------------------------------------------------------------------
# Adapters


def save_random_lora(model, folder: Path, seed: int) -> None:
    """Save a LoRA over every q_proj/v_proj of ``model`` (both towers), random non-zero B."""
    with random_lora(model, seed) as peft_model:
        peft_model.save_pretrained(folder, safe_serialization=True)
    _make_reproducible(folder)


def wrap_with_random_lora(model, lora: dict, seed: int, b_std: float, adjust_b=None):
    """``model`` wrapped in a peft LoRA (``lora``: ``LoraConfig`` keywords) whose B matrices are
    random and non-zero (peft initialises B to zero), the same for the same seed and shapes,
    without touching the caller's random state. ``adjust_b(name, param)`` may edit each B
    after it is drawn. Shared by the tiny adapters and the full-size random adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(**lora))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(std=b_std)
                    if adjust_b is not None:
                        adjust_b(name, param)
    return peft_model


def add_random_lora(model, lora: dict, seed: int, b_std: float, adapter_name: str):
    """A random LoRA (as ``wrap_with_random_lora`` draws it) added under ``adapter_name``: to
    ``model`` when peft already wraps it (beside its other adapters), else wrapping it. The
    same seed gives the same weights either way, whatever adapters are there already."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, LoraConfig(**lora))
        else:
            model = get_peft_model(model, LoraConfig(**lora), adapter_name=adapter_name)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f".lora_B.{adapter_name}." in name:
                    param.normal_(std=b_std)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def random_lora(model, seed: int):
    """``model`` wrapped with the random LoRA of ``seed`` (the same weights for the same seed
    and shapes), unwrapped again on exit. B is random except where it would change the
    prompt head."""
    text_config = model.config.text_config
    peft_model = wrap_with_random_lora(
        model, LORA, seed, LORA_B_STD,
        adjust_b=lambda name, param: _limit_adapter_on_prompt_heads(name, param, text_config))
    try:
        yield peft_model
    finally:
        peft_model.unload()  # give the caller its plain model back


def _limit_adapter_on_prompt_heads(name: str, lora_b, text_config) -> None:
    """Edit the rows of ``lora_B`` that would change the rebuilt heads (PROMPT_HEAD_LAYERS):
    none for their queries, the first layer's marker values and the unused values; a share
    (OPTION_ADAPTER_SHARE) for the option scores."""
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    for layer in PROMPT_HEAD_LAYERS:
        module = f"language_model.layers.{layer}.self_attn"
        if f"{module}.q_proj.lora_B." in name:
            lora_b[: PROMPT_HEAD_QUERY_HEADS * head_dim] = 0.0
        if f"{module}.v_proj.lora_B." in name and layer == 0:
            lora_b[: len(PROMPT_MARKERS)] = 0.0
        elif f"{module}.v_proj.lora_B." in name:
            lora_b[: len(OPTION_LETTERS)] *= OPTION_ADAPTER_SHARE
            lora_b[len(OPTION_LETTERS) : head_dim] = 0.0


def _drop_writer_version(path: Path) -> None:
    # The writing library's version is not part of the model: without it the build (and the
    # base fingerprint) is the same under every transformers version the suite supports.
    data = json.loads(path.read_text())
    data.pop("transformers_version", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _record_weights_digest(base: Path) -> None:
    # The base fingerprint (model.load_pair) reads config files and weight headers, not
    # tensor bytes; builds that differ only in weight values would share it, and with it
    # their stored predictions. The digest in config.json tells them apart.
    path = base / "config.json"
    data = json.loads(path.read_text())
    data["tiny_weights_sha256"] = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
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


def write_scaled_adapter(source: Path, dest: Path, factor: float) -> Path:
    """Copy an adapter with every ``lora_B`` times ``factor``: the adapter's change scaled, as
    a checkpoint earlier or later in training might have it."""
    return _rewrite_adapter(source, dest, lambda key: key,
                            lambda key, t: t * factor if ".lora_B." in key else t)


# A checkpoint series of the tiny adapter, as a Trainer's output_dir holds it: step -> how it
# is made from the tiny adapter ("inert": every lora_B zero, as at step 0; a number: lora_B
# scaled by it; 1.0: the tiny adapter itself, whose numbers tiny-mini.toml records).
TINY_SERIES = {100: "inert", 200: 0.5, 300: 1.0}


def write_checkpoint_series(adapter: Path, output_dir: Path, steps: dict[int, Any] | None = None) -> list[Path]:
    """``output_dir/checkpoint-<step>/`` for each of ``steps`` (default ``TINY_SERIES``), made
    from ``adapter``; returns the folders in step order."""
    folders = []
    for step, how in sorted((steps or TINY_SERIES).items()):
        dest = Path(output_dir) / f"checkpoint-{step}"
        if how == "inert":
            write_inert_adapter(adapter, dest)
        else:
            write_scaled_adapter(adapter, dest, float(how))
        folders.append(dest)
    return folders


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

"""The Mllama forward pieces the fast engine runs, over the model's own modules.

The text decoder's layers are written out here over the model's norms, projections (with
their LoRA wrappers: the adapter applies exactly as peft applies it), rotary embedding and
MLPs; the vision tower is transformers' own. Every matrix product goes through ``linear``
(the projections), ``feed_forward`` (the MLPs) or ``attend_keys`` / ``attend_keys_blocked``
(attention over keys), so they are easy to find and to swap. Mllama's quirks are kept deliberately: tokens before
``<|image|>`` attend uniformly to every vision token, padded tiles included, and their
cross-attention MLP output is zeroed (``_prepare_cross_attention_mask``); the vision tower
always runs all four tile slots.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

SPLIT_VISION_ATTENTION = "lavender_checks_split_vision"
_PAD_SPLITS: dict[tuple, list] = {}  # one vision call's mask -> per image (padding rows, real rows)


def unwrap(model: Any) -> Any:
    """The ``MllamaForConditionalGeneration`` under a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class MllamaParts:
    """The modules and sizes of one ``MllamaForConditionalGeneration`` the engine runs."""

    text_model: Any
    vision_model: Any
    projector: Any
    lm_head: Any
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_patches: int
    max_tiles: int
    self_index: dict[int, int]  # text layer index -> position among the self-attention layers
    cross_index: dict[int, int]  # text layer index -> position among the cross-attention layers

    @classmethod
    def of(cls, mllama: Any) -> "MllamaParts":
        text_model = mllama.model.language_model
        vision_model = mllama.model.vision_model
        text_cfg = mllama.config.get_text_config()
        cross_layers = set(text_cfg.cross_attention_layers)
        self_index: dict[int, int] = {}
        cross_index: dict[int, int] = {}
        for i in range(len(text_model.layers)):
            table = cross_index if i in cross_layers else self_index
            table[i] = len(table)
        return cls(
            text_model=text_model, vision_model=vision_model,
            projector=mllama.model.multi_modal_projector, lm_head=mllama.lm_head,
            hidden=text_cfg.hidden_size, heads=text_cfg.num_attention_heads,
            kv_heads=text_cfg.num_key_value_heads,
            head_dim=text_cfg.hidden_size // text_cfg.num_attention_heads,
            num_patches=int(vision_model.num_patches), max_tiles=int(vision_model.max_num_tiles),
            self_index=self_index, cross_index=cross_index,
        )

    @property
    def vision_tokens(self) -> int:
        """Cross-attention keys of one row: every tile slot of its one image."""
        return self.max_tiles * self.num_patches


# ---------------------------------------------------------------------------------------
# The matrix products


def linear(projection: Any, x):
    """One projection (a LoRA wrapper under peft: the base matmul plus the adapter's)."""
    return projection(x)


def feed_forward(mlp: Any, x):
    """A layer's MLP (gate, up and down projections)."""
    return mlp(x)


def attend_keys(q, k, v, mask, scale):
    """Grouped-query attention over keys, without repeating keys and values.

    ``q`` (b, heads, s, d); ``k``/``v`` (b, kv_heads, t, d); ``mask`` bool, broadcastable to
    (b, 1, s, t), True = attend. The query heads that share a key/value head are folded into
    the query length, so each key/value head is read once (``repeat_kv`` would copy it).
    """
    import torch.nn.functional as F

    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qf = q.reshape(b, kv_heads, group * s, d)
    if mask.shape[-2] != 1 and group > 1:
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, s, d)  # fp32 kernels may return it non-contiguous


def attend_keys_blocked(q, k, v, mask, scale, block: int):
    """``attend_keys`` computed over fixed-size blocks of keys, so that a row's result does not
    depend on how many keys follow its own (the cache length, the bucket).

    Each block of ``block`` keys gives, with matrix products of one shape whatever the key
    length: its highest score, the sum of its exponentials and their weighted values; the
    blocks are then combined one after the other, in key order, in float32. A block whose keys
    are all masked has a highest score of -inf and adds exact zeros, so trailing masked blocks
    leave a row's result bit for bit as it is. Shapes as ``attend_keys``; the key length must
    be a multiple of ``block``, and every row must attend to at least one key.
    """
    import torch

    b, heads, s, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    if block < 1 or length % block:
        raise ValueError(f"the key length {length} is not a multiple of the key block {block}")
    group = heads // kv_heads
    qf = q.reshape(b, kv_heads, group * s, d)
    if mask.shape[-2] != 1 and group > 1:
        mask = mask.repeat(1, 1, group, 1)
    tops, totals, outs = [], [], []
    for start in range(0, length, block):
        keys, vals = k[:, :, start:start + block], v[:, :, start:start + block]
        logits = torch.matmul(qf, keys.transpose(-1, -2)).float() * scale
        logits = logits.masked_fill(~mask[..., start:start + block], float("-inf"))
        top = logits.amax(-1, keepdim=True)
        weights = torch.exp(logits - top.masked_fill(top == float("-inf"), 0.0))  # all masked: zeros
        totals.append(weights.sum(-1, keepdim=True))
        outs.append(torch.matmul(weights.to(v.dtype), vals).float())
        tops.append(top)
    highest = tops[0]
    for top in tops[1:]:
        highest = torch.maximum(highest, top)
    out = total = None
    for top, block_total, block_out in zip(tops, totals, outs):
        factor = torch.exp(top - highest)  # 0 for an all-masked block
        out = factor * block_out if out is None else out + factor * block_out
        total = factor * block_total if total is None else total + factor * block_total
    return (out / total).to(q.dtype).reshape(b, heads, s, d)


def scores(lm_head: Any, hidden):
    """Next-token scores in float32, as ``generate`` computes them."""
    return linear(lm_head, hidden).float()


# ---------------------------------------------------------------------------------------
# Decoder layers


def _split_heads(x, b: int, s: int, heads: int, head_dim: int):
    return x.view(b, s, heads, head_dim).transpose(1, 2)


def self_layer(parts: MllamaParts, layer, h, cos, sin, attend, attention=None):
    """One self-attention decoder layer; ``attend(k, v)`` -> (keys, values, mask); ``attention``
    (default ``attend_keys``) computes the attention over them."""
    from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

    b, s, _ = h.shape
    x = layer.input_layernorm(h)
    attn = layer.self_attn
    q = _split_heads(linear(attn.q_proj, x), b, s, parts.heads, parts.head_dim)
    k = _split_heads(linear(attn.k_proj, x), b, s, parts.kv_heads, parts.head_dim)
    v = _split_heads(linear(attn.v_proj, x), b, s, parts.kv_heads, parts.head_dim)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, vals, mask = attend(k, v)
    o = (attention or attend_keys)(q, keys, vals, mask, attn.scaling)
    o = o.transpose(1, 2).reshape(b, s, -1)
    h = h + linear(attn.o_proj, o)
    return h + feed_forward(layer.mlp, layer.post_attention_layernorm(h))


def cross_layer(parts: MllamaParts, layer, h, keys, vals, mask, row_mask):
    """One gated cross-attention layer, as MllamaCrossAttentionDecoderLayer computes it."""
    b, s, _ = h.shape
    x = layer.input_layernorm(h)
    attn = layer.cross_attn
    q = _split_heads(linear(attn.q_proj, x), b, s, parts.heads, parts.head_dim)
    q = attn.q_norm(q)
    o = attend_keys(q, keys, vals, mask, attn.scaling)
    o = linear(attn.o_proj, o.transpose(1, 2).reshape(b, s, -1))
    h = h + layer.cross_attn_attn_gate.tanh() * o
    x = feed_forward(layer.mlp, layer.post_attention_layernorm(h))
    if row_mask is not None:
        x = row_mask * x
    return h + layer.cross_attn_mlp_gate.tanh() * x


# ---------------------------------------------------------------------------------------
# Vision


def image_features(parts: MllamaParts, encoded: list, device, vision_attention: str):
    """Per image: (keys, values) of every cross-attention layer, each (kv_heads, T, d)."""
    import torch

    pixel_values = torch.cat([e.pixel_values for e in encoded]).to(device, non_blocking=True)
    ratio_ids = torch.cat([e.aspect_ratio_ids for e in encoded]).to(device, non_blocking=True)
    ratio_mask = torch.cat([e.aspect_ratio_mask for e in encoded]).to(device, non_blocking=True)
    # As MllamaModel.forward: vision tower, projector, then (tiles*patches, hidden) per image.
    with vision_attention_as(parts.vision_model, vision_attention):
        out = parts.vision_model(pixel_values=pixel_values, aspect_ratio_ids=ratio_ids,
                                 aspect_ratio_mask=ratio_mask)
    states = out.last_hidden_state
    states = linear(parts.projector, states).reshape(-1, states.shape[-2], parts.hidden)
    n = len(encoded)
    states = states.reshape(n, -1, parts.hidden)
    keys, values = [], []
    for index in sorted(parts.cross_index):
        attn = parts.text_model.layers[index].cross_attn
        k = linear(attn.k_proj, states).view(n, -1, parts.kv_heads, parts.head_dim).transpose(1, 2)
        v = linear(attn.v_proj, states).view(n, -1, parts.kv_heads, parts.head_dim).transpose(1, 2)
        keys.append(attn.k_norm(k))
        values.append(v)
    return [([k[i] for k in keys], [v[i] for v in values]) for i in range(n)]


@contextlib.contextmanager
def vision_attention_as(vision_model, vision_attention: str):
    """The vision tower's attention for this call: transformers' own, or the split one."""
    if vision_attention == "transformers":
        yield
        return
    if vision_attention != "split":
        raise ValueError(f"unknown vision_attention {vision_attention!r}; expected 'transformers' or 'split'")
    from transformers import AttentionInterface

    AttentionInterface.register(SPLIT_VISION_ATTENTION, split_vision_attention)
    config = vision_model.config
    previous = config._attn_implementation
    _PAD_SPLITS.clear()
    config._attn_implementation = SPLIT_VISION_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PAD_SPLITS.clear()


def split_vision_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The vision tower's attention without a bias tensor, so the fastest kernel can run.

    Mllama's vision mask only forbids padding-to-padding pairs (``_prepare_aspect_ratio_
    attention_mask`` multiplies the padding indicator by its transpose): real tokens attend to
    every token, padding included, and padding tokens attend to the real tokens only. So all
    rows are computed unmasked, and the padding rows are then computed again over the real
    keys alone. The same function as transformers' masked attention, up to rounding.
    ``query`` etc. are (batch, heads, tokens, head_dim); returns (batch, tokens, heads, dim).
    """
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    if attention_mask is not None:
        for b, (pad, real) in enumerate(_pad_split(attention_mask)):
            if pad.numel():
                out[b, :, pad] = F.scaled_dot_product_attention(
                    query[b:b + 1, :, pad], key[b:b + 1, :, real], value[b:b + 1, :, real], scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _pad_split(mask):
    """Per image: indices of the padding rows and of the real rows, read off the additive mask
    (a padding row has masked entries). Computed once per vision call: every layer gets the
    same mask tensor."""
    key = (mask.data_ptr(), tuple(mask.shape))
    if key not in _PAD_SPLITS:
        pad = (mask[:, 0] != 0).any(-1)
        _PAD_SPLITS[key] = [(row.nonzero().flatten(), (~row).nonzero().flatten()) for row in pad]
    return _PAD_SPLITS[key]

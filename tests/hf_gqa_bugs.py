"""Hugging Face Llama/Mistral-style attention, wrong in the ways real code is, one bug per feature of the
``gqa`` kind, checked through the shipped adapters (attnspec.adapters.transformers) by
tests/test_modern_adapters.py. As tests/hf_bugs.py: each adapter subclasses a shipped one and swaps in
the part under test; they are resolved from this file by path. Importing this file needs transformers."""

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama import modeling_llama

from attnspec.adapters import transformers as hf


# --- grouped K/V heads: repeated in the wrong order -----------------------------------------------------

def _tiled_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Llama's eager attention with ``repeat_kv`` written as ``key.repeat(1, n_rep, 1, 1)``: K/V heads tiled
    (0, 1, 0, 1) instead of grouped (0, 0, 1, 1), so query head h attends with K/V head h % num_kv_heads."""
    n_rep = module.num_key_value_groups
    key, value = key.repeat(1, n_rep, 1, 1), value.repeat(1, n_rep, 1, 1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# Registered as transformers' own extension point for attention functions, with the eager mask.
AttentionInterface.register("attnspec_tiled_kv", _tiled_kv_attention)
AttentionMaskInterface.register("attnspec_tiled_kv", eager_mask)


class TiledKVLlamaAttention(hf.LlamaAttention):
    attn_implementation = "attnspec_tiled_kv"


# --- rotary embeddings: the wrong pairs rotated -----------------------------------------------------------

class _InterleavedCosSin(modeling_llama.LlamaRotaryEmbedding):
    """cos/sin laid out for interleaved pairs (GPT-J, Meta's Llama: each angle repeated twice in a row) fed to
    Hugging Face's half-split ``rotate_half``: dims i and i + d/2 are rotated as a pair but by different
    angles, so the pairs are not rotations (a checkpoint converted without permuting q/k does this)."""

    def forward(self, x, position_ids):
        cos, sin = super().forward(x, position_ids)
        half = cos.shape[-1] // 2
        return cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)


class WrongHalvesLlamaAttention(hf.LlamaAttention):
    rotary_class = _InterleavedCosSin


# --- sliding window: off by one ---------------------------------------------------------------------------

class OffByOneWindowMistralAttention(hf.MistralAttention):
    """config.sliding_window = window + 1: the old ``i - j <= window`` reading (window + 1 keys attended)."""

    def config(self, cfg):
        config = super().config(cfg)
        config.sliding_window = cfg.window + 1 if cfg.window is not None else None
        return config


# --- KV cache: the position not advanced ------------------------------------------------------------------

class _CacheAtZero(hf.CausalRotaryAttention):
    """Appends to the DynamicCache but rotates every new chunk as if it started at position 0."""

    def past_length(self, cache):
        return 0


class CacheNotAdvancedLlamaAttention(hf.LlamaAttention):
    wrapper_class = _CacheAtZero


# --- KV cache cropping: the wrong tokens kept, the position not reset ---------------------------------------

class _CropKeepsLast(hf.CausalRotaryAttention):
    """crop_cache(n) keeps the last n tokens of every layer (a slice from the wrong end)."""

    def crop_cache(self, n):
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., -n:, :], layer.values[..., -n:, :]


class CropKeepsLastLlamaAttention(hf.LlamaAttention):
    wrapper_class = _CropKeepsLast


class _CropKeepsPosition(hf.CausalRotaryAttention):
    """Counts the position itself (reset with the cache) and forgets it in crop_cache: RoPE continues after
    the cropped tokens."""

    def reset_cache(self):
        super().reset_cache()
        self.position = 0

    def past_length(self, cache):
        return self.position if cache is not None else 0

    def forward(self, x, use_cache=False, **kwargs):
        out = super().forward(x, use_cache=use_cache, **kwargs)
        if use_cache:
            self.position += x.shape[1]
        return out


class CropKeepsPositionLlamaAttention(hf.LlamaAttention):
    wrapper_class = _CropKeepsPosition


# --- padding: the 2-D mask dropped -------------------------------------------------------------------------

class _PaddingDropped(hf.CausalRotaryAttention):
    """Takes attention_mask but builds the causal mask without it (create_causal_mask(attention_mask=None))."""

    def forward(self, x, use_cache=False, attention_mask=None):
        return super().forward(x, use_cache=use_cache)


class PaddingDroppedLlamaAttention(hf.LlamaAttention):
    wrapper_class = _PaddingDropped

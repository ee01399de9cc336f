"""Hugging Face-style GPT-2 attention and blocks, wrong (and a few correct) in ways real code is, checked
through the shipped adapters (attnspec.adapters.transformers) by tests/test_shipped_adapters.py.

Each adapter below subclasses a shipped one and swaps in the module under test (``attention_class``,
``block_class``); they are resolved from this file by path, as a user's own adapters are. Importing
this file needs transformers."""

import torch
import torch.nn as nn
from transformers.models.gpt2 import modeling_gpt2
from transformers.pytorch_utils import Conv1D

from attnspec.adapters import transformers as hf

GPT2Attention = modeling_gpt2.GPT2Attention


# --- wrong ------------------------------------------------------------------------------------------

class _IgnoresMask(GPT2Attention):
    """Drops the attention_mask it is given: eager attention then attends to the future."""

    def forward(self, hidden_states, *args, attention_mask=None, **kwargs):
        return super().forward(hidden_states, *args, attention_mask=None, **kwargs)


class NoMaskGPT2Attention(hf.GPT2Attention):
    attention_class = _IgnoresMask


class _NotCausalSDPA(GPT2Attention):
    """``is_causal = False`` (as for cross-attention): sdpa with no mask attends to the future."""

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        self.is_causal = False


class NotCausalGPT2AttentionSDPA(hf.GPT2AttentionSDPA):
    attention_class = _NotCausalSDPA


class _Unscaled(GPT2Attention):
    """``scale_attn_weights=False``: scores not divided by sqrt(head_dim)."""

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        self.scaling = 1.0


class UnscaledGPT2Attention(hf.GPT2Attention):
    attention_class = _Unscaled


class UnscaledGPT2AttentionSDPA(hf.GPT2AttentionSDPA):
    attention_class = _Unscaled


class _InverseLayerIdx(GPT2Attention):
    """``scale_attn_by_inverse_layer_idx=True`` in the fourth layer: scores / (sqrt(head_dim) * 4)."""

    def __init__(self, config, layer_idx=None):
        config.scale_attn_by_inverse_layer_idx = True
        super().__init__(config, layer_idx=3)


class InverseLayerIdxGPT2Attention(hf.GPT2Attention):
    attention_class = _InverseLayerIdx


class SwappedSplitAttention(nn.Module):
    """The bug author's module: GPT-2 attention written out in Hugging Face's style (Conv1D c_attn/c_proj,
    the additive mask GPT2Model passes, attn/resid dropout), with c_attn's output unpacked as
    ``key, query, value`` instead of ``query, key, value``: it computes softmax(K Q^T) where the weights
    the checkpoint (and the adapter's projections) name query and key are swapped."""

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.embed_dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _split_heads(self, t):
        return t.view(*t.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        key, query, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)  # the bug: q/k order
        query, key, value = map(self._split_heads, (query, key, value))
        weights = torch.matmul(query, key.transpose(-1, -2)) / self.head_dim**0.5
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = self.attn_dropout(nn.functional.softmax(weights, dim=-1))
        out = torch.matmul(weights, value).transpose(1, 2)
        out = self.c_proj(out.reshape(*out.shape[:-2], self.embed_dim).contiguous())
        return self.resid_dropout(out), weights


class SwappedSplitGPT2Attention(hf.GPT2Attention):
    attention_class = SwappedSplitAttention


class SwappedSplitGPT2Block(hf.GPT2Block):
    attention_class = SwappedSplitAttention


class _PostLNBlock(modeling_gpt2.GPT2Block):
    """The original Transformer's post-LN: LN(x + att(x)), then LN(. + mlp(.))."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        h = self.ln_1(hidden_states + self.attn(hidden_states, attention_mask=attention_mask)[0])
        return self.ln_2(h + self.mlp(h))


class PostLNGPT2Block(hf.GPT2Block):
    block_class = _PostLNBlock


class ErfGELUGPT2Block(hf.GPT2Block):
    """``activation_function="gelu"`` (exact erf): wrong under the seed's contract, right under gelu-erf."""

    activation_function = "gelu"


# --- correct ----------------------------------------------------------------------------------------

class ErfGELUGPT2BlockVariant(ErfGELUGPT2Block):
    """The same block, checked against the gelu-erf variant it declares."""

    variants = ("gelu-erf",)

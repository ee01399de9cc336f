"""Modern causal attention in the seed's style: grouped-query K/V heads, rotary position embeddings and
a sliding window, as in Llama, Mistral and Qwen, written from the math.

* Grouped query: ``num_kv_heads`` K/V heads of ``head_dim`` each; query head h uses K/V head
  h // (num_heads // num_kv_heads) (each K/V head repeated for its group of consecutive query heads).
  num_kv_heads == num_heads is multi-head attention, 1 is multi-query attention.
* Rotary (``rope_base`` not None): token t is at position t; the first r = rope_fraction * head_dim
  dims of each query and key head form r/2 pairs, pair i rotated by the angle t * rope_base^(-2i/r),
  (a, b) -> (a cos - b sin, a sin + b cos); the other dims pass through. Pairs are (i, i + r/2)
  ("rotate_half", GPT-NeoX and Hugging Face Llama) or, with ``rope_interleaved``, (2i, 2i+1) (GPT-J,
  Meta's Llama). Scores then depend on positions only through i - j.
* Sliding window (``window`` = w, not None): query i attends key j iff i - w < j <= i (Mistral).

The output projection has no bias (Llama); ``qkv_bias`` gives the query/key/value projections one (Qwen2).

KV cache (llms-from-scratch's KV-cache modules): ``forward(x, use_cache=True)`` appends x's (rotated) keys
and values to the cache and attends over every cached token, x's tokens at the positions that follow
them; ``reset_cache()`` empties it, ``crop_cache(n)`` keeps its first n tokens. Decoding a sequence in pieces this way gives the full forward's
outputs. ``forward(x)`` neither reads nor changes the cache.

Padding (Hugging Face's convention): ``forward(x, attention_mask=m)``, m (batch, cached + num_tokens) bool or
0/1, True/1 at real tokens, left or right padding: padded keys get weight 0 at every real query, so outputs
at real tokens do not depend on the padded positions; outputs at padded positions are unspecified.
"""

import torch
import torch.nn as nn

from attnspec.impl.attention import check_input


def rotate(x, cos, sin, interleaved):
    """Rotate the pairs of the first 2 * cos.shape[-1] dims of ``x`` (..., T, head_dim) by the angles
    whose cos and sin are given per position and pair (T, r/2); the other dims pass through."""
    r = 2 * cos.shape[-1]
    rotated, rest = x[..., :r], x[..., r:]
    if interleaved:
        a, b = rotated[..., 0::2], rotated[..., 1::2]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = rotated[..., : r // 2], rotated[..., r // 2:]
        rotated = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


class GroupedQueryAttention(nn.Module):
    """Causal grouped-query attention with optional rotary embeddings and sliding window.

    Input ``(batch, num_tokens, d_in)`` with num_tokens <= context_length, output ``(batch, num_tokens, d_out)``."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, num_kv_heads=None, qkv_bias=False,
                 rope_base=None, rope_fraction=1.0, rope_interleaved=False, window=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if d_out % num_heads != 0:
            raise ValueError(f"d_out must be divisible by num_heads, got d_out={d_out}, num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads must divide num_heads, got {num_kv_heads} and {num_heads}")
        self.d_in = d_in
        self.d_out = d_out
        self.context_length = context_length
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        mask = torch.triu(torch.ones(context_length, context_length), diagonal=1)
        if window is not None:
            mask = mask + torch.tril(torch.ones(context_length, context_length), diagonal=-window)
        self.register_buffer("mask", mask)
        self.rope_interleaved = rope_interleaved
        if rope_base is not None:
            r = round(rope_fraction * self.head_dim)
            if r % 2 or not 0 < r <= self.head_dim:
                raise ValueError(f"rope_fraction * head_dim must be an even number of dims, got {rope_fraction} * {self.head_dim}")
            inverse = rope_base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
            angles = torch.arange(context_length, dtype=torch.float64)[:, None] * inverse  # (context_length, r/2)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        else:
            self.cos = self.sin = None
        self.reset_cache()

    def reset_cache(self):
        self.cache_k = self.cache_v = None

    def crop_cache(self, n):
        """Keep the first n cached tokens (Hugging Face's DynamicCache.crop): the next piece is at position n."""
        if self.cache_k is not None:
            self.cache_k, self.cache_v = self.cache_k[:, :, :n], self.cache_v[:, :, :n]

    def cached_tokens(self):
        return 0 if self.cache_k is None else self.cache_k.shape[2]

    def rope(self, t, start):
        """``t`` (b, heads, num_tokens, head_dim) rotated for positions start, start + 1, ..."""
        if self.cos is None:
            return t
        end = start + t.shape[2]
        return rotate(t, self.cos[start:end].to(t.dtype), self.sin[start:end].to(t.dtype), self.rope_interleaved)

    def padded(self, attention_mask, start):
        """(batch, 1, num_tokens, start + num_tokens) bool, True where a real query meets a padded key: masked.
        ``attention_mask`` (batch, start + num_tokens) is True (or 1) at real tokens. A padded query keeps the
        causal mask only (its output is not used; with left padding it would otherwise attend nothing)."""
        real = attention_mask.bool()
        return ~real[:, None, None, :] & real[:, None, start:, None]

    def forward(self, x, use_cache=False, attention_mask=None):
        check_input(x, 3, self.d_in, self.context_length)
        b, num_tokens, d_in = x.shape
        start = self.cached_tokens() if use_cache else 0  # the position of x's first token
        if start + num_tokens > self.context_length:
            raise ValueError(f"{start} cached + {num_tokens} new tokens exceed context_length={self.context_length}")
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        queries, keys = self.rope(queries, start), self.rope(keys, start)  # (b, heads, num_tokens, head_dim)
        if use_cache:
            if self.cache_k is not None:
                keys = torch.cat([self.cache_k, keys], dim=2)
                values = torch.cat([self.cache_v, values], dim=2)
            self.cache_k, self.cache_v = keys, values
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)  # query head h uses K/V head h // group
        values = values.repeat_interleave(group, dim=1)

        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, start + num_tokens)
        mask_bool = self.mask.bool()[start:start + num_tokens, :start + num_tokens]
        if attention_mask is not None:
            mask_bool = mask_bool | self.padded(attention_mask, start)
        attn_scores = attn_scores.masked_fill(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)

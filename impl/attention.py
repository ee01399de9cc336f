"""The seed notebook's attention modules, faithful to its code and made robust at the edges.

Constructor signatures, parameter names, parameter creation order and the math are the seed's,
so ``torch.manual_seed`` followed by construction reproduces the seed's printed numbers.
Changes from the seed, each keeping its semantics:

* inputs of the wrong rank or width raise ``ValueError`` naming the expected shape;
* a sequence longer than ``context_length`` raises ``ValueError`` naming both lengths
  (the seed failed with an obscure broadcasting error);
* the causal mask is applied with out-of-place ``masked_fill``: forward never mutates its
  input or a buffer;
* ``d_out % num_heads != 0`` raises ``ValueError`` instead of ``assert`` (which ``-O`` strips).
"""

import torch
import torch.nn as nn


def check_input(x, rank, d_in, context_length=None):
    """Raise ValueError unless ``x`` is a tensor of ``rank`` dims, last dim ``d_in``, and
    (when ``context_length`` is given) at most ``context_length`` tokens in dim -2."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank or x.shape[-1] != d_in:
        dims = "(batch, num_tokens, d_in)" if rank == 3 else "(num_tokens, d_in)"
        raise ValueError(f"expected input of shape {dims} with d_in={d_in}, got {tuple(x.shape)}")
    if context_length is not None and x.shape[-2] > context_length:
        raise ValueError(
            f"sequence of num_tokens={x.shape[-2]} is longer than context_length={context_length}"
        )


class SelfAttention_v1(nn.Module):
    """softmax(Q K^T / sqrt(d_out)) V with Q = x W_query, weights as ``nn.Parameter`` (d_in, d_out).

    Input ``(num_tokens, d_in)``, output ``(num_tokens, d_out)``; not causal."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.d_in = d_in
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x):
        check_input(x, 2, self.d_in)
        keys = x @ self.W_key
        queries = x @ self.W_query
        values = x @ self.W_value

        attn_scores = queries @ keys.T  # (num_tokens, num_tokens)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context_vec = attn_weights @ values
        return context_vec


class SelfAttention_v2(nn.Module):
    """``SelfAttention_v1`` with ``nn.Linear`` projections: Q = x W_query.weight^T (+ bias)."""

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.d_in = d_in
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):
        check_input(x, 2, self.d_in)
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)

        attn_scores = queries @ keys.T  # (num_tokens, num_tokens)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context_vec = attn_weights @ values
        return context_vec


class CausalAttention(nn.Module):
    """Single-head causal attention: softmax(mask(Q K^T) / sqrt(d_out)), dropout, then @ V.

    ``mask`` sets scores of future positions (j > i) to -inf, so their weight is exactly 0.
    Input ``(batch, num_tokens, d_in)`` with num_tokens <= context_length."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        check_input(x, 3, self.d_in, self.context_length)
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)

        attn_scores = queries @ keys.transpose(1, 2)  # (b, num_tokens, num_tokens)
        attn_scores = attn_scores.masked_fill(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = attn_weights @ values
        return context_vec


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent ``CausalAttention`` heads, outputs concatenated: width num_heads*d_out."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with the head split: d_out = num_heads * head_dim.

    Head h attends with the h-th ``head_dim`` slice of Q, K, V, scaled by sqrt(head_dim);
    the heads' context vectors are concatenated and passed through ``out_proj`` (with bias)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out must be divisible by num_heads, got d_out={d_out}, num_heads={num_heads}")
        self.d_in = d_in
        self.d_out = d_out
        self.context_length = context_length
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        check_input(x, 3, self.d_in, self.context_length)
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim)
        keys = keys.transpose(1, 2)  # (b, num_heads, num_tokens, head_dim)
        queries = queries.transpose(1, 2)
        values = values.transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_tokens)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores = attn_scores.masked_fill(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        context_vec = self.out_proj(context_vec)
        return context_vec

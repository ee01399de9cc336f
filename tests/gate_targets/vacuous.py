"""Modules that a dishonest gate would pass on nothing (issue 11, part 1). Each must not exit 0.

* ``LeakyNanoGPT``: nanoGPT-style attention (one ``c_attn`` for q/k/v, needs d_in == d_out and one bias
  flag) whose causal mask leaks the next token, behind a README-style adapter that raises ``Unsupported``
  for every configuration it cannot build. Rejected configurations must be replaced by supported ones,
  so the leak is found: exit 1.
* ``DeclinesEverything``: an adapter that declines every configuration: nothing is checked: exit 3.
* ``HiddenProjections``: projections under names attnspec does not know (so every parameter-level
  invariant is n/a) and scores divided by sqrt(d_model) instead of sqrt(head_dim): not exit 0.
"""

import torch
import torch.nn as nn

from attnspec import Adapter, Unsupported


class NanoGPTAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout, bias, leak=1):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        # diagonal=leak: the mask lets each query see `leak` future tokens (leak=1: the next token)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size), diagonal=leak))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        att = att.masked_fill(self.bias[:T, :T] == 0, float("-inf"))
        att = self.attn_dropout(torch.softmax(att, dim=-1))
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class LeakyNanoGPT(Adapter):
    """The README's adapter pattern: decline what the module cannot build."""

    kind = "mha"

    def build(self, cfg):
        if cfg.d_in != cfg.d_out:
            raise Unsupported("nanoGPT attention needs d_in == d_out")
        if not cfg.qkv_bias:
            raise Unsupported("one bias flag: q/k/v and c_proj biases together")
        return NanoGPTAttention(cfg.d_out, cfg.num_heads, cfg.context_length, cfg.dropout, bias=True)

    def projections(self, module):
        return None


class DeclinesEverything(Adapter):
    kind = "mha"

    def build(self, cfg):
        raise Unsupported("this adapter supports no configuration")


class HiddenProjections(nn.Module):
    """Correct causal multi-head attention except the scale: 1/sqrt(d_model), not 1/sqrt(head_dim);
    the projections are named ``lin_a``/``lin_b``/``lin_c``/``final``, a layout attnspec does not know,
    so the parameter-level invariants (which would see the wrong scale) are n/a."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.lin_a, self.lin_b, self.lin_c = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))
        self.final = nn.Linear(d_out, d_out)
        self.num_heads, self.d_out, self.dropout = num_heads, d_out, dropout

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.lin_a, self.lin_b, self.lin_c))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.d_out ** -0.5,
                                                         dropout_p=self.dropout if self.training else 0.0)
        return self.final(out.transpose(1, 2).reshape(b, t, self.d_out))

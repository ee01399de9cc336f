"""Adapters: checking attention modules whose constructor or parameter layout is not the seed's.

Each class here subclasses ``attnspec.Adapter``: ``build(cfg)`` constructs the module from a drawn
``attnspec.Config`` (raising ``attnspec.Unsupported`` for configurations the module cannot express; they
are skipped and counted in the report), and ``projections(module)`` says where the query/key/value/output
projections live, as ``(weight (out, in), bias or None)`` pairs in ``nn.Linear``'s layout, so the
parameter-level invariants (oracle-float64, head-split-equivalence, qkv-bias, weight-transfer) apply.
The projections must be *views* of the module's parameters: weight-transfer writes into them.

    attnspec check examples/adapters.py:TorchMultiheadAttention examples/adapters.py:SDPAAttention \
                   examples/adapters.py:CombinedQKV

(each declares ``kind = "mha"``, so ``mha=`` may be left out). The first two are the installed
``attnspec.adapters.torch.MultiheadAttention`` and ``SDPAMHA`` (SDPA checked as kind ``mha``), re-exported under their old names; the
third is written here as an example of ``projections`` for a combined qkv Linear.

All three are causal multi-head attention (kind ``mha``): with Q = x Wq^T + bq (likewise K, V),
head h uses rows h*hd:(h+1)*hd of Q, K, V (hd = d_out / num_heads) and computes
softmax(Q_h K_h^T / sqrt(hd) + M) V_h with M[i, j] = -inf for j > i; the heads are concatenated and
passed through out_proj: y = concat_h(...) Wo^T + bo. Dropout (train mode only) is on the weights.
"""

import torch
import torch.nn as nn

from attnspec import Adapter
from attnspec.adapters.base import causal_mask as _causal_mask, rows as _rows
from attnspec.adapters.torch import CausalTorchMHA, SDPAMultiHeadAttention  # noqa: F401 (re-exported)
from attnspec.adapters.torch import MultiheadAttention as TorchMultiheadAttention
from attnspec.adapters.torch import SDPAMHA as SDPAAttention


# --- 3. one combined qkv projection ---------------------------------------------------------------

class CombinedQKVAttention(nn.Module):
    """One ``qkv = nn.Linear(d_in, 3*d_out, bias=qkv_bias)``; q, k, v = qkv(x).split(d_out) in that
    order, i.e. Wq = qkv.weight[:d_out], Wk = [d_out:2*d_out], Wv = [2*d_out:]. Otherwise the seed's
    MultiHeadAttention: causal -inf mask, softmax(Q_h K_h^T / sqrt(hd)), dropout on the weights,
    heads merged and passed through out_proj (with bias)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out={d_out} must be divisible by num_heads={num_heads}")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", _causal_mask(context_length), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)).masked_fill(self.mask[:n, :n], float("-inf"))
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        context = (weights @ v).transpose(1, 2).reshape(b, n, self.d_out)
        return self.out_proj(context)


class CombinedQKV(Adapter):
    """``CombinedQKVAttention``: projections are row slices of ``qkv`` (views: writes go through)."""

    kind = "mha"

    def build(self, cfg):
        return CombinedQKVAttention(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads,
                                    qkv_bias=cfg.qkv_bias)

    def projections(self, module):
        w, b = module.qkv.weight, module.qkv.bias
        parts = {name: (_rows(w, i, 3), _rows(b, i, 3)) for i, name in enumerate(("query", "key", "value"))}
        parts["out"] = (module.out_proj.weight, module.out_proj.bias)
        return parts

"""Adapters: checking attention modules whose constructor or parameter layout is not the seed's.

Each class here subclasses ``spec.Adapter``: ``build(cfg)`` constructs the module from a drawn
``spec.Config`` (raising ``spec.Unsupported`` for configurations the module cannot express; they are
skipped and counted in the report), and ``projections(module)`` says where the query/key/value/output
projections live, as ``(weight (out, in), bias or None)`` pairs in ``nn.Linear``'s layout, so the
parameter-level invariants (oracle-float64, head-split-equivalence, qkv-bias, weight-transfer) apply.
The projections must be *views* of the module's parameters: weight-transfer writes into them.

    attnspec check mha=examples/adapters.py:TorchMultiheadAttention \\
                   mha=examples/adapters.py:SDPAAttention mha=examples/adapters.py:CombinedQKV

All three are causal multi-head attention (kind ``mha``): with Q = x Wq^T + bq (likewise K, V),
head h uses rows h*hd:(h+1)*hd of Q, K, V (hd = d_out / num_heads) and computes
softmax(Q_h K_h^T / sqrt(hd) + M) V_h with M[i, j] = -inf for j > i; the heads are concatenated and
passed through out_proj: y = concat_h(...) Wo^T + bo. Dropout (train mode only) is on the weights.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnspec import Adapter, Unsupported


def _rows(tensor, i, n):
    """Rows i*len/n:(i+1)*len/n of a parameter as a view sharing its storage (writes go through)."""
    if tensor is None:
        return None
    size = tensor.shape[0] // n
    return tensor.detach()[i * size:(i + 1) * size]


def _causal_mask(context_length):
    """(context_length, context_length) bool, True above the diagonal: the future, not attended."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


# --- 1. torch.nn.MultiheadAttention -------------------------------------------------------------

class CausalTorchMHA(nn.Module):
    """``nn.MultiheadAttention(d_out, num_heads, dropout, bias, batch_first=True)`` as causal
    self-attention: forward(x) = mha(x, x, x, attn_mask=future)[0], the output only.

    Q, K, V are rows [0, d), [d, 2d), [2d, 3d) of ``in_proj_weight`` / ``in_proj_bias`` (d = d_out);
    torch scales Q by 1/sqrt(head_dim) and adds -inf where the bool mask is True (the future).
    ``out_bias=True`` with ``bias=False`` gives ``out_proj`` a (zero-initialized) bias anyway: torch
    has one flag for both, and its forward uses whatever ``out_proj.bias`` holds."""

    def __init__(self, d_out, context_length, dropout, num_heads, bias=True, out_bias=True, need_weights=True):
        super().__init__()
        self.mha = nn.MultiheadAttention(embed_dim=d_out, num_heads=num_heads, dropout=dropout, bias=bias,
                                         batch_first=True)
        if out_bias and self.mha.out_proj.bias is None:
            self.mha.out_proj.bias = nn.Parameter(torch.zeros(d_out))
        self.need_weights = need_weights
        # A bool buffer: Module.to(dtype=...) leaves it bool, and it is not a parameter.
        self.register_buffer("mask", _causal_mask(context_length), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        out, _ = self.mha(x, x, x, attn_mask=self.mask[:t, :t], need_weights=self.need_weights,
                          average_attn_weights=False)
        return out


class TorchMultiheadAttention(Adapter):
    """``torch.nn.MultiheadAttention`` with a causal mask, checked as kind ``mha``.

    ``adjust`` draws d_in = d_out: the query's width must be ``embed_dim`` (``kdim``/``vdim`` only
    change the key/value inputs, and in self-attention those are the query).

    The bias: ``nn.MultiheadAttention`` has one ``bias`` flag for the in-projection *and* ``out_proj``,
    while the seed (and the qkv-bias invariant) wants q/k/v biases iff ``qkv_bias`` and an ``out_proj``
    bias always. We build with ``bias=qkv_bias`` and, when that is False, give ``out_proj`` a bias
    parameter (torch's forward passes ``out_proj.bias`` through as is), so every ``qkv_bias`` is
    checked. Set ``add_out_proj_bias = False`` in a subclass to decline ``qkv_bias=False`` instead.

    The weight-level invariants apply: ``F.multi_head_attention_forward`` is a ``__torch_function__``
    override point, so attnspec's probe sees the call (not the calls inside it) and records the weights
    it returns with ``need_weights=True``. ``need_weights=False`` (the fused path) is checked the same way."""

    kind = "mha"
    need_weights = True
    add_out_proj_bias = True

    def adjust(self, cfg):
        return cfg.replace(d_in=cfg.d_out)

    def build(self, cfg):
        if not cfg.qkv_bias and not self.add_out_proj_bias:
            raise Unsupported("nn.MultiheadAttention(bias=False) has no out_proj bias")
        return CausalTorchMHA(cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads, bias=cfg.qkv_bias,
                              out_bias=self.add_out_proj_bias, need_weights=self.need_weights)

    def projections(self, module):
        mha = module.mha
        if mha.in_proj_weight is None:  # separate q/k/v weights: only when kdim/vdim != embed_dim
            return None
        parts = {name: (_rows(mha.in_proj_weight, i, 3), _rows(mha.in_proj_bias, i, 3))
                 for i, name in enumerate(("query", "key", "value"))}
        parts["out"] = (mha.out_proj.weight, mha.out_proj.bias)
        return parts


# --- 2. fused scaled_dot_product_attention -------------------------------------------------------

class SDPAMultiHeadAttention(nn.Module):
    """The seed's projections (W_query, W_key, W_value, out_proj) around the fused kernel:
    y = out_proj(merge_h SDPA(Q_h, K_h, V_h, is_causal=True, dropout_p=p in train mode else 0)).

    SDPA computes softmax(Q_h K_h^T / sqrt(hd) + causal -inf) V_h internally; its arguments determine
    those weights, and attnspec's probe computes them."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out={d_out} must be divisible by num_heads={num_heads}")
        self.context_length, self.num_heads, self.head_dim = context_length, num_heads, d_out // num_heads
        self.dropout = dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def _heads(self, t):  # (b, T, d_out) -> (b, H, T, hd)
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, _ = x.shape
        if n > self.context_length:
            raise ValueError(f"num_tokens={n} exceeds context_length={self.context_length}")
        q, k, v = (self._heads(proj(x)) for proj in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class SDPAAttention(Adapter):
    """``SDPAMultiHeadAttention``: the seed's constructor and parameter names, so ``projections`` is
    the default (seed names); the weight-level invariants apply to the weights the probe computes from
    scaled_dot_product_attention's arguments."""

    kind = "mha"

    def build(self, cfg):
        return SDPAMultiHeadAttention(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads,
                                      qkv_bias=cfg.qkv_bias)


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

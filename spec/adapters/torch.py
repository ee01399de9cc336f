"""Adapters for PyTorch's own attention: ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``
and ``nn.TransformerEncoderLayer``, each configured to the seed's contract and given a causal mask.

    attnspec check attnspec.adapters.torch:MultiheadAttention attnspec.adapters.torch:SDPA \
                   attnspec.adapters.torch:SDPAMHA attnspec.adapters.torch:TransformerEncoderLayer \
                   attnspec.adapters.torch:TransformerEncoderLayerErf

Kind ``mha`` (``MultiheadAttention``, ``SDPAMHA``): with Q = x Wq^T + bq (likewise K, V), head h uses rows h*hd:(h+1)*hd of
Q, K, V (hd = d_out / num_heads) and computes softmax(Q_h K_h^T / sqrt(hd) + M) V_h, M[i, j] = -inf
for j > i; the heads are concatenated and passed through out_proj: y = concat_h(...) Wo^T + bo.
Dropout (train mode only) is on the weights. Kind ``transformer-block``: the GPT-2 pre-LN block,
x + drop(att(LN1(x))), then + drop(W2 gelu(W1 LN2(.) + b1) + b2). ``SDPA`` is kind ``gqa`` with grouped K/V
heads only: the same with W_key/W_value of num_kv_heads heads and SDPA's ``enable_gqa=True``.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnspec.adapters.base import SubLayer, causal_mask, rows
from attnspec.errors import Unsupported
from attnspec.targets import Adapter


def _in_projections(mha):
    """q/k/v/out of an nn.MultiheadAttention: rows [0, d), [d, 2d), [2d, 3d) of in_proj_weight/_bias."""
    if mha.in_proj_weight is None:  # separate q/k/v weights: only when kdim/vdim != embed_dim
        return None
    parts = {name: (rows(mha.in_proj_weight, i, 3), rows(mha.in_proj_bias, i, 3))
             for i, name in enumerate(("query", "key", "value"))}
    parts["out"] = (mha.out_proj.weight, mha.out_proj.bias)
    return parts


# --- nn.MultiheadAttention ------------------------------------------------------------------------

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
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        out, _ = self.mha(x, x, x, attn_mask=self.mask[:t, :t], need_weights=self.need_weights,
                          average_attn_weights=False)
        return out


class MultiheadAttention(Adapter):
    """``torch.nn.MultiheadAttention`` with a causal mask, checked as kind ``mha``.

    ``adjust`` draws d_in = d_out: the query's width must be ``embed_dim`` (``kdim``/``vdim`` only
    change the key/value inputs, and in self-attention those are the query).

    The bias: ``nn.MultiheadAttention`` has one ``bias`` flag for the in-projection *and* ``out_proj``,
    while the seed (and the qkv-bias invariant) wants q/k/v biases iff ``qkv_bias`` and an ``out_proj``
    bias always. We build with ``bias=qkv_bias`` and, when that is False, give ``out_proj`` a bias
    parameter (torch's forward passes ``out_proj.bias`` through as is), so every ``qkv_bias`` is
    checked. ``MultiheadAttentionOneBias`` checks torch's own one-flag module under the
    ``out-proj-no-bias`` contract variant instead.

    ``need_weights=True`` (torch's default, used here) computes the weights in Python (baddbmm,
    softmax, dropout, bmm); ``need_weights=False`` calls the fused ``scaled_dot_product_attention``."""

    kind = "mha"
    need_weights = True
    add_out_proj_bias = True

    def adjust(self, cfg):
        return cfg.replace(d_in=cfg.d_out)

    def build(self, cfg):
        if not cfg.qkv_bias and not self.add_out_proj_bias and "out-proj-no-bias" not in self.variants:
            raise Unsupported("nn.MultiheadAttention(bias=False) has no out_proj bias")
        return CausalTorchMHA(cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads, bias=cfg.qkv_bias,
                              out_bias=self.add_out_proj_bias, need_weights=self.need_weights)

    def projections(self, module):
        return _in_projections(module.mha)


class MultiheadAttentionOneBias(MultiheadAttention):
    """``nn.MultiheadAttention(bias=qkv_bias)`` as torch builds it, one bias flag for every projection:
    checked against the ``out-proj-no-bias`` contract variant."""

    add_out_proj_bias = False
    variants = ("out-proj-no-bias",)


# --- F.scaled_dot_product_attention ---------------------------------------------------------------

class SDPAMultiHeadAttention(nn.Module):
    """The seed's projections (W_query, W_key, W_value, out_proj) around the fused kernel, with grouped
    K/V heads: W_key and W_value have ``num_kv_heads`` heads of hd = d_out / num_heads rows (None: num_heads),
    and y = out_proj(merge_h SDPA(Q_h, K, V, is_causal=True, enable_gqa=num_kv_heads < num_heads,
    dropout_p=p in train mode else 0)): SDPA gives query head h the K/V head h // (num_heads / num_kv_heads).

    SDPA computes softmax(Q_h K_h^T / sqrt(hd) + causal -inf) V_h internally (the probe computes the
    weights from its arguments). ``forward(x, use_cache=True)`` appends x's keys and values to a KV cache
    (x's tokens at the positions after the cached ones: query i attends key j iff j <= start + i, an explicit
    bool mask, since SDPA's is_causal is top-left aligned); ``reset_cache()`` empties it, ``crop_cache(n)``
    keeps its first n tokens. ``attention_mask`` (batch, cached + num_tokens), True/1 = a real token, masks the
    padded keys."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, num_kv_heads=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if d_out % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"d_out={d_out} must be divisible by num_heads={num_heads}, and num_heads by "
                             f"num_kv_heads={num_kv_heads}")
        self.context_length, self.num_heads, self.head_dim = context_length, num_heads, d_out // num_heads
        self.num_kv_heads = num_kv_heads
        self.dropout = dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.reset_cache()

    def reset_cache(self):
        self.cache = None

    def crop_cache(self, n):
        """Keep the first n cached tokens (Hugging Face's DynamicCache.crop)."""
        if self.cache is not None:
            self.cache = tuple(t[:, :, :n] for t in self.cache)

    def _heads(self, t):  # (b, T, heads * hd) -> (b, heads, T, hd)
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def forward(self, x, use_cache=False, attention_mask=None):
        b, n, _ = x.shape
        start = self.cache[0].shape[2] if use_cache and self.cache is not None else 0
        if start + n > self.context_length:
            raise ValueError(f"{start} cached + {n} new tokens exceed context_length={self.context_length}")
        q, k, v = (self._heads(proj(x)) for proj in (self.W_query, self.W_key, self.W_value))
        if use_cache:
            if self.cache is not None:
                k, v = torch.cat([self.cache[0], k], dim=2), torch.cat([self.cache[1], v], dim=2)
            self.cache = (k, v)
        mask = None
        if start or attention_mask is not None:
            mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)  # j <= start + i
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]  # padded keys not attended
        context = self._attend(q, k, v, mask)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def _attend(self, q, k, v, mask):
        """SDPA of the query heads over the (cached) K/V heads; causal unless ``mask`` (True = attended) is given."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.num_kv_heads != self.num_heads)


class SDPA(Adapter):
    """``SDPAMultiHeadAttention``, checked as kind ``gqa`` narrowed to its one feature, grouped K/V heads
    (``enable_gqa``): no rotary embedding, no sliding window. The seed's parameter names, so
    ``projections`` is the default (seed names); out_proj has a bias (gqa leaves it free)."""

    kind = "gqa"
    features = ("grouped_kv",)
    module_class = SDPAMultiHeadAttention  # the class built (subclass it to check your own)

    def build(self, cfg):
        return self.module_class(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads,
                                      qkv_bias=cfg.qkv_bias, num_kv_heads=cfg.kv_heads)


class SDPAMHA(Adapter):
    """``SDPAMultiHeadAttention`` with num_kv_heads = num_heads, checked as the seed's kind ``mha`` (out_proj's
    bias required)."""

    kind = "mha"

    def build(self, cfg):
        return SDPAMultiHeadAttention(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads,
                                      qkv_bias=cfg.qkv_bias)


# --- nn.TransformerEncoderLayer -------------------------------------------------------------------

gelu_tanh = functools.partial(F.gelu, approximate="tanh")


class CausalEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` configured as the GPT-2 block: d_model = emb_dim, nhead =
    num_heads, dim_feedforward = 4*emb_dim, dropout = p, layer_norm_eps = 1e-5, norm_first (pre-LN),
    batch_first; forward(x) = layer(x, src_mask=future, is_causal=True).

    Torch's layer differs from the seed's block in two places that are configured to the contract:
    its ``bias`` flag covers every Linear, so with qkv_bias=False the in-projection bias is removed
    (``in_proj_bias = None``; out_proj and the feed-forward keep theirs); and it applies dropout inside
    the feed-forward (between the activation and linear2), which the seed's FeedForward does not
    have, so that one is the identity. Its dropout on the attention weights and on both residual
    branches (dropout1, dropout2) is the seed's."""

    def __init__(self, emb_dim, num_heads, context_length, dropout, qkv_bias=False, activation=gelu_tanh):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=emb_dim, nhead=num_heads, dim_feedforward=4 * emb_dim,
                                                dropout=dropout, activation=activation, layer_norm_eps=1e-5,
                                                batch_first=True, norm_first=True)
        self.layer.dropout = nn.Identity()
        if not qkv_bias:
            self.layer.self_attn.in_proj_bias = None
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        return self.layer(x, src_mask=self.mask[:t, :t], is_causal=True)


class TransformerEncoderLayer(Adapter):
    """``CausalEncoderLayer`` (``nn.TransformerEncoderLayer``, tanh GELU), checked as kind
    ``transformer-block``. The attention sub-layer is ``self_attn`` (it returns ``(output, weights)``);
    the feed-forward runs inline from ``linear1``'s input to ``linear2``'s output."""

    kind = "transformer-block"
    activation = staticmethod(gelu_tanh)

    def build(self, cfg):
        return CausalEncoderLayer(cfg.d_in, cfg.num_heads, cfg.context_length, cfg.dropout, cfg.qkv_bias,
                                  activation=self.activation)

    def projections(self, module):
        layer = module.layer
        return {"att": _in_projections(layer.self_attn),
                "norm1": (layer.norm1.weight, layer.norm1.bias), "norm2": (layer.norm2.weight, layer.norm2.bias),
                "ff": [(layer.linear1.weight, layer.linear1.bias), (layer.linear2.weight, layer.linear2.bias)]}

    def sublayers(self, module):
        layer = module.layer
        return SubLayer(layer.self_attn), SubLayer(layer.linear1, layer.linear2)


class TransformerEncoderLayerErf(TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(activation="gelu")``, torch's exact erf GELU: checked against the
    ``gelu-erf`` contract variant."""

    activation = "gelu"
    variants = ("gelu-erf",)


"""Correct attention modules written the way other people write them (not copies of impl/).

Each is mathematically the seed's module of its kind: causal softmax(Q K^T / sqrt(d_k)) V with dropout
on the weights, heads split and merged through out_proj, the GPT-2 pre-LayerNorm block. They differ
in everything the spec must not care about: parameter names, fused or sliced projections, how the
mask is applied (-inf, a large negative number, torch.where, an additive mask, multiply and
renormalize), where the 1/sqrt(d_k) goes, einsum instead of matmul, nn.Softmax modules, loops over
heads, list comprehensions. tests/test_correct_elsewhere.py checks that attnspec finds no violation
in any of them: a failure there is a false alarm of the spec, not a bug here.

Constructors follow each kind's signature (``attnspec list --kinds``)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class NanoGPTCausalSelfAttention(nn.Module):
    """Karpathy's nanoGPT CausalSelfAttention (the non-flash path), kind mha: one fused ``c_attn``
    projection split into q, k, v, a ``bias`` buffer holding tril(ones) of shape (1, 1, T, T),
    masked_fill(bias == 0, -inf), F.softmax, attention dropout, ``c_proj``, and residual dropout."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.c_attn = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.c_proj = nn.Linear(d_out, d_out)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = num_heads
        self.n_embd = d_out
        self.register_buffer("bias", torch.tril(torch.ones(context_length, context_length))
                             .view(1, 1, context_length, context_length))

    def forward(self, x):
        B, T, _ = x.size()
        C = self.n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class HFStyleAttention(nn.Module):
    """Hugging Face style, kind mha: q_proj/k_proj/v_proj/o_proj, queries scaled by head_dim**-0.5
    *before* the matmul, an additive causal mask filled with torch.finfo(dtype).min (not -inf),
    ``nn.functional.softmax``, ``nn.functional.dropout(p, training=self.training)``."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads:
            raise ValueError("d_out must be divisible by num_heads")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = dropout
        self.max_position_embeddings = context_length
        self.q_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.k_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.o_proj = nn.Linear(d_out, d_out, bias=True)

    def _shape(self, tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, hidden_states):
        bsz, q_len, _ = hidden_states.size()
        query_states = self._shape(self.q_proj(hidden_states) * self.scaling, q_len, bsz)
        key_states = self._shape(self.k_proj(hidden_states), q_len, bsz)
        value_states = self._shape(self.v_proj(hidden_states), q_len, bsz)

        min_value = torch.finfo(hidden_states.dtype).min
        causal_mask = torch.full((q_len, q_len), min_value, dtype=hidden_states.dtype, device=hidden_states.device)
        causal_mask = torch.triu(causal_mask, diagonal=1)[None, None, :, :]  # 0 on and below the diagonal

        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3))
        attn_weights = attn_weights + causal_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = nn.functional.dropout(attn_weights, p=self.attention_dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)

        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.o_proj(attn_output)


class RenormalizedCausalAttention(nn.Module):
    """Kind causal-attention with the seed's *first* masking: softmax over all positions, zero the
    future by multiplying with tril(ones), divide each row by its sum. Mathematically identical to
    masking the scores with -inf before the softmax."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask_simple", torch.tril(torch.ones(context_length, context_length)))

    def forward(self, x):
        num_tokens = x.shape[1]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        masked_simple = attn_weights * self.mask_simple[:num_tokens, :num_tokens]
        row_sums = masked_simple.sum(dim=-1, keepdim=True)
        attn_weights = masked_simple / row_sums
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values


class LargeNegativeMaskMHA(nn.Module):
    """Kind mha: the future filled with -1e9 instead of -inf (exp underflows to exactly 0),
    scores scaled after masking, an ``nn.Softmax(dim=-1)`` module, queries/keys/values reshaped
    with ``reshape`` + ``permute``."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.h, self.d_k = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("causal", torch.tril(torch.ones(context_length, context_length, dtype=torch.bool)))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.W_query(x).reshape(b, t, self.h, self.d_k).permute(0, 2, 1, 3)
        k = self.W_key(x).reshape(b, t, self.h, self.d_k).permute(0, 2, 1, 3)
        v = self.W_value(x).reshape(b, t, self.h, self.d_k).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k.permute(0, 1, 3, 2))
        scores = scores.masked_fill(~self.causal[:t, :t], -1e9)
        p_attn = self.dropout(self.softmax(scores / math.sqrt(self.d_k)))
        out = torch.matmul(p_attn, v).permute(0, 2, 1, 3).reshape(b, t, self.d_out)
        return self.out_proj(out)


class EinsumMHA(nn.Module):
    """Kind mha with torch.einsum for the scores and for the weighted sum of the values, the latter
    written values-first: einsum("bhjd,bhij->bhid", v, weights). ``Tensor.softmax``; the
    1/sqrt(head_dim) applied to the einsum result."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError("d_out % num_heads != 0")
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.attn_drop = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.W_query, self.W_key, self.W_value))  # (b, h, t, d)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(self.mask[:t, :t], float("-inf"))
        weights = self.attn_drop(scores.softmax(dim=-1))
        context = torch.einsum("bhjd,bhij->bhid", v, weights)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class PerHeadLoopMHA(nn.Module):
    """Kind mha computing each head in a Python loop over column slices of Q, K, V (one softmax call
    per head), then ``torch.cat`` of the heads and out_proj."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        t = x.shape[1]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        future = self.mask[:t, :t].bool()
        heads = []
        for h in range(self.num_heads):
            cols = slice(h * self.head_dim, (h + 1) * self.head_dim)
            q, k, v = queries[:, :, cols], keys[:, :, cols], values[:, :, cols]
            scores = (q @ k.transpose(1, 2)).masked_fill(future, -torch.inf) / self.head_dim**0.5
            weights = self.dropout(F.softmax(scores, dim=-1))
            heads.append(weights @ v)
        return self.out_proj(torch.cat(heads, dim=-1))


class WhereCausalAttention(nn.Module):
    """Kind causal-attention masking with torch.where(future, -inf, scores) and torch.bmm."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.drop = nn.Dropout(p=dropout)
        positions = torch.arange(context_length)
        self.register_buffer("future", positions[None, :] > positions[:, None], persistent=False)

    def forward(self, x):
        t = x.size(1)
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(k.size(-1))
        scores = torch.where(self.future[:t, :t], scores.new_tensor(float("-inf")), scores)
        return torch.bmm(self.drop(torch.softmax(scores, dim=-1)), v)


class ListCatWrapper(nn.Module):
    """Kind mha-wrapper: ``num_heads`` WhereCausalAttention heads built by a list comprehension,
    forward = torch.cat of a list comprehension over the heads."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList([WhereCausalAttention(d_in, d_out, context_length, dropout, qkv_bias)
                                    for _ in range(num_heads)])

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


class GPT2Block(nn.Module):
    """Kind transformer-block: torch's nn.LayerNorm (eps 1e-5) and nn.GELU(approximate="tanh"),
    ``att`` an attention with the seed's projection names, ``ff`` an nn.Sequential, residual dropout.
    x = x + drop(att(norm1(x))); x = x + drop(ff(norm2(x)))."""

    def __init__(self, cfg):
        super().__init__()
        emb = cfg["emb_dim"]
        self.att = LargeNegativeMaskMHA(emb, emb, cfg["context_length"], cfg["dropout"], cfg["num_heads"],
                                        qkv_bias=cfg["qkv_bias"])
        self.ff = nn.Sequential(nn.Linear(emb, 4 * emb), nn.GELU(approximate="tanh"), nn.Linear(4 * emb, emb))
        self.norm1 = nn.LayerNorm(emb)
        self.norm2 = nn.LayerNorm(emb)
        self.drop_resid = nn.Dropout(cfg["dropout"])

    def forward(self, x):
        x = x + self.drop_resid(self.att(self.norm1(x)))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


class QKVSelfAttention(nn.Module):
    """Kind self-attention (unbatched, not causal): nn.Linear projections named query/key/value,
    einsum (weights first) for the scores and the weighted sum, softmax over dim=1 of the 2-D score
    matrix, scaled by d_out**-0.5 by multiplication."""

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.scale = d_out**-0.5

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        attn = F.softmax(torch.einsum("id,jd->ij", q, k) * self.scale, dim=1)
        return torch.einsum("ij,jd->id", attn, v)


# (kind, class name) of every module above, for the tests.


class TiledOnlineSoftmaxMHA(nn.Module):
    """Kind mha, flash-attention style: queries and keys in tiles, a running row max, denominator and
    context per query tile (online softmax), key tiles past the diagonal skipped, the diagonal tile
    masked; dropout on the unnormalized tile probabilities; accumulation in float32 for half inputs.
    Never calls softmax, so weight-level invariants are not applicable to it (nothing to observe)."""

    TILE = 16

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.num_heads, self.head_dim, self.p = num_heads, d_out // num_heads, dropout
        self.q_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.k_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.o_proj = nn.Linear(d_out, d_out)

    def forward(self, x):
        B, T, _ = x.shape
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2).to(acc_dtype)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * self.head_dim**-0.5
        out = torch.empty_like(q)
        for qs in range(0, T, self.TILE):
            qe = min(qs + self.TILE, T)
            rows = torch.arange(qs, qe, device=x.device).unsqueeze(-1)
            m = torch.full((B, self.num_heads, qe - qs, 1), -math.inf, dtype=acc_dtype, device=x.device)
            denom = torch.zeros_like(m)
            ctx = torch.zeros(B, self.num_heads, qe - qs, self.head_dim, dtype=acc_dtype, device=x.device)
            for ks in range(0, qe, self.TILE):  # key tiles up to the diagonal
                ke = min(ks + self.TILE, T)
                s = q[:, :, qs:qe] @ k[:, :, ks:ke].transpose(-2, -1)
                if ke > qs:  # the diagonal tile: mask keys after the query
                    s = s.masked_fill(torch.arange(ks, ke, device=x.device) > rows, -math.inf)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))  # finite: key 0 precedes every query
                alpha, probs = torch.exp(m - m_new), torch.exp(s - m_new)
                denom = denom * alpha + probs.sum(-1, keepdim=True)
                ctx = ctx * alpha + F.dropout(probs, self.p, self.training) @ v[:, :, ks:ke]
                m = m_new
            out[:, :, qs:qe] = ctx / denom
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


MODULES = [
    ("mha", "NanoGPTCausalSelfAttention"),
    ("mha", "HFStyleAttention"),
    ("causal-attention", "RenormalizedCausalAttention"),
    ("mha", "LargeNegativeMaskMHA"),
    ("mha", "EinsumMHA"),
    ("mha", "PerHeadLoopMHA"),
    ("causal-attention", "WhereCausalAttention"),
    ("mha-wrapper", "ListCatWrapper"),
    ("transformer-block", "GPT2Block"),
    ("self-attention", "QKVSelfAttention"),
    ("mha", "TiledOnlineSoftmaxMHA"),
]


# --- issue 10: real code's layouts, precision habits and fused kernels ---------------------------


class BookGELU(nn.Module):
    """llms-from-scratch ch04's GELU, verbatim: sqrt(2/pi) is built as a *float32* tensor, so a float64
    run carries its float32 rounding (relative error 3e-9): correct for any practical purpose."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mean) / torch.sqrt(var + self.eps)) + self.shift


class BookFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), BookGELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class BookTransformerBlock(nn.Module):
    """Kind transformer-block as the book's package writes it: cfg["n_heads"], cfg["drop_rate"] (the book's
    keys), its own LayerNorm, GELU (float32 constant) and FeedForward, ``drop_shortcut``."""

    def __init__(self, cfg):
        super().__init__()
        self.att = LargeNegativeMaskMHA(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                        cfg["n_heads"], qkv_bias=cfg["qkv_bias"])
        self.ff = BookFeedForward(cfg)
        self.norm1 = BookLayerNorm(cfg["emb_dim"])
        self.norm2 = BookLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.drop_shortcut(self.att(self.norm1(x))) + shortcut
        shortcut = x
        x = self.drop_shortcut(self.ff(self.norm2(x))) + shortcut
        return x


class _Heads(nn.Module):
    """Shared plumbing: separate q/k/v Linears named ``names``, an output Linear, a bool future mask."""

    names = ("W_query", "W_key", "W_value", "out_proj")

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.h, self.hd, self.d_out, self.p = num_heads, d_out // num_heads, d_out, dropout
        for name in self.names[:3]:
            setattr(self, name, nn.Linear(d_in, d_out, bias=qkv_bias))
        setattr(self, self.names[3], nn.Linear(d_out, d_out))
        self.drop = nn.Dropout(dropout)
        self.register_buffer("future", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
                             persistent=False)

    def qkv(self, x):  # (b, h, t, hd) each
        b, t, _ = x.shape
        return [getattr(self, n)(x).view(b, t, self.h, self.hd).transpose(1, 2) for n in self.names[:3]]

    def out(self, context):  # (b, h, t, hd) -> (b, t, d_out)
        b, _, t, _ = context.shape
        return getattr(self, self.names[3])(context.transpose(1, 2).reshape(b, t, self.d_out))


class Float32SoftmaxMHA(_Heads):
    """x-transformers' habit: the softmax is computed in float32 and cast back (``.float().softmax().type``),
    so a float64 run has weights rounded to float32 (rows sum to 1 within ~6e-8)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        scores = (q @ k.transpose(-2, -1) * self.hd**-0.5).masked_fill(self.future[:t, :t], float("-inf"))
        weights = self.drop(scores.float().softmax(dim=-1).type(scores.dtype))
        return self.out(weights @ v)


class KeysOnRowsMHA(_Heads):
    """Scores as K Q^T (keys on the rows), the softmax over dim=-2 (the keys), the context as
    (V^T @ W)^T: the transpose of the seed's layout throughout."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        scores = (k @ q.transpose(-2, -1)) / math.sqrt(self.hd)  # (b, h, key, query)
        scores = scores.masked_fill(self.future[:t, :t].T, float("-inf"))
        weights = self.drop(torch.softmax(scores, dim=-2))
        return self.out((v.transpose(-2, -1) @ weights).transpose(-2, -1))


class KeysOnRowsTransposedMHA(KeysOnRowsMHA):
    """As KeysOnRowsMHA, but the context as W^T @ V."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        scores = (k @ q.transpose(-2, -1)) / math.sqrt(self.hd)
        weights = self.drop(F.softmax(scores.masked_fill(self.future[:t, :t].T, -torch.inf), dim=-2))
        return self.out(weights.transpose(-2, -1) @ v)


class TokenMajorEinsumMHA(_Heads):
    """Token-major einsum: scores laid out (b, query, key, head), softmax over dim=2, context by
    einsum("bijh,bjhd->bihd"); with num_heads == num_tokens every axis but the batch has the same size."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (getattr(self, n)(x).view(b, t, self.h, self.hd) for n in self.names[:3])  # (b, t, h, hd)
        scores = torch.einsum("bihd,bjhd->bijh", q, k) * self.hd**-0.5
        scores = scores.masked_fill(self.future[:t, :t][None, :, :, None], float("-inf"))
        weights = self.drop(scores.softmax(dim=2))
        return getattr(self, self.names[3])(torch.einsum("bijh,bjhd->bihd", weights, v).reshape(b, t, self.d_out))


class NanoGPTFlashAttention(nn.Module):
    """nanoGPT's flash path, kind mha: fused ``c_attn`` (one nn.Linear to [q|k|v]), ``c_proj``,
    F.scaled_dot_product_attention(is_causal=True, dropout_p=self.dropout if self.training else 0)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.c_attn = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.c_proj = nn.Linear(d_out, d_out)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = num_heads, d_out, dropout

    def forward(self, x):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.n_embd // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, self.n_embd)))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: y = x W + b with W stored (in, out)."""

    def __init__(self, nf, nx, bias=True):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        y = x.reshape(-1, x.size(-1)) @ self.weight if self.bias is None else \
            torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return y.view(x.size()[:-1] + (self.nf,))


class HFGPT2StyleAttention(nn.Module):
    """Hugging Face GPT2Attention's eager path, kind mha: Conv1D ``c_attn`` (weights (in, 3 d)) split into
    q, k, v; a float causal ``bias`` buffer and torch.where with finfo.min; Conv1D ``c_proj``; the forward
    of the attention returns a tuple (output, weights) inside the model; here the output only. qkv_bias
    False is not GPT-2's (its Conv1D always has a bias): c_attn then has none."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.c_attn = Conv1D(3 * d_out, d_in, bias=qkv_bias)
        self.c_proj = Conv1D(d_out, d_out)
        self.attn_dropout = nn.Dropout(dropout)
        self.num_heads, self.head_dim, self.split_size = num_heads, d_out // num_heads, d_out
        self.register_buffer("bias", torch.tril(torch.ones(context_length, context_length, dtype=torch.bool))
                             .view(1, 1, context_length, context_length), persistent=False)

    def forward(self, hidden_states):
        b, t, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query, key, value = (s.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for s in (query, key, value))
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) / torch.full(
            [], value.size(-1) ** 0.5, dtype=query.dtype, device=query.device)
        causal_mask = self.bias[:, :, :t, :t]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = self.attn_dropout(nn.functional.softmax(attn_weights, dim=-1))
        attn_output = torch.matmul(attn_weights, value).transpose(1, 2).reshape(b, t, self.split_size)
        return self.c_proj(attn_output)


class TorchtuneStyleAttention(_Heads):
    """torchtune's MultiHeadAttention names, kind mha: q_proj/k_proj/v_proj/output_proj around SDPA with
    is_causal=True and dropout_p only in training."""

    names = ("q_proj", "k_proj", "v_proj", "output_proj")

    def forward(self, x):
        q, k, v = self.qkv(x)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       dropout_p=self.p if self.training else 0.0))


class XTransformersStyleAttention(_Heads):
    """x-transformers/diffusers names, kind mha: to_q/to_k/to_v and ``to_out = Sequential(Linear, Dropout)``;
    an explicit bool mask (True = attend) and an explicit scale passed to SDPA."""

    names = ("to_q", "to_k", "to_v", "to_out")

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(d_out, d_out), nn.Dropout(dropout))

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=~self.future[:t, :t], scale=self.hd**-0.5,
                                                       dropout_p=self.p if self.training else 0.0))


class InProjAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout, kind mha: ``in_proj_weight`` (3 d_out, d_in) and
    ``in_proj_bias`` chunked into q, k, v; ``out_proj``; an additive float mask (0 / -inf) to SDPA."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_out, d_in))
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_out)) if qkv_bias else None
        self.out_proj = nn.Linear(d_out, d_out)
        self.h, self.d_out, self.p = num_heads, d_out, dropout
        self.register_buffer("additive", torch.triu(torch.full((context_length, context_length), float("-inf")), 1),
                             persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (s.view(b, t, self.h, -1).transpose(1, 2)
                   for s in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.additive[:t, :t].to(q.dtype),
                                           dropout_p=self.p if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, self.d_out))


MODULES += [
    ("transformer-block", "BookTransformerBlock"),
    ("mha", "Float32SoftmaxMHA"),
    ("mha", "KeysOnRowsMHA"),
    ("mha", "KeysOnRowsTransposedMHA"),
    ("mha", "TokenMajorEinsumMHA"),
    ("mha", "NanoGPTFlashAttention"),
    ("mha", "HFGPT2StyleAttention"),
    ("mha", "TorchtuneStyleAttention"),
    ("mha", "XTransformersStyleAttention"),
    ("mha", "InProjAttention"),
]


class SDPASeedProjectionsMHA(nn.Module):
    """The seed's projections around F.scaled_dot_product_attention(is_causal=True), written by an outside
    reviewer; in bfloat16 at offset 10 (scores ~100) its weights once failed masked-softmax-renormalized
    because the probe rounded SDPA's scores to bfloat16 before comparing."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.h, self.hd, self.d_out, self.p = num_heads, d_out // num_heads, d_out, dropout
        self.W_query, self.W_key, self.W_value = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.h, self.hd).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, self.d_out))


MODULES += [("mha", "SDPASeedProjectionsMHA")]


class SeparateOutBiasMHA(nn.Module):
    """Every Linear without bias; the output bias an nn.Parameter of its own added after out_proj (Megatron-style
    code keeps biases apart for fused bias-add kernels): found as out_proj's bias (targets.NAMES["out_bias"])."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.h, self.hd, self.d_out = num_heads, d_out // num_heads, d_out
        self.W_query, self.W_key, self.W_value = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))
        self.out_proj = nn.Linear(d_out, d_out, bias=False)
        self.out_bias = nn.Parameter(torch.empty(d_out).uniform_(-d_out ** -0.5, d_out ** -0.5))
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.ones(context_length, context_length, dtype=torch.bool).triu(1))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.h, self.hd).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        s = (q @ k.transpose(-1, -2)).masked_fill(self.mask[:t, :t], -torch.inf)
        w = self.dropout(torch.softmax(s / self.hd ** 0.5, dim=-1))
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, t, self.d_out)) + self.out_bias


MODULES += [("mha", "SeparateOutBiasMHA")]



# --- issue 13: modern attention (kind gqa) --------------------------------------------------------


class HFLlamaStyleSDPA(nn.Module):
    """Hugging Face Llama style, kind gqa: q_proj/k_proj/v_proj/o_proj (no o_proj bias), cos/sin tables of
    cat(freqs, freqs) with ``rotate_half`` (the half-split layout; for interleaved pairs the dims are
    de-interleaved first and interleaved back after, as some ports do), partial rotary by slicing the
    first r dims, and F.scaled_dot_product_attention with ``enable_gqa=True`` and a bool mask (True =
    attended) holding the causal band of the window."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, num_kv_heads=None, qkv_bias=False,
                 rope_base=None, rope_fraction=1.0, rope_interleaved=False, window=None):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim = d_out // num_heads
        self.q_proj = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.k_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(d_out, d_out, bias=False)
        self.p, self.rope_base, self.interleaved = dropout, rope_base, rope_interleaved
        self.rotary_dim = int(self.head_dim * rope_fraction)
        i = torch.arange(context_length)
        band = i[None, :] <= i[:, None]
        if window:
            band &= i[None, :] > i[:, None] - window
        self.register_buffer("band", band, persistent=False)

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def apply_rope(self, t, T):
        r = self.rotary_dim
        inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
        freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(t.dtype), emb.sin().to(t.dtype)
        rot, rest = t[..., :r], t[..., r:]
        if self.interleaved:  # pairs (2i, 2i+1) -> (i, i + r/2) and back
            rot = torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)
        rot = rot * cos + self.rotate_half(rot) * sin
        if self.interleaved:
            rot = torch.stack((rot[..., : r // 2], rot[..., r // 2:]), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope_base is not None:
            q, k = self.apply_rope(q, T), self.apply_rope(k, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.band[:T, :T], enable_gqa=True,
                                           dropout_p=self.p if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MetaLlamaStyle(nn.Module):
    """Meta's original Llama style, kind gqa: wq/wk/wv/wo in a (B, T, heads, head_dim) layout, RoPE as
    complex multiplication (torch.polar, view_as_complex: the interleaved layout; half-split pairs are
    gathered into complex numbers as (x_i, x_{i+r/2})), ``repeat_kv`` by expand + reshape, an additive
    float mask of -inf, scores scaled after the matmul. (Meta's softmax in float32, cast back, is left out:
    in float64 runs it meets a known false alarm of gradient-oracle on the key bias, which cancels to 0.)"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, num_kv_heads=None, qkv_bias=False,
                 rope_base=None, rope_fraction=1.0, rope_interleaved=False, window=None):
        super().__init__()
        self.n_heads, self.n_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim = d_out // num_heads
        self.wq = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.wk = nn.Linear(d_in, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_in, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(d_out, d_out, bias=False)
        self.drop = nn.Dropout(dropout)
        self.rope_interleaved, self.window = rope_interleaved, window
        self.r = int(rope_fraction * self.head_dim) if rope_base is not None else 0
        if self.r:
            freqs = 1.0 / (rope_base ** (torch.arange(0, self.r, 2)[: self.r // 2].double() / self.r))
            self.freqs_cis = torch.polar(torch.ones(context_length, self.r // 2, dtype=torch.float64),
                                         torch.outer(torch.arange(context_length).double(), freqs))

    def rope(self, x):
        T, r = x.shape[1], self.r  # (freqs_cis is a plain attribute, as Meta's: .to() leaves it on the CPU)
        rot = x[..., :r].double()
        pairs = rot.reshape(*rot.shape[:-1], -1, 2) if self.rope_interleaved else \
            torch.stack((rot[..., : r // 2], rot[..., r // 2:]), dim=-1)
        out = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * self.freqs_cis[:T, None, :].to(x.device))
        out = out.flatten(-2) if self.rope_interleaved else torch.cat((out[..., 0], out[..., 1]), dim=-1)
        return torch.cat((out.to(x.dtype), x[..., r:]), dim=-1)

    @staticmethod
    def repeat_kv(x, n_rep):
        bs, slen, n_kv_heads, head_dim = x.shape
        return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep, head_dim)

    def forward(self, x):
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.r:
            xq, xk = self.rope(xq), self.rope(xk)
        keys = self.repeat_kv(xk, self.n_heads // self.n_kv_heads).transpose(1, 2)
        values = self.repeat_kv(xv, self.n_heads // self.n_kv_heads).transpose(1, 2)
        xq = xq.transpose(1, 2)
        mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
        if self.window:
            mask = mask + torch.full((T, T), float("-inf"), device=x.device).tril(-self.window)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim) + mask.to(xq.dtype)
        scores = F.softmax(scores, dim=-1)
        output = torch.matmul(self.drop(scores), values)
        return self.wo(output.transpose(1, 2).contiguous().view(B, T, -1))


MODULES += [
    ("gqa", "HFLlamaStyleSDPA"),
    ("gqa", "MetaLlamaStyle"),
]


class SlicedAttentionMHA(nn.Module):
    """diffusers' SlicedAttnProcessor style (written by an outside red team): heads folded into the batch,
    (B * H, T, head_dim), attention computed in slices of 4 rows of that folded axis (baddbmm, softmax and
    dropout per slice). Its slices once were stacked as heads of each batch element by the probe: a false
    alarm of scaling-sqrt-head-dim at batch 2 with 3 heads (6 rows: slices of 4 and 2)."""

    slice_size = 4

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.h, self.hd, self.d_out = num_heads, d_out // num_heads, d_out
        self.to_q, self.to_k, self.to_v = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))
        self.to_out = nn.Linear(d_out, d_out)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("causal", torch.ones(context_length, context_length, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (m(x).view(B, T, self.h, self.hd).transpose(1, 2).reshape(B * self.h, T, self.hd)
                   for m in (self.to_q, self.to_k, self.to_v))
        out = torch.empty_like(q)
        for i in range(0, B * self.h, self.slice_size):
            j = min(B * self.h, i + self.slice_size)
            s = torch.baddbmm(q.new_zeros(j - i, T, T), q[i:j], k[i:j].transpose(1, 2), beta=0.0, alpha=self.hd ** -0.5)
            w = self.attn_dropout(s.masked_fill(self.causal[:T, :T], float("-inf")).softmax(dim=-1))
            out[i:j] = torch.bmm(w, v[i:j])
        return self.to_out(out.view(B, self.h, T, self.hd).transpose(1, 2).reshape(B, T, self.d_out))


class HeadChunksMHA(SlicedAttentionMHA):
    """Heads in chunks of 2 (to bound memory), each chunk folded batch-major, (B * 2, T, T) a bmm (an outside
    review's module): per-call calls of the same shapes as the sliced module's, in another layout."""

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (m(x).view(B, T, self.h, self.hd).transpose(1, 2) for m in (self.to_q, self.to_k, self.to_v))
        outs = []
        for h0 in range(0, self.h, 2):
            n = min(self.h, h0 + 2) - h0
            qc, kc, vc = (t[:, h0:h0 + n].reshape(B * n, T, self.hd) for t in (q, k, v))
            s = torch.bmm(qc, kc.transpose(1, 2)) * self.hd ** -0.5
            w = self.attn_dropout(s.masked_fill(self.causal[:T, :T], float("-inf")).softmax(dim=-1))
            outs.append(torch.bmm(w, vc).view(B, n, T, self.hd))
        return self.to_out(torch.cat(outs, dim=1).transpose(1, 2).reshape(B, T, self.d_out))


class BatchLoopMHA(SlicedAttentionMHA):
    """One attention per batch element (ragged batches, packed sequences), (1, H, T, T) each (an outside review's
    module): where H is a multiple of the batch, its calls also fit one call per group of heads."""

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (m(x).view(B, T, self.h, self.hd).transpose(1, 2) for m in (self.to_q, self.to_k, self.to_v))
        outs = []
        for b in range(B):
            s = q[b:b + 1] @ k[b:b + 1].transpose(-2, -1) * self.hd ** -0.5
            w = self.attn_dropout(s.masked_fill(self.causal[:T, :T], float("-inf")).softmax(dim=-1))
            outs.append(w @ v[b:b + 1])
        return self.to_out(torch.cat(outs).transpose(1, 2).reshape(B, T, self.d_out))


MODULES += [("mha", "SlicedAttentionMHA"), ("mha", "HeadChunksMHA"), ("mha", "BatchLoopMHA")]


class CheckpointedBlock(nn.Module):
    """The bundled GPT-2 block with activation checkpointing of each sub-layer (use_reentrant=False; the RNG state
    preserved, so the recomputation redraws the same dropout masks): written by red-team pass 6. Once a false
    alarm of gradient-finite-differences: attnspec switched the module to eval mode between forward and backward,
    so the recomputation dropped nothing."""

    def __init__(self, cfg):
        super().__init__()
        from attnspec.impl.gpt import TransformerBlock

        block = TransformerBlock(cfg)
        self.att, self.ff, self.norm1, self.norm2, self.drop_shortcut = (block.att, block.ff, block.norm1, block.norm2,
                                                                         block.drop_shortcut)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = x + self.drop_shortcut(checkpoint(lambda h: self.att(self.norm1(h)), x, use_reentrant=False))
        return x + self.drop_shortcut(checkpoint(lambda h: self.ff(self.norm2(h)), x, use_reentrant=False))


MODULES += [("transformer-block", "CheckpointedBlock")]


class OptionalQKNormMHA(nn.Module):
    """nanoGPT-style attention with an optional QK-norm whose scale parameters exist whether or not the option is
    on (off here): parameters outside the projections that do not move the output are not a deviation."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, qk_norm=False):
        super().__init__()
        self.n_head, self.head_dim, self.qk_norm = num_heads, d_out // num_heads, qk_norm
        self.c_attn = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.c_proj = nn.Linear(d_out, d_out)
        self.q_scale = nn.Parameter(torch.ones(self.head_dim))
        self.k_scale = nn.Parameter(torch.ones(self.head_dim))
        self.dropout = dropout

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in self.c_attn(x).chunk(3, dim=-1))
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,)) * self.q_scale.to(q.dtype)
            k = F.rms_norm(k, (self.head_dim,)) * self.k_scale.to(k.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))


MODULES += [("mha", "OptionalQKNormMHA")]


class EvalSDPATrainEagerMHA(nn.Module):
    """Inference through F.scaled_dot_product_attention(is_causal=True), training with dropout through an eager
    softmax (as Hugging Face falls back to eager attention when a feature needs it): written by red-team pass 7.
    Once a false alarm of dropout-on-weights, which compared the two paths' weights as if one were exact (at
    off-centre input each float32 path is ~1e-4 from the exact weights)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.h, self.hd, self.d_out = num_heads, d_out // num_heads, d_out
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("causal", torch.ones(context_length, context_length, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.h, self.hd).transpose(1, 2) for m in (self.q_proj, self.k_proj, self.v_proj))
        if self.training and self.dropout.p > 0:
            s = (q @ k.transpose(-2, -1) / self.hd ** 0.5).masked_fill(self.causal[:t, :t], float("-inf"))
            context = self.dropout(s.softmax(dim=-1)) @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


MODULES += [("mha", "EvalSDPATrainEagerMHA")]


class WeightNormFrozenMaskCausal(nn.Module):
    """Causal attention whose projections are weight-normalized (torch.nn.utils.parametrizations.weight_norm: the
    parameters live in W_query.parametrizations) and whose mask is a frozen nn.Parameter, a buffer in all but name
    (a review of the seventh session: weight-transfer once stepped both as parameters the specification lacks)."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.W_query, self.W_key, self.W_value = (weight_norm(nn.Linear(d_in, d_out, bias=qkv_bias)) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.mask = nn.Parameter(torch.ones(context_length, context_length).triu(1), requires_grad=False)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = (q @ k.transpose(1, 2)).masked_fill(self.mask[:t, :t].bool(), -torch.inf)
        return self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)) @ v


MODULES += [("causal-attention", "WeightNormFrozenMaskCausal")]


from attnspec.impl import GroupedQueryAttention  # noqa: E402  (the reference's math; the calls organised otherwise)


class PerRowGQA(GroupedQueryAttention):
    """Kind gqa, flash-attn "varlen" style: without a cache each batch row is attended by its own call (a softmax of
    (1, heads, T, T) per row). Red-team pass 9: at one token every way of stacking those calls gives the same
    weights (all 1), and rotary-relative-position stacked the scores by a layout the weights could not tell."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if use_cache:
            return super().forward(x, use_cache=True, attention_mask=attention_mask)
        rows = [super(PerRowGQA, self).forward(x[b:b + 1], attention_mask=None if attention_mask is None
                                               else attention_mask[b:b + 1]) for b in range(x.shape[0])]
        return torch.cat(rows)


MODULES += [("gqa", "PerRowGQA")]


from attnspec.impl import MultiHeadAttentionWrapper  # noqa: E402


class FusedEvalWrapper(MultiHeadAttentionWrapper):
    """Kind mha-wrapper: an inference path that stacks the heads' projections and attends in one softmax call
    when neither training nor differentiating, the per-head path otherwise. Red-team pass 10: dropout-on-weights
    compared eval's one (B, H, T, T) call with train's H calls of (B, T, T) call by call."""

    def forward(self, x):
        if self.training or torch.is_grad_enabled():
            return super().forward(x)
        first = self.heads[0]
        b, T, _ = x.shape
        if x.dim() != 3 or x.shape[-1] != first.d_in or T > first.context_length:
            return super().forward(x)  # (the seed's errors)

        def project(name):
            y = torch.einsum("btd,hed->bhte", x, torch.stack([getattr(h, name).weight for h in self.heads]))
            if getattr(first, name).bias is not None:
                y = y + torch.stack([getattr(h, name).bias for h in self.heads])[None, :, None, :]
            return y

        q, k, v = project("W_query"), project("W_key"), project("W_value")
        scores = (q @ k.transpose(2, 3)).masked_fill(first.mask.bool()[:T, :T], -torch.inf)
        weights = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(b, T, -1)


MODULES += [("mha-wrapper", "FusedEvalWrapper")]


from attnspec.impl import MultiHeadAttention  # noqa: E402


class QueryChunkedMHA(MultiHeadAttention):
    """Kind mha: queries attended in chunks of 16 against every key (a memory-bounded inference loop). Red-team
    pass 10: a prefix is computed with other matmul shapes than the whole sequence, and at scale 100 the two
    round apart by more than the misaligned-copy noise prefix-consistency allowed (0.00656 against 0.00656)."""

    CHUNK = 16

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (w(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        chunks = []
        for start in range(0, T, self.CHUNK):
            end = min(T, start + self.CHUNK)
            scores = (q[:, :, start:end] @ k.transpose(2, 3)).masked_fill(self.mask.bool()[start:end, :T], -torch.inf)
            chunks.append(self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1)) @ v)
        return self.out_proj(torch.cat(chunks, dim=2).transpose(1, 2).reshape(b, T, self.d_out))


MODULES += [("mha", "QueryChunkedMHA")]


class PackedGroupsGQA(GroupedQueryAttention):
    """Kind gqa, flash kernels' "pack GQA": each group of num_heads / num_kv_heads query heads is folded into the query
    axis, (b, kv, group * T, head_dim), against its one K/V head (no repeat_kv); row r is query position r % T. Red-team
    pass 11: when num_kv_heads == num_tokens the softmax looks like (..., query, key) with the K/V heads as queries, and
    three weight invariants broadcast T x T masks over (group * T) x T matrices: attnspec's internal error."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if use_cache:
            return super().forward(x, use_cache=True, attention_mask=attention_mask)
        b, T, _ = x.shape
        kv, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = self.W_query(x).view(b, T, self.num_heads, hd).transpose(1, 2)
        k = self.W_key(x).view(b, T, kv, hd).transpose(1, 2)
        v = self.W_value(x).view(b, T, kv, hd).transpose(1, 2)
        q, k = self.rope(q, 0), self.rope(k, 0)
        mask = self.mask.bool()[:T, :T]
        if attention_mask is not None:
            mask = (mask | self.padded(attention_mask, 0)).repeat(1, 1, group, 1)  # (b, 1, group * T, T)
        else:
            mask = mask.repeat(group, 1)  # (group * T, T): row r is query r % T
        scores = (q.reshape(b, kv, group * T, hd) @ k.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = self.dropout(torch.softmax(scores / hd**0.5, dim=-1))
        context = (weights @ v).reshape(b, self.num_heads, T, hd)
        return self.out_proj(context.transpose(1, 2).contiguous().view(b, T, self.d_out))


MODULES += [("gqa", "PackedGroupsGQA")]


# --- Red-team pass 12: parameter layouts the names alone do not tell (attnspec reads them by the module's forward)

from attnspec.impl.gpt import GELU, LayerNorm  # noqa: E402


def _future(T, device):
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


class NeoXFusedQKV(nn.Module):
    """Kind mha, GPT-NeoX/Megatron ``query_key_value``: one fused Linear whose output is laid out per head,
    [q_h | k_h | v_h] (viewed (b, T, heads, 3, head_dim)), not [Q | K | V]. Red-team pass 12: read in thirds, every
    parameter-level invariant failed."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.h, self.hd, self.d_out = num_heads, d_out // num_heads, d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = self.qkv(x).view(b, T, self.h, 3, self.hd).permute(3, 0, 2, 1, 4)
        s = (q @ k.transpose(-1, -2)).masked_fill(_future(T, x.device), -torch.inf) / math.sqrt(self.hd)
        return self.out_proj((self.dropout(torch.softmax(s, dim=-1)) @ v).transpose(1, 2).reshape(b, T, self.d_out))


class RawLinearLayout(nn.Module):
    """Kind mha: bare Parameters under the seed's names in nn.Linear's (out, in) layout, used with F.linear (Megatron's
    ColumnParallelLinear keeps such a weight). Red-team pass 12: read as SelfAttention_v1's (in, out), a square one
    failed and a non-square one crashed the oracle (an internal error)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads):
        super().__init__()
        self.h, self.hd, self.d_out = num_heads, d_out // num_heads, d_out
        self.W_query, self.W_key, self.W_value = (nn.Parameter(torch.empty(d_out, d_in)) for _ in range(3))
        for w in (self.W_query, self.W_key, self.W_value):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (F.linear(x, w).view(b, T, self.h, self.hd).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        s = (q @ k.transpose(-1, -2)).masked_fill(_future(T, x.device), -torch.inf) / math.sqrt(self.hd)
        return self.out_proj((self.dropout(torch.softmax(s, dim=-1)) @ v).transpose(1, 2).reshape(b, T, self.d_out))


class _FeedForwardOutputFirst(nn.Module):
    """Linear(4e, e) registered before Linear(e, 4e)."""

    def __init__(self, emb):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(4 * emb, emb), nn.Linear(emb, 4 * emb), GELU()

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class FeedForwardReversedRegistration(nn.Module):
    """Kind transformer-block: the seed's block with a feed-forward whose output Linear is registered first. Red-team
    pass 12: read in registration order, feedforward-gelu-tanh failed and the oracle crashed."""

    def __init__(self, cfg):
        super().__init__()
        e = cfg["emb_dim"]
        self.att = MultiHeadAttention(e, e, cfg["context_length"], cfg["dropout"], cfg["num_heads"], cfg["qkv_bias"])
        self.ff = _FeedForwardOutputFirst(e)
        self.norm1, self.norm2 = LayerNorm(e), LayerNorm(e)
        self.drop_shortcut = nn.Dropout(cfg["dropout"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


MODULES += [("mha", "NeoXFusedQKV"), ("mha", "RawLinearLayout"), ("transformer-block", "FeedForwardReversedRegistration")]


class HeadsVisitedLastFirst(MultiHeadAttention):
    """Kind mha: one softmax per head, the heads visited last to first, their outputs put back in order. Red-team pass
    12: the per-head calls were stacked in call order, and the weights of head h met the oracle's of head H - 1 - h."""

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (w(x).view(b, T, self.num_heads, self.head_dim) for w in (self.W_query, self.W_key, self.W_value))
        outs = [None] * self.num_heads
        for h in reversed(range(self.num_heads)):
            s = (q[:, :, h] @ k[:, :, h].transpose(1, 2)).masked_fill(_future(T, x.device), -torch.inf)
            outs[h] = self.dropout(torch.softmax(s / math.sqrt(self.head_dim), dim=-1)) @ v[:, :, h]
        return self.out_proj(torch.cat(outs, dim=-1))


MODULES += [("mha", "HeadsVisitedLastFirst")]

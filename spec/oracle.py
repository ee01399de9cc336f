"""The reference: attention written from the math, evaluated in float64 (or any dtype, to measure
the error a correct implementation makes in that dtype; see spec.tolerance).

Projections use nn.Linear's layout: y = x W^T + b with W of shape (out, in)."""

import math

import torch


def cast(parts, dtype):
    """The projections tree (dicts, lists, tuples of tensors) detached and cast to ``dtype``."""
    if isinstance(parts, torch.Tensor):
        return parts.detach().to(dtype)
    if isinstance(parts, dict):
        return {k: cast(v, dtype) for k, v in parts.items()}
    if isinstance(parts, (list, tuple)):
        return type(parts)(cast(v, dtype) for v in parts)
    return parts


def linear(x, weight_bias):
    weight, bias = weight_bias
    y = x @ weight.T
    return y if bias is None else y + bias


def causal_mask(num_tokens, device=None, window=None):
    """True where query i may not attend key j: the future j > i, and with a sliding window w also
    j <= i - w (Mistral's convention: query i attends the w keys i - w < j <= i, itself included)."""
    ones = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device)
    return ones.triu(1) if window is None else ones.triu(1) | ones.tril(-window)


def softmax(scores):
    """softmax over the last dim. In float64 (the reference) torch's, which subtracts the row max; in a
    low precision (measuring the error a correct module makes, spec.tolerance) exp(s - logsumexp(s)),
    the formula of flash attention and every online softmax: rounding logsumexp(s) moves every weight by
    a relative eps * |s|, where subtracting the max is exact near the max, so it is the less accurate of
    the two correct formulas and a module using either stays within the error measured with it."""
    if scores.dtype == torch.float64:
        return torch.softmax(scores, dim=-1)
    return (scores - scores.logsumexp(-1, keepdim=True)).exp()


def attention_weights(queries, keys, causal, d_k=None, window=None):
    """softmax(Q K^T / sqrt(d_k)), masked scores (causal_mask) set to -inf first when causal. (..., T, T).
    d_k defaults to the key width (the head dim). In float64 the queries are scaled (one pass over (T, d), not
    (T, T): the same weights to ~1e-16); in a low precision the scores, as the seed does."""
    scale = math.sqrt(d_k or keys.shape[-1])
    if queries.dtype == torch.float64:
        scores = (queries / scale) @ keys.transpose(-2, -1)
    else:
        scores = queries @ keys.transpose(-2, -1) / scale
    if causal:
        scores.masked_fill_(causal_mask(scores.shape[-1], scores.device, window), -math.inf)
    return softmax(scores)


def split_heads(t, num_heads):
    """(..., T, D) -> (..., H, T, D/H): head h takes columns [h*D/H, (h+1)*D/H)."""
    *lead, T, D = t.shape
    return t.reshape(*lead, T, num_heads, D // num_heads).transpose(-3, -2)


def merge_heads(t):
    """(..., H, T, hd) -> (..., T, H*hd), heads concatenated in order."""
    *lead, H, T, hd = t.shape
    return t.transpose(-3, -2).reshape(*lead, T, H * hd)


def repeat_kv(t, num_heads):
    """(..., G, T, hd) -> (..., H, T, hd): query head h uses K/V head h // (H / G) (each K/V head repeated
    for its group of H / G consecutive query heads, as repeat_interleave; Llama's repeat_kv)."""
    return t.repeat_interleave(num_heads // t.shape[-3], dim=-3)


def rotary(t, rope, offset=0, angles=torch.float64):
    """Rotary position embedding of (..., T, hd), rope = (base, r, interleaved): token t is at position
    p = offset + t; the first r dims form r/2 pairs, pair i rotated by the angle p * base^(-2i/r):
    (a, b) -> (a cos - b sin, a sin + b cos); dims r.. pass through (GPT-NeoX's partial rotary). Pairs
    are (2i, 2i+1) when interleaved (GPT-J, Meta's original Llama), else (i, i + r/2) (rotate_half:
    GPT-NeoX, Hugging Face Llama). The angles are computed in ``angles`` precision (real modules: float32,
    see spec.tolerance.ROPE_ANGLES), cos and sin rounded to t's dtype."""
    base, r, interleaved = rope
    T = t.shape[-2]
    inverse = base ** (-torch.arange(0, r, 2, dtype=torch.float64, device=t.device) / r)  # (r/2,)
    positions = torch.arange(T, dtype=torch.float64, device=t.device) + offset
    table = positions.to(angles)[:, None] * inverse.to(angles)  # (T, r/2)
    cos, sin = table.cos().to(t.dtype), table.sin().to(t.dtype)
    rotated, rest = t[..., :r], t[..., r:]
    if interleaved:
        a, b = rotated[..., 0::2], rotated[..., 1::2]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = rotated[..., : r // 2], rotated[..., r // 2:]
        rotated = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def attention(x, parts, *, causal, num_heads=1, d_k=None, num_kv_heads=None, rope=None, window=None,
              angles=torch.float64):
    """(output, weights (..., H, T, T)) of multi-head attention with parts' projections: num_kv_heads K/V
    heads (default num_heads) shared per group (repeat_kv), rope (see ``rotary``) applied to each head's
    queries and keys, a sliding window (causal_mask)."""
    q = split_heads(linear(x, parts["query"]), num_heads)
    k, v = (split_heads(linear(x, parts[n]), num_kv_heads or num_heads) for n in ("key", "value"))
    if rope is not None:
        q, k = rotary(q, rope, angles=angles), rotary(k, rope, angles=angles)
    weights = attention_weights(q, repeat_kv(k, num_heads), causal, d_k, window)
    context = merge_heads(weights @ repeat_kv(v, num_heads))
    return (linear(context, parts["out"]) if "out" in parts else context), weights


def features(kind, cfg):
    """The keyword arguments of ``attention`` for one attention of ``kind``: heads, K/V heads, rope, window."""
    num_heads, kv_heads = kind.oracle_heads(cfg)
    return dict(causal=kind.causal, num_heads=num_heads, num_kv_heads=kv_heads, rope=cfg.rope, window=cfg.window)


def head_slices(parts, num_heads, num_kv_heads=None, kv_head=None):
    """Single-head parts for each head h: rows [h*hd, (h+1)*hd) of the query projection, and rows
    [g*hd, (g+1)*hd) of the key/value projections, g = kv_head(h) among num_kv_heads (default num_heads)
    K/V heads; by default g = h // (num_heads / num_kv_heads), the grouping of ``repeat_kv``."""
    num_kv_heads = num_kv_heads or num_heads
    kv_head = kv_head or (lambda h: h // (num_heads // num_kv_heads))
    heads = []
    for h in range(num_heads):
        head = {}
        for name, index, count in (("query", h, num_heads), ("key", kv_head(h), num_kv_heads),
                                   ("value", kv_head(h), num_kv_heads)):
            weight, bias = parts[name]
            rows = slice(index * weight.shape[0] // count, (index + 1) * weight.shape[0] // count)
            head[name] = (weight[rows], None if bias is None else bias[rows])
        heads.append(head)
    return heads


def layer_norm(x, scale_shift, eps=1e-5, torch_var=False):
    """scale * (x - mean) / sqrt(biased var + eps) + shift, over the last dim. ``torch_var``: the variance by
    torch.var, which accumulates the squares in float32 for the half dtypes (the seed's LayerNorm; torch's layer_norm
    too), not as the mean of squares in x's dtype, which overflows float16 once a deviation passes 256."""
    scale, shift = scale_shift
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False) if torch_var else ((x - mean) ** 2).mean(-1, keepdim=True)
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    """The exact GELU: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


GELU = {"tanh": gelu_tanh, "erf": gelu_erf}  # by spec.variants.Contract.gelu


def transformer_block(x, parts, num_heads, gelu="tanh"):
    """x + att(LN1(x)), then + W2 gelu(W1 LN2(.) + b1) + b2 (eval: dropout is the identity)."""
    x = x + attention(layer_norm(x, parts["norm1"]), parts["att"], causal=True, num_heads=num_heads)[0]
    hidden = GELU[gelu](linear(layer_norm(x, parts["norm2"]), parts["ff"][0]))
    return x + linear(hidden, parts["ff"][1])


def reference(kind, cfg, parts, x, dtype=torch.float64, gelu="tanh", angles=torch.float64):
    """The eval-mode output a module of ``kind`` with projections ``parts`` must produce on x (rotary
    angles computed in ``angles`` precision)."""
    return evaluate(kind, cfg, cast(parts, dtype), x.detach().to(dtype), gelu, angles)


def reference_weights(kind, cfg, parts, x, dtype=torch.float64, d_k=None, angles=torch.float64):
    """The eval-mode attention weights, heads stacked: (..., H, T, T)."""
    parts, x = cast(parts, dtype), x.detach().to(dtype)
    if kind.structure == "block":
        x, parts = layer_norm(x, parts["norm1"]), parts["att"]
    if kind.structure == "wrapper":
        return torch.cat([attention(x, head, causal=True, d_k=d_k)[1] for head in parts], dim=-3)
    return attention(x, parts, d_k=d_k, angles=angles, **features(kind, cfg))[1]


def score_magnitude(kind, cfg, parts, x):
    """max |q_h,i| |k_h,j| / sqrt(head_dim) over heads, queries and keys, in float64: a bound on the
    scores the softmax sees (Cauchy-Schwarz; a rotary embedding keeps the norms). Rounding q, k or the
    scores in a low precision moves the weights by up to about eps * this (softmax is 1/2-Lipschitz in
    the max-norm), whatever the implementation."""
    parts, x = cast(parts, torch.float64), x.detach().to(torch.float64)
    if kind.structure == "block":
        x, parts = layer_norm(x, parts["norm1"]), parts["att"]
    if kind.structure == "wrapper":
        heads = parts
    else:
        f = features(kind, cfg)
        heads = head_slices(parts, f["num_heads"], f["num_kv_heads"])
    return max(float(linear(x, h["query"]).norm(dim=-1).max() * linear(x, h["key"]).norm(dim=-1).max())
               / math.sqrt(h["key"][0].shape[0]) for h in heads)


def renormalized_causal(weights, window=None):
    """The seed's first masking: zero the future (and what is outside the window) of softmax weights,
    then divide each row by its sum."""
    kept = weights.masked_fill(causal_mask(weights.shape[-1], weights.device, window), 0.0)
    return kept / kept.sum(-1, keepdim=True)


def evaluate(kind, cfg, parts, x, gelu="tanh", angles=torch.float64):
    """``reference`` without the cast: differentiable in x and in the tensors of ``parts``.

    A 1-D tensor of ``parts`` (a bias, a LayerNorm scale or shift) may also be given per token, of
    shape x.shape[:-1] + (n,): its gradient is then the per-token contribution to the bias's gradient."""
    if kind.structure == "block":
        return transformer_block(x, parts, cfg.num_heads, gelu)
    if kind.structure == "wrapper":
        return torch.cat([attention(x, head, causal=True)[0] for head in parts], dim=-1)
    return attention(x, parts, angles=angles, **features(kind, cfg))[0]


def output_from_weights(kind, cfg, parts, x, weights):
    """The output computed with the given attention weights (..., H, T, T) in place of the softmax's:
    out_proj(merge_h(weights_h @ V_h)) for mha, concat_h(weights_h @ V_h) for the wrapper, weights @ V
    for one head. In train mode, with the dropped weights the module applied, this is its output."""
    if kind.structure == "wrapper":
        return torch.cat([weights[..., h, :, :] @ linear(x, head["value"]) for h, head in enumerate(parts)], dim=-1)
    heads = weights.shape[-3]
    values = split_heads(linear(x, parts["value"]), heads * kind.oracle_heads(cfg)[1] // kind.oracle_heads(cfg)[0])
    context = merge_heads(weights @ repeat_kv(values, heads))
    return linear(context, parts["out"]) if "out" in parts else context

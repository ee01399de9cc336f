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


def causal_mask(num_tokens, device=None):
    """True above the diagonal: key position j > query position i is the future."""
    return torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).triu(1)


def attention_weights(queries, keys, causal, d_k=None):
    """softmax(Q K^T / sqrt(d_k)), future scores set to -inf first when causal. (..., T, T).
    d_k defaults to the key width (the head dim)."""
    scores = queries @ keys.transpose(-2, -1) / math.sqrt(d_k or keys.shape[-1])
    if causal:
        scores = scores.masked_fill(causal_mask(scores.shape[-1], scores.device), -math.inf)
    return torch.softmax(scores, dim=-1)


def split_heads(t, num_heads):
    """(..., T, D) -> (..., H, T, D/H): head h takes columns [h*D/H, (h+1)*D/H)."""
    *lead, T, D = t.shape
    return t.reshape(*lead, T, num_heads, D // num_heads).transpose(-3, -2)


def merge_heads(t):
    """(..., H, T, hd) -> (..., T, H*hd), heads concatenated in order."""
    *lead, H, T, hd = t.shape
    return t.transpose(-3, -2).reshape(*lead, T, H * hd)


def attention(x, parts, *, causal, num_heads=1, d_k=None):
    """(output, weights (..., H, T, T)) of multi-head attention with parts' projections."""
    q, k, v = (split_heads(linear(x, parts[n]), num_heads) for n in ("query", "key", "value"))
    weights = attention_weights(q, k, causal, d_k)
    context = merge_heads(weights @ v)
    return (linear(context, parts["out"]) if "out" in parts else context), weights


def head_slices(parts, num_heads):
    """Single-head parts for each head: rows [h*hd, (h+1)*hd) of the query/key/value projections."""
    heads = []
    for h in range(num_heads):
        head = {}
        for name in ("query", "key", "value"):
            weight, bias = parts[name]
            rows = slice(h * weight.shape[0] // num_heads, (h + 1) * weight.shape[0] // num_heads)
            head[name] = (weight[rows], None if bias is None else bias[rows])
        heads.append(head)
    return heads


def layer_norm(x, scale_shift, eps=1e-5):
    """scale * (x - mean) / sqrt(biased var + eps) + shift, over the last dim."""
    scale, shift = scale_shift
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
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


def reference(kind, cfg, parts, x, dtype=torch.float64, gelu="tanh"):
    """The eval-mode output a module of ``kind`` with projections ``parts`` must produce on x."""
    return evaluate(kind, cfg, cast(parts, dtype), x.detach().to(dtype), gelu)


def reference_weights(kind, cfg, parts, x, dtype=torch.float64, d_k=None):
    """The eval-mode attention weights, heads stacked: (..., H, T, T)."""
    parts, x = cast(parts, dtype), x.detach().to(dtype)
    if kind.name == "transformer-block":
        x, parts = layer_norm(x, parts["norm1"]), parts["att"]
    if kind.name == "mha-wrapper":
        return torch.cat([attention(x, head, causal=True, d_k=d_k)[1] for head in parts], dim=-3)
    num_heads = cfg.num_heads if kind.name in ("mha", "transformer-block") else 1
    return attention(x, parts, causal=kind.causal, num_heads=num_heads, d_k=d_k)[1]


def score_magnitude(kind, cfg, parts, x):
    """max |q_h,i . k_h,j| / sqrt(head_dim) over heads, queries and keys, in float64: the size of the
    scores the softmax sees. Rounding them in a low precision moves the weights by up to about
    eps * this (softmax is 1/2-Lipschitz in the max-norm), whatever the implementation."""
    parts, x = cast(parts, torch.float64), x.detach().to(torch.float64)
    if kind.name == "transformer-block":
        x, parts = layer_norm(x, parts["norm1"]), parts["att"]
    heads = parts if kind.name == "mha-wrapper" else head_slices(parts, cfg.num_heads if kind.name == "mha" or
                                                                 kind.name == "transformer-block" else 1)
    return max(float((linear(x, h["query"]) @ linear(x, h["key"]).transpose(-2, -1)).abs().max())
               / math.sqrt(h["key"][0].shape[0]) for h in heads)


def renormalized_causal(weights):
    """The seed's first masking: zero the future of softmax weights, then divide each row by its sum."""
    kept = weights.masked_fill(causal_mask(weights.shape[-1], weights.device), 0.0)
    return kept / kept.sum(-1, keepdim=True)


def evaluate(kind, cfg, parts, x, gelu="tanh"):
    """``reference`` without the cast: differentiable in x and in the tensors of ``parts``.

    A 1-D tensor of ``parts`` (a bias, a LayerNorm scale or shift) may also be given per token, of
    shape x.shape[:-1] + (n,): its gradient is then the per-token contribution to the bias's gradient."""
    if kind.name == "transformer-block":
        return transformer_block(x, parts, cfg.num_heads, gelu)
    if kind.name == "mha-wrapper":
        return torch.cat([attention(x, head, causal=True)[0] for head in parts], dim=-1)
    return attention(x, parts, causal=kind.causal, num_heads=cfg.num_heads if kind.name == "mha" else 1)[0]


def output_from_weights(kind, cfg, parts, x, weights):
    """The output computed with the given attention weights (..., H, T, T) in place of the softmax's:
    out_proj(merge_h(weights_h @ V_h)) for mha, concat_h(weights_h @ V_h) for the wrapper, weights @ V
    for one head. In train mode, with the dropped weights the module applied, this is its output."""
    if kind.name == "mha-wrapper":
        return torch.cat([weights[..., h, :, :] @ linear(x, head["value"]) for h, head in enumerate(parts)], dim=-1)
    heads = weights.shape[-3]
    context = merge_heads(weights @ split_heads(linear(x, parts["value"]), heads))
    return linear(context, parts["out"]) if "out" in parts else context

"""Theorems of the spec itself, tested on the oracle and the harness's own machinery."""

import itertools
import math

import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

from attnspec import oracle
from attnspec.errors import Violation
from attnspec.invariants.dropout import binomial_two_sided_p
from attnspec.probe import AttentionProbe
from attnspec.tolerance import allowed_error, assert_close

import pytest


@st.composite
def score_matrices(draw, max_tokens=6):
    """A (T, T) float64 score matrix with entries in [-30, 30]."""
    t = draw(st.integers(1, max_tokens), label="num_tokens")
    values = draw(st.lists(st.floats(-30, 30), min_size=t * t, max_size=t * t), label="scores")
    return torch.tensor(values, dtype=torch.float64).reshape(t, t)


@given(score_matrices())
def test_masked_softmax_equals_renormalized_masking(scores):
    """softmax(S with -inf above the diagonal) == tril(softmax(S)) / row sums, for any S."""
    masked = torch.softmax(scores.masked_fill(oracle.causal_mask(scores.shape[0]), -math.inf), -1)
    assert_close(masked, oracle.renormalized_causal(torch.softmax(scores, -1)), dtype=torch.float64,
                 magnitude=1.0, what="masked softmax vs renormalized masking")


@given(st.integers(1, 8), st.floats(0.0, 0.95), st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8))
def test_inverted_dropout_expectation_is_identity(n, p, weights):
    """E[m * w / (1-p)] = w, m ~ Bernoulli(1-p) per element: exact sum over all 2^n masks."""
    w = torch.tensor(weights[:n], dtype=torch.float64)
    expectation = torch.zeros_like(w)
    for mask in itertools.product((0, 1), repeat=n):
        m = torch.tensor(mask, dtype=torch.float64)
        probability = math.prod((1 - p) if keep else p for keep in mask)
        expectation += probability * m * w / (1 - p)
    assert_close(expectation, w, dtype=torch.float64, magnitude=1.0, what="E[dropout(w)]")


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**16))
def test_head_split_reshape_equals_per_head_loop(num_heads, head_dim, num_tokens, d_in, seed):
    """Splitting by reshape/transpose equals attending with each head's row slice, concatenated."""
    g = torch.Generator().manual_seed(seed)
    d_out = num_heads * head_dim
    parts = {n: (torch.randn(d_out, d_in, generator=g, dtype=torch.float64), None) for n in ("query", "key", "value")}
    x = torch.randn(2, num_tokens, d_in, generator=g, dtype=torch.float64)
    joint = oracle.attention(x, parts, causal=True, num_heads=num_heads)[0]
    looped = torch.cat([oracle.attention(x, h, causal=True)[0] for h in oracle.head_slices(parts, num_heads)], -1)
    note(f"d_out={d_out}")
    assert_close(joint, looped, dtype=torch.float64, what="reshape split vs per-head loop")


def test_gelu_tanh_matches_torch_tanh_approximation():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert_close(oracle.gelu_tanh(x), F.gelu(x, approximate="tanh"), dtype=torch.float64, what="gelu")


def test_assert_close_rejects_nan_and_names_the_worst_element():
    with pytest.raises(Violation, match="non-finite"):
        assert_close(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), dtype=torch.float32, what="x")
    with pytest.raises(Violation, match=r"index \(1,\)"):
        assert_close(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]), dtype=torch.float32, what="x")
    assert_close(torch.tensor([1.0, 2.0 + 1e-7]), torch.tensor([1.0, 2.0]), dtype=torch.float32, what="x")


def test_tolerance_grows_with_magnitude_and_shrinks_with_precision():
    assert allowed_error(torch.float32, 100.0) > allowed_error(torch.float32, 1.0)
    assert allowed_error(torch.float64, 1.0) < allowed_error(torch.float32, 1.0) < allowed_error(torch.bfloat16, 1.0)
    assert allowed_error(torch.float32, 1.0, measured=1e-3) >= 1e-3  # the measured oracle error dominates


def test_binomial_p_value_is_a_probability_and_flags_wrong_rates():
    assert binomial_two_sided_p(50, 100, 0.5) == pytest.approx(1.0)
    assert binomial_two_sided_p(0, 100, 0.5) < 1e-20  # "dropout" that zeroes nothing at p=0.5
    assert binomial_two_sided_p(3, 10, 0.3) > 0.5


@pytest.mark.parametrize("softmax", [torch.softmax, F.softmax, torch.Tensor.softmax, lambda s, dim: torch.nn.Softmax(dim)(s)],
                         ids=["torch.softmax", "F.softmax", "Tensor.softmax", "nn.Softmax"])
def test_probe_sees_every_softmax_spelling_and_the_applied_weights(softmax):
    scores, values = torch.randn(2, 3, 3), torch.randn(2, 3, 4)
    with AttentionProbe(3) as probe:
        weights = softmax(scores, dim=-1)
        renormalized = weights / weights.sum(-1, keepdim=True)
        renormalized @ values
    (head,) = probe.observation.heads
    assert torch.equal(head.weights, weights) and torch.equal(head.applied, renormalized)


def test_probe_records_the_weights_fused_attention_computes():
    q, k, v = torch.randn(3, 1, 2, 3, 4, dtype=torch.float64)
    with AttentionProbe(3) as probe:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (head,) = probe.observation.heads
    expected = torch.softmax((q @ k.transpose(-2, -1) / 2).masked_fill(torch.ones(3, 3).triu(1).bool(), -torch.inf), -1)
    torch.testing.assert_close(head.weights, expected)
    torch.testing.assert_close(out, expected @ v)  # the module still gets the kernel's output


def _mha_parts(g, d_in, d_out, bias):
    parts = {n: (torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                 torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None) for n in ("query", "key", "value")}
    parts["out"] = (torch.randn(d_out, d_out, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64))
    return parts


@given(st.sampled_from(["causal-attention", "mha-wrapper", "mha"]), st.integers(1, 3), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**16))
def test_output_from_the_softmax_weights_is_the_reference(kind_name, num_heads, num_tokens, bias, seed):
    """output_from_weights(reference_weights) == reference: the train-mode check's formula is the oracle's."""
    from attnspec.kinds import KINDS, Config
    kind = KINDS[kind_name]
    heads = num_heads if kind.multi_head else 1
    cfg = Config(d_in=3, d_out=2 * heads, num_heads=heads, context_length=5, num_tokens=num_tokens, batch=2,
                 dropout=0.0, qkv_bias=bias, dtype="float64", scale=1.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if kind_name == "mha-wrapper":
        cfg = cfg.replace(d_out=2)
        parts = [{n: v for n, v in _mha_parts(g, 3, 2, bias).items() if n != "out"} for _ in range(heads)]
    else:
        parts = _mha_parts(g, 3, cfg.d_out, bias)
        if kind_name == "causal-attention":
            del parts["out"]
    x = torch.randn(2, num_tokens, 3, generator=g, dtype=torch.float64)
    weights = oracle.reference_weights(kind, cfg, parts, x)
    assert_close(oracle.output_from_weights(kind, cfg, parts, x, weights), oracle.reference(kind, cfg, parts, x),
                 dtype=torch.float64, what="output from the oracle's weights vs the oracle")


def test_per_token_biases_sum_to_the_bias_gradient():
    """evaluate() accepts a bias given per token: summed over tokens, its gradient is the bias's gradient
    (what gradient-oracle uses to see the terms of a bias gradient)."""
    from attnspec.kinds import KINDS, Config
    g = torch.Generator().manual_seed(0)
    cfg = Config(d_in=3, d_out=4, num_heads=2, context_length=5, num_tokens=5, batch=2, dropout=0.0, qkv_bias=True,
                 dtype="float64", scale=1.0, seed=0)
    parts, x = _mha_parts(g, 3, 4, True), torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    c = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    bias = parts["value"][1].clone().requires_grad_(True)
    per_token = parts["value"][1].expand(2, 5, 4).clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(oracle.evaluate(KINDS["mha"], cfg, {**parts, "value": (parts["value"][0], bias)}, x), bias, c)
    (tokens,) = torch.autograd.grad(oracle.evaluate(KINDS["mha"], cfg, {**parts, "value": (parts["value"][0], per_token)}, x),
                                    per_token, c)
    assert_close(tokens.sum((0, 1)), plain, dtype=torch.float64, what="summed per-token bias gradient vs bias gradient")


# --- modern attention: the oracle's RoPE, K/V grouping and window against Hugging Face's own code -----


@pytest.mark.parametrize("base,head_dim,fraction,interleaved",
                         [(10000.0, 8, 1.0, False), (100.0, 8, 0.5, False), (10.0, 4, 1.0, True), (500000.0, 16, 0.25, True)])
def test_rotary_is_hugging_faces(base, head_dim, fraction, interleaved):
    """Half-split: Llama's apply_rotary_pos_emb (rotate_half) with LlamaRotaryEmbedding's cos/sin, on the
    first fraction * head_dim dims (GPT-NeoX's partial rotary). Interleaved: GPT-J's rotate_every_two."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gptj import modeling_gptj
    from transformers.models.llama import modeling_llama

    r, T = round(fraction * head_dim), 7
    q, k = torch.randn(2, 3, T, head_dim, dtype=torch.float64), torch.randn(2, 3, T, head_dim, dtype=torch.float64)
    if interleaved:
        sincos = modeling_gptj.create_sinusoidal_positions(T, r).to(torch.float64)
        inverse = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)  # GPT-J's table has base 10000 built in
        angles = torch.arange(T, dtype=torch.float64)[:, None] * inverse
        if base == 10000.0:
            assert torch.allclose(sincos[:, : r // 2], angles.sin(), atol=1e-6)
        sin, cos = angles.sin()[None], angles.cos()[None]
        rotate = lambda t: torch.cat((modeling_gptj.apply_rotary_pos_emb(  # noqa: E731  (b, T, heads, r) layout
            t[..., :r].transpose(1, 2), sin, cos).transpose(1, 2), t[..., r:]), dim=-1)
        expected = rotate(q), rotate(k)
    else:
        config = transformers.LlamaConfig(hidden_size=3 * r, num_attention_heads=3, head_dim=r, rope_theta=base)
        cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(q.float(), torch.arange(T)[None])
        rotated = modeling_llama.apply_rotary_pos_emb(q[..., :r], k[..., :r], cos.double(), sin.double())
        expected = tuple(torch.cat((e, t[..., r:]), dim=-1) for e, t in zip(rotated, (q, k)))
    for got, want in zip((oracle.rotary(q, (base, r, interleaved)), oracle.rotary(k, (base, r, interleaved))), expected):
        assert_close(got, want, dtype=torch.float32, what="oracle RoPE vs Hugging Face's")


def test_repeat_kv_is_llamas():
    from_hf = pytest.importorskip("transformers.models.llama.modeling_llama")
    kv = torch.randn(2, 3, 5, 4)
    assert torch.equal(oracle.repeat_kv(kv, 6), from_hf.repeat_kv(kv, 2))


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_window_mask_is_mistrals(window):
    """Query i attends key j iff i - w < j <= i: Hugging Face's sliding_window_causal_mask_function."""
    masking = pytest.importorskip("transformers.masking_utils")
    allowed = masking.sliding_window_causal_mask_function(window)
    T = 6
    t = torch.tensor
    expected = torch.tensor([[not bool(allowed(t(0), t(0), t(i), t(j))) for j in range(T)] for i in range(T)])
    assert torch.equal(oracle.causal_mask(T, window=window), expected)

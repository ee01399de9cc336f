"""Hypothesis strategies for configurations. They shrink toward the smallest readable case:
one head, few tokens, batch 1, dropout 0, no bias, unit scale, float32, seed 0."""

from hypothesis import strategies as st

from attnspec.kinds import Config

MAX_DIM = 8  # small shapes first: the bugs in attention code show at d <= 8 as well as at 768
MAX_HEADS = 4
MAX_CONTEXT = 8
MAX_BATCH = 3

# Input magnitudes where float32 comparisons are well conditioned, tiny included (LayerNorm's eps).
MODERATE_SCALES = st.sampled_from([1.0, 0.1, 3.0, 1e-3])
# Magnitudes where exp(score) overflows without max-subtraction (scores >> 88 in float32).
LARGE_SCALES = st.sampled_from([1e3, 1e2, 1e4])
DROPOUTS = st.one_of(st.just(0.0), st.floats(0.05, 0.9).map(lambda p: round(p, 3)), st.just(0.5))
NONZERO_DROPOUTS = st.floats(0.05, 0.9).map(lambda p: round(p, 3)) | st.sampled_from([0.5, 0.1])


@st.composite
def configs(
    draw,
    kind,
    *,
    dtypes=("float32", "float64"),
    device="cpu",
    scales=MODERATE_SCALES,
    dropouts=DROPOUTS,
    min_batch=1,
    min_tokens=1,
    qkv_bias=None,
    sizes=None,
):
    """A valid Config for ``kind``.

    ``sizes`` (a dict of fixed d_in/d_out/num_heads/context_length) pins the model size, e.g. GPT-2's,
    while tokens, batch, dropout, dtype and seed are still drawn."""
    if sizes:
        num_heads, d_out, d_in, context_length = (sizes[k] for k in ("num_heads", "d_out", "d_in", "context_length"))
        if not kind.multi_head:
            num_heads, d_out = 1, d_out // sizes["num_heads"]
    else:
        num_heads = draw(st.integers(1, MAX_HEADS), label="num_heads") if kind.multi_head else 1
        if kind.name in ("mha", "transformer-block"):
            d_out = num_heads * draw(st.integers(1, MAX_DIM // 2), label="head_dim")
        else:
            d_out = draw(st.integers(1, MAX_DIM), label="d_out")
        d_in = d_out if kind.name == "transformer-block" else draw(st.integers(1, MAX_DIM), label="d_in")
        context_length = draw(st.integers(max(1, min_tokens), MAX_CONTEXT), label="context_length")
    # Both ends matter: one token, and a full-length sequence (the whole mask in use).
    num_tokens = draw(
        st.one_of(st.just(context_length), st.integers(min(min_tokens, context_length), context_length)),
        label="num_tokens",
    )
    batch = draw(st.integers(min_batch, MAX_BATCH), label="batch") if kind.batched else 1
    return Config(
        d_in=d_in,
        d_out=d_out,
        num_heads=num_heads,
        context_length=context_length,
        num_tokens=num_tokens,
        batch=batch,
        dropout=draw(dropouts, label="dropout") if kind.has_dropout else 0.0,
        qkv_bias=draw(st.booleans(), label="qkv_bias") if qkv_bias is None else qkv_bias,
        dtype=draw(st.sampled_from(dtypes), label="dtype"),
        scale=draw(scales, label="scale"),
        seed=draw(st.integers(0, 2**16), label="seed"),
        device=device,
    )

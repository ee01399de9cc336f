"""Hypothesis strategies for configurations. They shrink toward the smallest readable case:
one head, few tokens, batch 1, dropout 0, no bias, unit scale, no offset, float32, seed 0.

Sizes come in regimes, drawn first. ``small`` is the first, so shrinking ends there (d <= 8, T <= 8).
The others cross the boundaries real kernels tile and branch on (blocks of 16/32/64/128 keys, fast
paths for head_dim >= 8, micro-batches), one dimension large at a time so that each example stays
cheap (an invariant may loop over cuts, batch elements or 1024 dropout draws):

* ``long``: num_tokens and context_length up to 130, around 16, 32, 64 and 128; 1-2 heads of <= 4 dims;
* ``wide``: head_dim 8, 16, 32, 64 or 128 (d_in up to 64), 1-2 heads, <= 17 tokens or a length around 32 and
  64 (fused paths branch on head_dim and length together: SDPA-style kernels for head_dim % 8 == 0, T >= 32);
* ``many``: 5-16 heads, batch 5-8, <= 8 tokens of <= 4 dims per head;
* ``longest`` (only where an invariant names it): 257-520 tokens, where positions rounded in bfloat16 differ;
* ``most`` and ``widest`` (likewise): 17-32 heads with batch 9-16 (<= 8 tokens of <= 4 dims), and head_dim 256, 96 or 80.

``REGIMES`` lists ``long`` three times in eight (tiling bugs need many tokens) and ``wide`` twice (fused paths
branch on head_dim and on it together with the number of heads); Hypothesis draws the first entry more often
than the others, so about half of the examples stay small."""

from functools import lru_cache

from hypothesis import strategies as st

from attnspec.kinds import DEFAULT_DTYPES, Config

MAX_DIM = 8  # the small regime: the bugs in attention code show at d <= 8 as well as at 768
MAX_HEADS = 4
MAX_CONTEXT = 8
MAX_BATCH = 3

REGIMES = ("small", "long", "wide", "many", "long", "wide", "many", "long")  # sampled_from shrinks to the first
LONG_LENGTHS = (17, 33, 65, 129, 16, 32, 64, 128, 15, 31, 63, 127, 130)  # tile edges and their neighbours
# Past 256 and 512 tokens: integer positions computed in bfloat16 round there (spacing 2, then 4). Drawn only
# by invariants that name the "longest" regime (one forward pass at a few hundred tokens is cheap, a loop is not).
LONGEST_LENGTHS = (300, 257, 520)
WIDE_HEAD_DIMS = (8, 16, 32, 64, 128)
MAX_WIDE_CONTEXT = 17
WIDE_LENGTHS = (33, 65, 32, 64, 31, 63)  # wide and long at once (after the short contexts)
MANY_HEADS, MANY_BATCH = (5, 16), (5, 8)  # past 8 heads: GPT-2's 12, kernels' groups of 8
# Drawn only by invariants that name these regimes (one forward pass): past 16 heads and 8 batch elements at once
# (Llama's 32 heads, kernels' groups of 16, micro-batches of 8), and Gemma's head_dim 256.
MOST_HEADS, MOST_BATCH = (17, 32), (9, 16)
WIDEST_HEAD_DIMS = (256, 96, 80)  # Gemma; Phi-3-mini and Phi-2: not multiples of 64
EXTREME_REGIMES = ("longest", "most", "widest")  # an invariant's ``extreme_dtype`` is theirs

# Input magnitudes where float32 comparisons are well conditioned (tiny included: LayerNorm's eps).
MODERATE_SCALES = st.sampled_from([1.0, 0.1, 3.0, 1e-3])
SCALES = MODERATE_SCALES
# Moderate, then large: scores ~1e4..1e6, where a mask filled with -1e4 instead of -inf leaks. For
# invariants that compare a module with itself or with exact zeros (causality, the weights).
WIDE_SCALES = st.sampled_from([1.0, 0.1, 3.0, 1e-3, 1e2, 1e3])
# Magnitudes where exp(score) overflows without max-subtraction (scores >> 88 in float32).
LARGE_SCALES = st.sampled_from([1e3, 1e2, 1e4])
# The input is offset + scale * N(0, 1): off-centre input shows one-pass variances E[x^2] - E[x]^2.
OFFSETS = st.sampled_from([0.0, 0.0, 10.0, -3.0, 100.0])
ZERO_OFFSET = st.just(0.0)
# A feature of 300 in every token of a block's input (an LLM's "massive activations"): in float16 its squared
# deviation (> 65504 from 7 features on) overflows a LayerNorm that squares in the input's dtype.
OUTLIERS = st.sampled_from([0.0, 300.0])
# Rates other than 0.5 show 1-p vs p mix-ups; a grid is as good as floats and cheaper to draw.
RATES = (0.1, 0.25, 0.05, 0.9, 0.6, 0.333, 0.75, 0.2, 0.45, 0.8)
DROPOUTS = st.one_of(st.just(0.0), st.sampled_from(RATES), st.just(0.5))
ZERO_DROPOUT = st.just(0.0)
NONZERO_DROPOUTS = st.sampled_from((0.5,) + RATES)
# Rates at which an output dropped twice (weights, then output) keeps both with probability (1 - p)^2 >= 0.1: its
# rarest pattern is seen ~100 times in dropout-unbiased's 1024 draws (see dropout.unbiased_draws; p <= 0.6 here).
MODERATE_DROPOUTS = st.sampled_from([p for p in (0.5,) + RATES if (1 - p) ** 2 >= 0.1])
ROPE_BASES = (10000.0, 10.0, 500000.0, 100.0)  # Llama 2, small (angles that turn fast), Llama 3, ...
ROPE_FRACTIONS = (1.0, 0.5, 0.25)  # of head_dim rotated (GPT-NeoX: 0.25)
BOOLEANS, SEEDS = st.booleans(), st.integers(0, 2**16)
_ints = lru_cache(maxsize=None)(st.integers)  # strategies built once: drawing is ~1/3 of a small example's cost
_pick = lru_cache(maxsize=None)(st.sampled_from)


@lru_cache(maxsize=None)
def _tokens(low, context_length):
    """Both ends matter: a full-length sequence (the whole mask in use), or a shorter one, down to ``low``."""
    if context_length <= low:
        return st.just(context_length)
    return st.one_of(st.just(context_length), st.integers(low, context_length - 1))


@lru_cache(maxsize=None)
def _wide_contexts(low):
    """context_length in the wide regime: short (<= 17), else around 32 and 64."""
    return st.one_of(_ints(low, MAX_WIDE_CONTEXT), _pick(WIDE_LENGTHS))


def _sizes(draw, kind, regime, min_tokens, min_batch):
    """(num_heads, head_dim, d_in, context_length, num_tokens, batch) of ``regime``."""
    heads = {"small": (1, MAX_HEADS), "long": (1, 2), "longest": (1, 2), "wide": (1, 2), "widest": (1, 2),
             "many": MANY_HEADS, "most": MOST_HEADS}[regime]
    num_heads = draw(_ints(*heads), label="num_heads") if kind.multi_head else 1
    if regime in ("wide", "widest"):
        head_dim = draw(_pick(WIDE_HEAD_DIMS if regime == "wide" else WIDEST_HEAD_DIMS), label="head_dim")
        d_in = draw(_pick((head_dim, 8, 16, 64)), label="d_in")
    elif kind.rotary:  # even: the rotated dims come in pairs
        head_dim = 2 * draw(_ints(1, MAX_DIM // 4), label="head_dim / 2")
        d_in = draw(_ints(1, MAX_DIM), label="d_in")
    else:
        top = MAX_DIM // 2 if kind.head_split or regime != "small" else MAX_DIM  # head_split: d_out = num_heads * head_dim
        head_dim = draw(_ints(1, top), label="head_dim")
        d_in = draw(_ints(1, MAX_DIM), label="d_in")
    low = max(1, min_tokens)
    if regime in ("long", "longest"):
        lengths = LONG_LENGTHS if regime == "long" else LONGEST_LENGTHS
        context_length = draw(_pick(lengths), label="context_length")
        shorter = tuple(t for t in lengths if low <= t < context_length)
        num_tokens = draw(st.one_of(st.just(context_length), _pick(shorter)) if shorter else st.just(context_length),
                          label="num_tokens")
    elif regime in ("wide", "widest"):
        context_length = draw(_wide_contexts(low), label="context_length")
        num_tokens = draw(_tokens(min_tokens, context_length), label="num_tokens")
    else:
        context_length = draw(_ints(low, MAX_CONTEXT), label="context_length")
        num_tokens = draw(_tokens(min_tokens, context_length), label="num_tokens")
    batches = {"many": MANY_BATCH, "most": MOST_BATCH, "small": (1, MAX_BATCH)}.get(regime, (1, 2))
    batch = draw(_ints(max(min_batch, batches[0]), max(min_batch, batches[1])), label="batch") if kind.batched else 1
    return num_heads, head_dim, d_in, context_length, num_tokens, batch


@st.composite
def configs(
    draw,
    kind,
    *,
    dtypes=DEFAULT_DTYPES,
    device="cpu",
    scales=SCALES,
    offsets=OFFSETS,
    dropouts=DROPOUTS,
    min_batch=1,
    min_tokens=1,
    qkv_bias=None,
    sizes=None,
    regimes=REGIMES,
    require=(),
    extreme_dtype=None,
    outliers=None,
):
    """A valid Config for ``kind``.

    ``sizes`` (a dict of fixed d_in/d_out/num_heads/context_length) pins the model size, e.g. GPT-2's,
    while tokens, batch, dropout, dtype and seed are still drawn. ``regimes`` restricts the size
    regimes (an invariant whose cost grows with every dimension at once may leave one out). ``require``
    names optional features (spec.kinds.OPTIONAL) drawn always on: "rotary", "sliding_window", and "grouped_kv",
    groups that show, 1 < num_kv_heads < num_heads, where num_heads has such a divisor. ``extreme_dtype``: the
    dtype of every example of the EXTREME_REGIMES (an invariant that checks positions there: "bfloat16", which
    rounds them past 256; one whose comparison is ill-conditioned in half precision at those sizes: "float32").
    ``outliers``: a strategy for ``Config.outlier`` (else 0)."""
    regime = None
    if sizes:
        num_heads, d_out, d_in, context_length = (sizes[k] for k in ("num_heads", "d_out", "d_in", "context_length"))
        if not kind.multi_head:
            num_heads, d_out = 1, d_out // sizes["num_heads"]
        num_tokens = draw(_tokens(min_tokens, context_length), label="num_tokens")
        batch = draw(_ints(min_batch, MAX_BATCH), label="batch") if kind.batched else 1
    else:
        regime = draw(_pick(tuple(regimes)), label="size regime")
        num_heads, head_dim, d_in, context_length, num_tokens, batch = _sizes(draw, kind, regime, min_tokens, min_batch)
        d_out = num_heads * head_dim if kind.head_split else head_dim
        if kind.structure == "block":
            d_in = d_out
    return Config(
        d_in=d_in,
        d_out=d_out,
        num_heads=num_heads,
        context_length=context_length,
        num_tokens=num_tokens,
        batch=batch,
        dropout=draw(dropouts, label="dropout") if kind.has_dropout else 0.0,
        qkv_bias=draw(BOOLEANS, label="qkv_bias") if qkv_bias is None else qkv_bias,
        dtype=(extreme_dtype if regime in EXTREME_REGIMES and extreme_dtype in dtypes
               else draw(_pick(tuple(dtypes)), label="dtype")),
        scale=draw(scales, label="scale"),
        offset=draw(offsets, label="offset"),
        seed=draw(SEEDS, label="seed"),
        device=device,
        outlier=0.0 if outliers is None else draw(outliers, label="outlier feature"),
        **_modern_features(draw, kind, num_heads, d_out // num_heads, num_tokens, require),
    )


def _divisors(n):
    """Divisors of n, n first (plain multi-head attention: the simplest) down to 1 (multi-query)."""
    return tuple(d for d in range(n, 0, -1) if n % d == 0)


def _windows(num_tokens):
    """Windows shorter than the sequence (small ones, half, one short, and tile edges), then one as long.
    Not 1: each query would attend itself only, its query and key then have no influence, and their
    gradients (0 in exact arithmetic) are rounding that a correct fused kernel makes."""
    edges = (2, 3, num_tokens // 2, num_tokens - 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128)
    return tuple(sorted({w for w in edges if 2 <= w < num_tokens})) + (max(2, num_tokens),)


def _modern_features(draw, kind, num_heads, head_dim, num_tokens, require=()):
    """The Config fields of the kind's optional features (spec.kinds.OPTIONAL), drawn off first: K/V heads
    among the divisors of num_heads (proper ones with "grouped_kv" in ``require``), rotary embeddings (base, fraction of head_dim rotated, layout), a
    sliding window (shorter than the sequence, around tile edges, or as long); those in ``require`` always on."""
    features = {}
    if kind.grouped_kv:
        grouped = tuple(d for d in _divisors(num_heads) if 1 < d < num_heads) if "grouped_kv" in require else ()
        features["num_kv_heads"] = draw(_pick(grouped or _divisors(num_heads)), label="num_kv_heads")
    if kind.rotary and head_dim % 2 == 0 and ("rotary" in require or draw(BOOLEANS, label="rotary")):
        fractions = tuple(f for f in ROPE_FRACTIONS if (f * head_dim) % 2 == 0 and f * head_dim >= 2)
        features.update(rope_base=draw(_pick(ROPE_BASES), label="rope_base"),
                        rope_fraction=draw(_pick(fractions), label="rope_fraction"),
                        rope_interleaved=draw(BOOLEANS, label="rope_interleaved"))
    if kind.sliding_window and ("sliding_window" in require or draw(BOOLEANS, label="sliding window")):
        features["window"] = draw(_pick(_windows(num_tokens)), label="window")
    return features


# Real sizes that the search draws rarely or never (it makes one dimension large at a time), each checked once,
# after a search that passed, by the invariants that name them (``landmarks=True``). ``group``: query heads per
# K/V head where the kind groups them.
LANDMARKS = (
    # Past 1024 tokens (key chunks of 1024, the default of xformers and Rabe-Staats kernels; mask and position buffers
    # capped there), with 17 MB of float32 scores (batch x heads x T x T: past memory budgets that chunk the queries).
    dict(num_tokens=1031, context_length=1031, batch=2, num_heads=2, head_dim=8, d_in=8, group=1, rope=(1.0, False)),
    # Long and wide at once, batch 4, groups of 4: tiled kernels taken for head_dim >= 64 past 128 tokens, head_dim
    # 96 (Phi-3) padded to a power of two, packed GQA groups, packed prefill of a batch of prompts; 203 tokens (odd,
    # as in flash-attention's tests): paths that pad the sequence to a multiple of 8 or 16 and leave the pad unmasked.
    dict(num_tokens=203, context_length=203, batch=4, num_heads=4, head_dim=96, d_in=16, group=4, rope=(1.0, True)),
    # GPT-2's head_dim 64 past 512 tokens (long-context kernels and split-KV paths chosen by head size and length).
    # Rotary on half of the head (GPT-NeoX): a fused long-context rotary path that rotates the whole head.
    dict(num_tokens=520, context_length=520, batch=1, num_heads=1, head_dim=64, d_in=8, group=1, rope=(0.5, False)),
    # Llama's head_dim 128 with batch x heads 68 (scale tables keyed by head size, bmm paths that fold heads into
    # the batch past 64).
    dict(num_tokens=9, context_length=16, batch=17, num_heads=4, head_dim=128, d_in=16, group=2, rope=(0.25, False)),
)


def landmarks(kind, simplest, dtype=None):
    """The LANDMARKS as configurations of ``kind``: the sizes as ``configs`` lays them out for the kind, grouped K/V
    heads and rotary embeddings (each landmark its fraction of the head and layout) where the kind has them, in ``dtype`` (else the simplest's; an invariant's
    ``extreme_dtype``: large sizes in float32, where the comparison is well conditioned), the rest from ``simplest``
    (the invariant's own simplest configuration: its dropout, scale, seed)."""
    found = []
    for size in LANDMARKS:
        heads = size["num_heads"] if kind.multi_head else 1
        d_out = heads * size["head_dim"] if kind.head_split else size["head_dim"]
        features = dict(num_kv_heads=max(1, heads // size["group"])) if kind.grouped_kv else {}
        if kind.rotary:
            features.update(rope_base=ROPE_BASES[0], rope_fraction=size["rope"][0], rope_interleaved=size["rope"][1])
        found.append(simplest.replace(d_in=d_out if kind.structure == "block" else size["d_in"], d_out=d_out,
                                      num_heads=heads, context_length=size["context_length"],
                                      num_tokens=size["num_tokens"], batch=size["batch"] if kind.batched else 1,
                                      dtype=dtype or simplest.dtype, **features))
    return found


def is_small(cfg):
    """Whether ``cfg`` is within the small regime's sizes."""
    return (cfg.num_tokens <= MAX_CONTEXT and cfg.context_length <= MAX_CONTEXT and cfg.num_heads <= MAX_HEADS
            and cfg.d_out // cfg.num_heads <= MAX_DIM and cfg.d_in <= MAX_DIM and cfg.batch <= MAX_BATCH)


def fit_example(cfg, kind, *, dropouts=None, min_batch=1, min_tokens=1, dtypes=None, qkv_bias=None, require=(),
                outliers=None, **_):
    """A user-given configuration (``--example``) moved onto what an invariant's strategy can draw
    (same keywords as ``configs``): (config, list of the changes made). Only an invariant's needs
    are applied (dropout 0 or > 0, enough tokens or batch elements, its dtypes, qkv_bias, no outlier feature
    unless it draws one)."""
    changes = {}
    if dropouts is ZERO_DROPOUT and cfg.dropout != 0.0:
        changes["dropout"] = 0.0
    if dropouts in (NONZERO_DROPOUTS, MODERATE_DROPOUTS) and cfg.dropout == 0.0:
        changes["dropout"] = 0.5
    if cfg.num_tokens < min_tokens:
        changes["num_tokens"] = min_tokens
        if cfg.context_length < min_tokens:
            changes["context_length"] = min_tokens
    if kind.batched and cfg.batch < min_batch:
        changes["batch"] = min_batch
    if dtypes is not None and cfg.dtype not in dtypes:
        changes["dtype"] = dtypes[0]
    if qkv_bias is not None and cfg.qkv_bias != qkv_bias:
        changes["qkv_bias"] = qkv_bias
    if outliers is None and cfg.outlier:  # (an outlier is drawn only where an invariant names it)
        changes["outlier"] = 0.0
    if "sliding_window" in require and cfg.window is None:
        changes["window"] = max(2, changes.get("num_tokens", cfg.num_tokens) - 1)
    if "rotary" in require and cfg.rope_base is None and cfg.head_dim % 2 == 0:
        changes["rope_base"] = ROPE_BASES[0]
    described = [f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in changes.items()]
    return cfg.replace(**changes), described

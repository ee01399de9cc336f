"""Modern attention (Llama, Mistral, Qwen): grouped-query K/V heads, rotary position embeddings, sliding
windows. The features are a configuration's (spec.kinds.Config); the invariants here hold for the kinds
that have them, and every other invariant of the catalogue applies to those kinds too."""

import torch

from attnspec import oracle
from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import PADDING_KINDS, invariant
from attnspec.invariants.causality import _confirmed, _cuts, _magnitude, _replicas
from attnspec.invariants.history import after_a_first_call_in_bfloat16
from attnspec.invariants.weights import _first, observed_and_reference_weights, stacked
from attnspec.strategies import REGIMES, WIDE_SCALES
from attnspec.tolerance import (ROPE_ANGLES, allowed_error, assert_close, held_dtype, ill_conditioned,
                                rotary_angle_rounding, rotated_score_rounding, softmax_rounding)

GROUPED_KINDS = ROTARY_KINDS = WINDOW_KINDS = ("gqa",)


@invariant("grouped-query-kv-shared",
           "query head h attends with K/V head h // (num_heads/num_kv_heads): out = out_proj(concat_h attention(x; "
           "query rows of head h, key/value rows of K/V head h // group)), with the rotary embedding and window",
           GROUPED_KINDS, "params", require=("grouped_kv",))
def grouped_query_kv_shared(case):
    """Multi-head attention whose K/V projections are duplicated per group, written as num_heads single-head
    attentions. If the output instead matches query head h using K/V head h mod num_kv_heads, the report
    says so: K/V heads tiled (``repeat``, ``expand`` on the wrong axis) where they must be repeated in
    place (``repeat_interleave``, Llama's ``repeat_kv``)."""
    parts, x, cfg = case.projections(), case.input(), case.cfg
    if "out" not in parts:
        raise NotApplicable("no output projection found (out_proj, o_proj)")

    def per_head(dtype, held=torch.float64, kv_head=None, angles=torch.float64):
        p, xd = oracle.cast(oracle.cast(parts, held), dtype), x.to(held).to(dtype)
        heads = [oracle.attention(xd, head, causal=True, rope=cfg.rope, window=cfg.window, angles=angles)[0]
                 for head in oracle.head_slices(p, cfg.num_heads, cfg.kv_heads, kv_head)]
        return oracle.linear(torch.cat(heads, dim=-1), p["out"])

    expected, out = per_head(torch.float64), case.forward(x)
    measured = (per_head(x.dtype, held_dtype(x.dtype), angles=ROPE_ANGLES) - expected).abs().max()
    magnitude = max(expected.abs().max().item(), 1e-30)
    try:
        assert_close(out, expected, dtype=x.dtype, measured=measured, magnitude=magnitude,
                     what=f"output vs out_proj of {cfg.num_heads} single-head attentions, head h with K/V head "
                          f"h // {cfg.num_heads // cfg.kv_heads}")
    except Violation as mismatch:
        groups = cfg.kv_heads
        if 1 < groups < cfg.num_heads:
            tiled = per_head(torch.float64, kv_head=lambda h: h % groups)
            if (out.double() - tiled).abs().max().item() <= allowed_error(x.dtype, magnitude, measured):
                raise Violation(f"{mismatch}; the output matches query head h using K/V head h mod {groups}: the "
                                f"K/V heads are tiled (repeat/expand), expected each repeated for its group of "
                                f"{cfg.num_heads // groups} consecutive query heads (repeat_interleave)") from None
        raise


# Rotary mistakes the report names when the weights match them: (what the module does, the config it matches).
ROPE_MISTAKES = (
    ("the other pair layout", lambda c: c.replace(rope_interleaved=not c.rope_interleaved)),
    ("rope_base 10000 (the configured base ignored)", lambda c: c.replace(rope_base=10000.0)),
    ("every dim rotated (rope_fraction ignored)", lambda c: c.replace(rope_fraction=1.0)),
    ("no rotary embedding", lambda c: c.replace(rope_base=None, rope_fraction=1.0, rope_interleaved=False)),
)


def _layout(cfg):
    return "interleaved pairs (2i, 2i+1)" if cfg.rope_interleaved else f"half-split pairs (i, i + {cfg.rotary_dim // 2})"


@invariant("rotary-embedding",
           "with rotary embeddings, weights (on past positions) equal softmax((R_i q_i).(R_j k_j) / sqrt(head_dim)): "
           "R_p rotates pair k of the first rope_fraction*head_dim dims by p * rope_base^(-2k/r), in the configured layout",
           ROTARY_KINDS, "weights+params", require=("rotary",))
def rotary_embedding(case):
    """The oracle's RoPE (spec.oracle.rotary) on the module's own projections. A mismatch that another
    rotary configuration explains (ROPE_MISTAKES: the interleaved/half-split layout swapped, the base
    ignored, the fraction ignored, no rotation) is named."""
    cfg = case.cfg
    if cfg.rope is None:
        raise NotApplicable("needs rotary embeddings (rope_base) with an even head_dim", structural=False)
    parts, x = case.projections(), case.input()
    score_magnitude = oracle.score_magnitude(case.kind, cfg, parts, x)
    unusable = ill_conditioned(x.dtype, score_magnitude, rotary=True)
    if unusable:
        raise NotApplicable(unusable, structural=False)
    observed, expected, measured = observed_and_reference_weights(case, parts, x)
    try:
        assert_close(observed, expected, dtype=x.dtype, magnitude=1.0, measured=measured,
                     bound=softmax_rounding(x.dtype, score_magnitude, rotary=True),
                     what=f"attention weights vs the oracle's with RoPE (base {cfg.rope_base:g}, {cfg.rotary_dim} of "
                          f"{cfg.head_dim} dims rotated, {_layout(cfg)})")
    except Violation as mismatch:
        for label, change in ROPE_MISTAKES:
            other = change(cfg)
            if other == cfg or case.kind.invalid_reason(other):
                continue
            weights = oracle.reference_weights(case.kind, other, parts, x).reshape(expected.shape)
            if (observed.double() - weights).abs().max() <= 1e3 * max(measured.item(), 1e-7):
                raise Violation(f"{mismatch}; the weights match {label}"
                                f"{': ' + _layout(other) if label == 'the other pair layout' else ''}") from None
        raise


@invariant("rotary-relative-position",
           "scores depend on positions only through i - j: dropping the first k tokens leaves the scores among the "
           "others unchanged, S(x[k:])[i, j] = S(x)[k + i, k + j]",
           ROTARY_KINDS, "weights", require=("rotary",), min_tokens=2,
           regimes=("small", "long", "wide", "longest", "long"))  # positions far from 0: where angles round
def rotary_relative_position(case):
    """Black-box on the scores (the softmax input): with rotary embeddings (R_a q).(R_b k) = q.(R_{b-a} k), so
    the same tokens at positions shifted by k score the same. Compared on the attended positions
    i - w < j <= i where both scores are finite (masked scores, -inf or finfo.min, are the other invariants'),
    for k = 1 and k = num_tokens // 2. A rotation of the queries only, or of queries and keys by different
    positions, fails; so does any absolute position signal. In float16 and bfloat16 the scores are compared
    relative to their bound |q| |k| / sqrt(d) from the module's own projections (the scores themselves may
    cancel far below the rounding of q and k): angles computed in the half precision fail there."""
    x = case.input()
    T = x.shape[-2]
    half = x.dtype in (torch.float16, torch.bfloat16)
    if half:  # (n/a for this example without the projections: another is drawn)
        try:
            parts = case.projections()
        except NotApplicable as e:
            raise NotApplicable(f"in {case.cfg.dtype}: {e}", structural=False) from None
        bound = oracle.score_magnitude(case.kind, case.cfg, parts, x)
    _, seen = case.observe(x)
    full = stacked(case, x, seen, "scores").double()
    for k in sorted({1, T // 2} - {0}):
        suffix = x[:, k:].contiguous()
        _, seen_suffix = case.observe(suffix)
        shifted = stacked(case, suffix, seen_suffix, "scores").double()
        if shifted.shape != full[..., k:, k:].shape:
            raise Violation(f"scores of shape {tuple(shifted.shape)} for the last {T - k} tokens, expected "
                            f"{tuple(full[..., k:, k:].shape)}")
        reference = full[..., k:, k:]
        attended = ~oracle.causal_mask(T - k, reference.device, case.cfg.window)
        both = attended & torch.isfinite(shifted) & torch.isfinite(reference)
        magnitude = max(reference[both].abs().max().item() if both.any() else 0.0, 1e-30)
        rounding = rotated_score_rounding(x.dtype, bound) if half else rotary_angle_rounding(T, magnitude)
        assert_close(torch.where(both, shifted, 0.0), torch.where(both, reference, 0.0), dtype=x.dtype,
                     magnitude=magnitude, bound=rounding,
                     what=f"scores of x[:, {k}:] vs scores of x at positions >= {k} (the same tokens, shifted by {k})")


def _window_cuts(num_tokens, window):
    """Cuts c in [0, num_tokens - window - 1]: changing tokens <= c must leave outputs at i >= c + window."""
    return _cuts(num_tokens - window + 1)


@invariant("sliding-window",
           "with a window w, output at position i does not depend on tokens j <= i - w: changing tokens <= c leaves "
           "outputs at positions >= c + w unchanged",
           WINDOW_KINDS, "forward", require=("sliding_window",), min_tokens=2, scales=WIDE_SCALES)
def sliding_window(case):
    """Mistral's convention: query i attends key j iff i - w < j <= i. Holds vacuously when w >= num_tokens."""
    x, w = case.input(), case.cfg.window
    if w is None:
        raise NotApplicable("needs a sliding window", structural=False)
    T, b = x.shape[-2], x.shape[0]
    if w >= T:
        return
    out = case.forward(x)
    noise = -case.input(salt=1)
    cuts = _window_cuts(T, w)
    perturbed = _replicas(x, cuts)
    for i, c in enumerate(cuts):
        perturbed[i * b:(i + 1) * b, :c + 1] = noise[:, :c + 1]
    changed = case.forward(perturbed)
    for i, c in enumerate(cuts):
        def check(outputs, c=c):
            assert_close(outputs[:, c + w:], out[:, c + w:], dtype=x.dtype, magnitude=_magnitude(out, x),
                         what=f"outputs at positions >= {c + w} after changing tokens <= {c} (window {w})")
        _confirmed(check, changed[i * b:(i + 1) * b], lambda i=i: case.forward(perturbed[i * b:(i + 1) * b]))


@invariant("sliding-window-weights", "with a window w, w[i, j] == 0 exactly for every key j <= i - w",
           WINDOW_KINDS, "weights", require=("sliding_window",), scales=WIDE_SCALES)
def sliding_window_weights(case):
    w = case.cfg.window
    if w is None:
        raise NotApplicable("needs a sliding window", structural=False)
    _, seen = case.observe(case.input())
    for weights in seen.applied_weights():
        T = weights.shape[-1]
        outside = torch.ones(T, T, dtype=torch.bool, device=weights.device).tril(-w).expand_as(weights) & (weights != 0)
        if outside.any():
            index = _first(outside)
            raise Violation(f"key {index[-1]} is outside the window of query {index[-2]} (i - w < j <= i, w={w}) but "
                            f"has weight {weights[index].item():.4g} at index {index}")



CACHE_KINDS = ("gqa",)


def _cached_call(case, x, start, end, full, label, module=None, **kwargs):
    """module(x[:, start:end], use_cache=True, **kwargs) (the case's module by default), guarded; Violation unless it
    is a tensor shaped like full[:, start:end] (the output of the whole sequence's forward at those positions)."""
    what = f"forward(x[:, {start}:{end}], use_cache=True) {label}"
    out = case.guard(what, case.module if module is None else module, x[:, start:end].contiguous(), use_cache=True,
                     **kwargs)
    expected = tuple(full[:, start:end].shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise Violation(f"{what} returned {got}, expected a tensor of shape {expected}")
    return out


STEPS = 8  # single-token decoding steps at each end of a long sequence (the middle goes in one chunk)
PIECES = 9  # pieces of 3, 1, 2 tokens after the prefill of the chunked pass (then the rest in one)


def _token_steps(num_tokens):
    """Piece sizes of the token-by-token pass: every token alone, or at long sizes the first and the last
    STEPS tokens alone and one chunk between (decoding steps at the start and at positions up to T, ~17
    calls instead of T)."""
    if num_tokens <= 3 * STEPS:
        return [1] * num_tokens
    return [1] * STEPS + [num_tokens - 2 * STEPS] + [1] * STEPS


def _chunks(num_tokens):
    """Chunk sizes that cover num_tokens: a prefill of half the tokens, then up to PIECES pieces of 3, 1, 2,
    ..., then the rest in one."""
    sizes, left = [max(1, num_tokens // 2)], num_tokens - max(1, num_tokens // 2)
    for size in (3, 1, 2) * (PIECES // 3):
        if left <= 0:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes + ([left] if left > 0 else [])


def _in_mode(case, what, fn, *args):
    """A guarded cache call in the autograd mode the forwards run in (Case.autograd_mode)."""
    with case.autograd_mode():
        return case.guard(what, fn, *args)


@invariant("kv-cache-decoding",
           "decoding through the module's KV cache, forward(x[:, s:e], use_cache=True) piece by piece (token by "
           "token, then in chunks after reset_cache()), gives forward(x)[:, s:e] at every step; a plain forward "
           "midway neither reads nor writes the cache; after crop_cache(k), forward(x[:, k:], use_cache=True) gives forward(x)[:, k:] "
           "(k at or past the cached tokens: a no-op); and so after a generation in bfloat16 and reset_cache()",
           CACHE_KINDS, "forward", min_tokens=2, regimes=REGIMES[:-1] + ("longest",), landmarks=True,
           extreme_dtype="bfloat16")  # (bfloat16 positions past 256; the landmarks: a cache capped at 1024 tokens)
def kv_cache_decoding(case):
    """The cache contract of llms-from-scratch's KV-cache modules: ``forward(x, use_cache=True)`` appends
    x's keys and values to the cache and attends over every cached token, x's tokens taking the positions
    after the cached ones (rotary embeddings and the window included); ``reset_cache()`` empties it. A
    cache appended twice, a position that does not advance (RoPE or the mask at 0 for every new token),
    or a reset that forgets the position shows as a difference; so does a plain forward(x') (use_cache=False,
    another input, midway through the token-by-token pass) that reads the cache, or writes it (the decoding
    that follows shows). At long sizes the token-by-token pass decodes the first and last STEPS tokens alone
    and the middle in one chunk (``_token_steps``). Not applicable to a module without
    ``reset_cache``. A module with ``crop_cache(n)`` (Hugging Face's ``DynamicCache.crop``: keep the first n
    tokens) is also cropped, after decoding all T tokens, to k = 1 + seed mod (T - 1) and decodes x[:, k:] in
    one piece: a crop that keeps the wrong tokens or leaves the position at T shows; and, after the first
    chunk of the second pass, to n >= the tokens cached, which keeps them all (a static cache that moves its
    write position to n shows)."""
    module = case.module
    if not callable(getattr(module, "reset_cache", None)):
        raise NotApplicable("the module has no KV cache (forward(x, use_cache=True) and reset_cache(), as "
                            "llms-from-scratch's KV-cache modules)")
    x = case.input()
    full = case.forward(x)
    T, magnitude = x.shape[-2], _magnitude(full, x)

    def decode(start, size, label):
        out = _cached_call(case, x, start, start + size, full, f"({label})")
        assert_close(out, full[:, start:start + size], dtype=x.dtype, magnitude=magnitude,
                     what=f"{label}: outputs at positions {start}..{start + size - 1} after {start} cached tokens "
                          f"vs forward(x)")

    crop = callable(getattr(module, "crop_cache", None))
    other = case.input(salt=1)  # a plain forward midway through decoding runs on another input
    plain = case.forward(other)
    for label, sizes, first_pass in (("decoding token by token", _token_steps(T), True),
                                     ("decoding in chunks after reset_cache()", _chunks(T), False)):
        _in_mode(case, "reset_cache()", module.reset_cache)
        start = 0
        for i, size in enumerate(sizes):
            if first_pass and i == len(sizes) // 2:  # the rest of the decoding shows a write to the cache
                assert_close(case.forward(other), plain, dtype=x.dtype, magnitude=_magnitude(plain, other),
                             what=f"forward(x') with {start} tokens in the KV cache vs forward(x') with none (forward "
                                  f"without use_cache=True neither reads nor writes the cache)")
            decode(start, size, label)
            start += size
            if not first_pass and crop and i == 0 and start < T:  # a crop that keeps every cached token is a no-op
                n = min(T, start + case.cfg.seed % 3)
                _in_mode(case, f"crop_cache({n}) with {start} tokens cached", module.crop_cache, n)
                label = f"{label}, then crop_cache({n}) with {start} cached (a no-op)"
        if first_pass and crop:
            k = 1 + case.cfg.seed % (T - 1)
            _in_mode(case, f"crop_cache({k})", module.crop_cache, k)
            decode(k, T - k, f"decoding after crop_cache({k}) of {T} cached tokens")
    _in_mode(case, "reset_cache()", module.reset_cache)
    _after_decoding_in_bfloat16(case, x, full)


def _after_decoding_in_bfloat16(case, x, full):
    """A fresh module's first generation in bfloat16 (module.to(bfloat16), a cached prefill, reset_cache(), module.to
    back) leaves no trace: decoding in x's dtype in two pieces then gives its plain forward(x). A static cache
    allocated at its first use and kept across reset_cache() (Hugging Face's StaticCache.reset moves only the write
    position) stores the keys and values rounded to bfloat16. Skipped in bfloat16 itself and where the module does
    not run in bfloat16."""
    T = x.shape[-2]
    module = after_a_first_call_in_bfloat16(
        case, x, lambda module, low_x: _cached_call(case, low_x, 0, T, full, "(a prefill in bfloat16)", module=module))
    if module is None:
        return
    _in_mode(case, "reset_cache()", module.reset_cache)
    rounded = case.forward(x, module=module)  # (its parameters went through bfloat16: its own forward is the reference)
    for start, end in ((0, T // 2), (T // 2, T)):
        out = _cached_call(case, x, start, end, rounded, "after a generation in bfloat16 and reset_cache()", module=module)
        assert_close(out, rounded[:, start:end], dtype=x.dtype, magnitude=_magnitude(rounded, x),
                     what=f"decoding positions {start}..{end - 1} in {x.dtype} after a first generation in bfloat16 "
                          f"(module.to(bfloat16), a cached prefill, reset_cache(), module.to({x.dtype})) vs forward(x)")


def _padding(case, x):
    """(real, left, pads): p_b in [0, T-1] padded positions per batch row, drawn from the configuration's seed, at
    least 1 in row 0, or (batch >= 2, seed // 4 odd) none in row 0 and at least 1 in the last row (a shortcut that
    skips the mask when the first row is unpadded shows); on the left when seed // 2 is odd, else on the right;
    ``real`` (batch, T) bool, True at the real tokens."""
    if not case.takes_attention_mask():
        raise NotApplicable("forward takes no attention_mask: padding is checked as forward(x, attention_mask=m), m "
                            "(batch, num_tokens) bool, True at real tokens (Hugging Face's convention)")
    b, T = x.shape[0], x.shape[-2]
    pads = torch.randint(0, T, (b,), generator=torch.Generator().manual_seed(case.cfg.seed + 3))
    padded = b - 1 if b >= 2 and (case.cfg.seed // 4) % 2 == 1 else 0
    if padded:
        pads[0] = 0
    pads[padded] = max(int(pads[padded]), 1)
    left = (case.cfg.seed // 2) % 2 == 1
    position = torch.arange(T)
    real = position[None] >= pads[:, None] if left else position[None] < T - pads[:, None]
    return real.to(x.device), left, pads.tolist()


def _described(left, pads):
    return f"{'left' if left else 'right'} padding of {pads} positions per batch row"


@invariant("padding-mask",
           "with a padding mask m (batch, T), True at real tokens, left or right: outputs at real tokens do not depend "
           "on the padded positions' contents; with right padding they equal forward of each row's real prefix; "
           "decoded through a KV cache after a prefill, they equal the masked forward's; a mask of all real tokens "
           "after them gives forward(x)",
           PADDING_KINDS, "forward", min_tokens=2, scales=WIDE_SCALES)
def padding_mask(case):
    """Black-box: padded keys get zero weight at every real query i (softmax over the real keys j <= i of the
    window), so (a) replacing the padded positions' contents by other values leaves the outputs at real
    tokens unchanged (left and right padding), and (b) with right padding a row of n real tokens gives
    forward(x[:, :n]) at its real tokens (the same positions, no padded key attended), and (c) a module with a
    KV cache (``reset_cache``) that prefills x[:, :k] with m[:, :k] and then decodes x[:, k:] with m (cached and
    new tokens) gives the outputs at real tokens of the masked forward (k = T // 2): generation from a padded
    batch; after reset_cache() it decodes x without a mask as forward(x); (d) then forward(x) with a mask of all real tokens equals forward(x) without one (a mask memoised by
    shape, not by contents, is reused). Outputs at padded positions are not constrained. Not applicable to a
    module whose forward takes no ``attention_mask``."""
    x = case.input()
    real, left, pads = _padding(case, x)
    what = _described(left, pads)
    out = case.forward(x, attention_mask=real)
    keep = real[..., None]
    other = torch.where(keep, x, case.input(salt=1))
    changed = case.forward(other, attention_mask=real)
    magnitude = _magnitude(torch.where(keep, out, 0.0), x)
    assert_close(torch.where(keep, changed, 0.0), torch.where(keep, out, 0.0), dtype=x.dtype, magnitude=magnitude,
                 what=f"{what}: outputs at real tokens after changing the padded positions' contents")
    plain = case.forward(x)
    assert_close(case.forward(x, attention_mask=torch.ones_like(real)), plain, dtype=x.dtype,
                 magnitude=magnitude, what=f"after calls with {what}: forward with a mask of all real tokens vs without a mask")
    if callable(getattr(case.module, "reset_cache", None)):
        _padded_decoding(case, x, real, out, plain, magnitude, what)
    if left:
        return
    T = x.shape[-2]
    for n in sorted({T - p for p in pads}):
        rows = [i for i, p in enumerate(pads) if T - p == n]
        alone = case.forward(x[rows, :n].contiguous())
        assert_close(out[rows, :n], alone, dtype=x.dtype, magnitude=magnitude,
                     what=f"{what}: outputs at the {n} real tokens of batch rows {rows} vs forward(x[{rows}, :{n}])")


def _padded_decoding(case, x, real, out, plain, magnitude, what):
    """(c) of padding-mask: prefill x[:, :k] with m[:, :k], decode x[:, k:] with m; outputs at real tokens. Then,
    after reset_cache(), the same decoding without a mask gives forward(x) (``plain``): a padding mask kept for
    the decoding steps that pass none (generate()'s convenience) must not outlive reset_cache()."""
    module, T = case.module, x.shape[-2]
    k = max(1, T // 2)
    _in_mode(case, "reset_cache()", module.reset_cache)
    for start, end, mask in ((0, k, real[:, :k]), (k, T, real)):
        got = _cached_call(case, x, start, end, out, f"with attention_mask=m[:, :{end}]", attention_mask=mask.contiguous())
        keep = real[:, start:end, None]
        assert_close(torch.where(keep, got, 0.0), torch.where(keep, out[:, start:end], 0.0), dtype=x.dtype,
                     magnitude=magnitude, what=f"{what}: outputs at real tokens {start}..{end - 1} decoded through the "
                                               f"KV cache (prefill of {k} tokens) vs the masked forward")
    _in_mode(case, "reset_cache()", module.reset_cache)
    for start, end in ((0, k), (k, T)):
        got = _cached_call(case, x, start, end, plain, "without a mask, after reset_cache()")
        assert_close(got, plain[:, start:end], dtype=x.dtype, magnitude=magnitude,
                     what=f"after decoding with {what} and reset_cache(): outputs {start}..{end - 1} decoded through "
                          f"the KV cache without a mask vs forward(x)")
    _in_mode(case, "reset_cache()", module.reset_cache)


@invariant("padding-gradients",
           "with a padding mask (left or right), a loss on the outputs at real tokens has finite gradients with respect "
           "to the input and every parameter, and none with respect to the input at padded tokens",
           PADDING_KINDS, "forward", min_tokens=2, dtypes=("float32", "bfloat16", "float16"))
def padding_gradients(case):
    """Training on a padded batch: L = sum over real tokens t of c_t . out_t (c ~ N(0, 1)). The outputs at padded
    positions are not constrained (NaN included) and get no cotangent, but backward still passes through them: a
    query row with every key masked by -inf is softmax 0/0 = NaN, and its zero cotangent times that NaN is NaN in
    every parameter's gradient. A correct module keeps such rows finite (a finite fill, or rows zeroed). In the
    dtypes training runs in (Hugging Face's eager attention fills float64 masks with finfo(float64).min, which
    its float32 softmax turns into -inf: NaN there, harmless to anyone training in float32 or less). A real token's
    output does not depend on a padded token (its key and value get weight exactly 0), so L's gradient with respect to
    the input at padded positions is 0: a backward that recomputes the softmax without the padding mask shows."""
    from attnspec.invariants.gradients import cotangent

    x = case.input().requires_grad_()
    real, left, pads = _padding(case, x)
    out = case.forward(x, attention_mask=real, needs_grad=True)
    named = [(n, p) for n, p in case.module.named_parameters() if p.requires_grad]
    if not out.requires_grad:
        raise NotApplicable("the output does not require grad (gradient-reaches-parameters checks that)")
    loss = (torch.where(real[..., None], out, 0.0) * cotangent(case, out.shape)).sum()
    grads = case.guard("backward", torch.autograd.grad, loss, [x, *(p for _, p in named)], allow_unused=True)
    for name, g in zip(["the input", *(n for n, _ in named)], grads):
        if g is not None and not torch.isfinite(g).all():
            index = tuple(int(i) for i in (~torch.isfinite(g)).nonzero()[0])
            raise Violation(f"{_described(left, pads)}: the gradient of a loss on the real tokens' outputs with respect "
                            f"to {name} is {g[index].item()} at {index}: a fully masked row's NaN (softmax over keys "
                            f"that are all -inf) reaches backward")
    if grads[0] is not None and (~real).any():
        assert_close(grads[0][~real], torch.zeros_like(grads[0][~real]), dtype=x.dtype,
                     magnitude=grads[0][real].abs().max().item(),
                     what=f"{_described(left, pads)}: the gradient of a loss on the real tokens' outputs with respect to "
                          f"the input at padded tokens (a padded key or value reaches a real token in backward)")


@invariant("padding-weights",
           "with a padding mask (left or right), w[b, h, i, j] == 0 exactly for every padded key j of a real query i",
           PADDING_KINDS, "weights", min_tokens=2, scales=WIDE_SCALES)
def padding_weights(case):
    x = case.input()
    real, left, pads = _padding(case, x)
    _, seen = case.observe(x, attention_mask=real)
    weights = stacked(case, x, seen, observe=lambda inputs: case.observe(inputs, attention_mask=real)[1])  # (batch, heads, T, T)
    leak = real[:, None, :, None] & ~real[:, None, None, :] & (weights != 0)
    if leak.any():
        index = _first(leak)
        raise Violation(f"{_described(left, pads)}: padded key {index[-1]} of batch row {index[0]} has weight "
                        f"{weights[index].item():.4g} at real query {index[-2]} (index {index})")

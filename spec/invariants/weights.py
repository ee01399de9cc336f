"""The attention weights: a probability distribution over the past, as the seed builds it."""

import math

import torch

from attnspec import oracle
from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import ALL_KINDS, CAUSAL_KINDS, invariant
from attnspec.strategies import REGIMES, WIDE_SCALES
from attnspec.tolerance import ROPE_ANGLES, assert_close, ill_conditioned, softmax_rounding


def _first(mask):
    return tuple(int(i) for i in mask.nonzero()[0])


@invariant("weights-rows-sum-to-one", "in eval mode every row of the applied attention weights sums to 1",
           ALL_KINDS, "weights", scales=WIDE_SCALES)
def rows_sum_to_one(case):
    _, seen = case.observe(case.input())
    for weights in seen.applied_weights():
        sums = weights.sum(-1)
        assert_close(sums, torch.ones_like(sums), dtype=weights.dtype, magnitude=1.0,
                     what=f"row sums of the attention weights {tuple(weights.shape)} (index = row)")


@invariant("weights-future-zero", "w[i, j] == 0 exactly for every key j after query i",
           CAUSAL_KINDS, "weights", scales=WIDE_SCALES, regimes=REGIMES[:-1] + ("longest",),
           extreme_dtype="bfloat16")  # (bfloat16 positions past 256)
def future_zero(case):
    _, seen = case.observe(case.input())
    for weights in seen.applied_weights():
        future = oracle.causal_mask(weights.shape[-1], weights.device).expand_as(weights) & (weights != 0)
        if future.any():
            index = _first(future)
            raise Violation(f"future position (query {index[-2]}, key {index[-1]}) at index {index} "
                            f"has weight {weights[index].item():.4g}")


@invariant("masked-softmax-renormalized",
           "the applied weights equal the seed's multiply-and-renormalize: tril(softmax(S)) / row sums",
           CAUSAL_KINDS, "weights", scales=WIDE_SCALES)
def masked_softmax_renormalized(case):
    _, seen = case.observe(case.input())
    for head, applied in zip(seen.heads, seen.applied_weights()):
        scores = head.scores.to(torch.float64)
        scores = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))  # (a masked past score: 0)
        # tril(softmax(S)) / row sums is the softmax over the attended keys alone, whatever the future holds;
        # computed so, as the module does (a softmax over S with the future's -inf replaced first underflows
        # to subnormals when the past scores are ~ -740, and its renormalization is then the oracle's error)
        past = scores.masked_fill(oracle.causal_mask(scores.shape[-1], scores.device, case.cfg.window), -math.inf)
        expected = torch.softmax(past, -1)
        measured = (oracle.softmax(past.to(applied.dtype)) - expected).abs().max()
        # a float64 run may hold the softmax in float32 (Hugging Face's eager attention: the float64 rule), which
        # rounds the weights by eps32 * |s|; in the other dtypes ``measured`` is the softmax's own rounding
        held = applied.dtype == torch.float64 and scores.numel()
        bound = softmax_rounding(applied.dtype, scores.abs().max().item()) if held else 0.0
        assert_close(applied, expected, dtype=applied.dtype, magnitude=1.0, measured=measured, bound=bound,
                     what="applied weights vs tril(softmax(scores)) renormalized")


def _layouts(tensors, lead, T):
    """The ways ``tensors`` (one per softmax call) can hold (*lead, H, T, T): each call batch-major, (B, ...) —
    one call for every head, one per head (B, T, T), or per group of heads (B * h, T, T) —, or every call a piece of
    one batch-major (B * H) axis of matrices (diffusers' sliced attention; a loop over batch elements, (1, H, T, T)
    each). Each is a function of the list of calls."""
    whole = math.prod(lead) * T * T
    layouts = []
    if tensors and all(t.numel() and t.numel() % whole == 0 for t in tensors):
        layouts.append(lambda ts: torch.cat([t.reshape(*lead, -1, T, T) for t in ts], dim=-3))
    if lead and len(tensors) > 1 and all(t.dim() >= 3 for t in tensors) and sum(t.numel() for t in tensors) % whole == 0:
        layouts.append(lambda ts: torch.cat([t.reshape(-1, T, T) for t in ts]).reshape(*lead, -1, T, T))
    return layouts


def head_layout(tensors, lead, T, perturbed=None, also=()):
    """The function stacking the calls' tensors as (*lead, H, T, T); NotApplicable unless they hold whole (T x T)
    matrices for every batch element. Where the calls' shapes fit two layouts that stack them differently (say,
    calls of (B, T, T): one per head, or slices of a (B * H) axis), ``perturbed()`` — the same calls observed
    with the first batch element's input changed — tells them apart: the matrices that change are that
    element's. Still ambiguous (or no ``perturbed``): NotApplicable, never a guess. Layouts that stack
    ``tensors`` and every list in ``also`` (the same calls' other tensors the caller will stack: the weights
    dropout left) identically are one."""
    layouts = _layouts(tensors, lead, T)
    if not layouts:
        raise NotApplicable(f"the attention weights are not observed as (num_tokens x num_tokens) matrices for "
                            f"each of the {math.prod(lead)} batch elements", structural=False)
    if all(torch.allclose(f(ts), layouts[0](ts), rtol=0, atol=0, equal_nan=True) for f in layouts[1:]
           for ts in (tensors, *also)):
        return layouts[0]
    other = perturbed() if perturbed is not None else None
    if other is not None and [t.shape for t in other] == [t.shape for t in tensors]:
        changed, ids, start = set(), [], 0  # matrices numbered across the calls; those the change moved
        for before, after in zip(tensors, other):
            n = before.numel() // (T * T)
            moved = (before.reshape(n, -1) != after.reshape(n, -1)).any(-1)
            changed |= {start + int(k) for k in moved.nonzero().flatten()}
            ids.append(torch.arange(start, start + n).reshape(n, 1, 1).expand(n, T, T))
            start += n
        fits = [f for f in layouts if set(f(ids)[(0,) * len(lead)][:, 0, 0].tolist()) == changed]
        if len(fits) == 1:
            return fits[0]
    raise NotApplicable("the layout of the observed softmax calls is ambiguous (heads or batch elements in the "
                        "same positions of several calls)", structural=False)


def stacked(case, x, seen, attribute="weights", observe=None):
    """The observed softmax outputs (or ``attribute``: "scores"), heads stacked as (..., H, T, T) whether
    computed in one softmax call or one call per head (``layout_of``; the layout must stack the scores as it
    stacks the weights: at one token every layout stacks the weights, all 1, alike)."""
    values = [getattr(h, attribute) for h in seen.heads]
    return layout_of(case, x, seen, observe, also=[values] if attribute != "weights" else [])(values)


def layout_of(case, x, seen, observe=None, train=False, also=()):
    """``head_layout`` of ``seen``'s softmax outputs for input ``x``; ``observe(inputs)`` re-observes (by default
    ``case.observe(inputs, train=train)``: the call that gave ``seen``); ``also``: other lists of the calls'
    tensors that will be stacked the same way (in train mode the dropped weights are added)."""
    lead = (x.shape[0],) if case.kind.batched else ()
    observe = observe or (lambda inputs: case.observe(inputs, train=train)[1])

    def perturbed():
        changed = x.clone()
        changed[0] = case.input(salt=11, num_tokens=x.shape[-2], batch=x.shape[0])[0]
        return [h.weights for h in observe(changed).heads]

    also = [*also, seen.applied_weights()] if train else list(also)  # (train: the dropped weights are stacked too)
    return head_layout([h.weights for h in seen.heads], lead, x.shape[-2], perturbed if lead else None, also)


def head_order(observed, expected):
    """Indices putting the heads (axis -3) of ``observed`` in ``expected``'s order: identity unless another one-to-one
    matching, each expected head given the observed one closest to it, is closer everywhere; None where the weights
    cannot tell the heads apart (some expected head as close to two observed ones: at one token every weight is 1).
    A module making one softmax call per head may visit the heads in any order (last head first) and put their
    outputs back in place; a head that computes another head's weights still changes the output (oracle-float64)."""
    heads = observed.shape[-3]
    identity = torch.arange(heads, device=observed.device)
    if heads < 2 or observed.shape != expected.shape:
        return identity
    o, e = observed.detach().double().nan_to_num(), expected.detach().double().nan_to_num()
    cost = torch.stack([(o.select(-3, i) - e.select(-3, j)).abs().amax() for i in range(heads) for j in range(heads)])
    cost = cost.reshape(heads, heads)  # [observed head, expected head]
    if ((cost == cost.min(0).values).sum(0) > 1).any():
        return None
    matched = cost.argmin(0)
    if len(set(matched.tolist())) < heads or not cost[matched, identity].max() < cost.diagonal().max():
        return identity
    return matched.to(observed.device)


def _eval_weights(case, parts, x):
    """(observed eval weights on past positions, heads stacked in call order; the oracle's in float64; the head order
    putting the observed heads in the oracle's: ``head_order`` where one softmax call per head was made)."""
    _, seen = case.observe(x)
    observed = stacked(case, x, seen)
    if case.kind.causal:
        observed = oracle.renormalized_causal(observed, case.cfg.window)
    expected = oracle.reference_weights(case.kind, case.cfg, parts, x).reshape(*observed.shape[:-3], -1, *observed.shape[-2:])
    if observed.shape != expected.shape:
        raise Violation(f"observed attention weights of shape {tuple(observed.shape)} (heads stacked), expected "
                        f"{tuple(expected.shape)} (num_heads={case.cfg.num_heads}, num_tokens={x.shape[-2]})")
    one_call = len(seen.heads) == 1
    order = torch.arange(observed.shape[-3], device=observed.device) if one_call else head_order(observed, expected)
    return observed, expected, order


def eval_head_order(case, parts, x):
    """Indices putting the heads of ``x``'s observed weights (stacked in call order) in the oracle's order; None
    where the weights cannot tell them apart (``head_order``)."""
    return _eval_weights(case, parts, x)[2]


def observed_and_reference_weights(case, parts, x):
    """(observed, expected, measured): the observed weights on past positions (renormalized: the seed's
    first method masks after the softmax), heads in the oracle's order (``eval_head_order``), the oracle's in
    float64, and the oracle's own error in x's dtype."""
    observed, expected, order = _eval_weights(case, parts, x)
    if order is not None:  # (heads the weights cannot tell apart have equal weights: any order)
        observed = observed.index_select(-3, order)
    low = oracle.reference_weights(case.kind, case.cfg, parts, x, dtype=x.dtype, angles=ROPE_ANGLES)
    measured = (low.reshape(expected.shape) - expected).abs().max()
    return observed, expected, measured


@invariant("scaling-sqrt-head-dim", "softmax scores are Q_h K_h^T / sqrt(head_dim): weights (on past positions) equal the oracle's",
           ALL_KINDS, "weights+params")  # moderate scales: at 1e2+ half-precision weights are ill-conditioned
def scaling_sqrt_head_dim(case):
    parts = case.projections()
    x = case.input()
    score_magnitude = oracle.score_magnitude(case.kind, case.cfg, parts, x)
    unusable = ill_conditioned(x.dtype, score_magnitude, case.cfg.rope)
    if unusable:
        raise NotApplicable(unusable, structural=False)
    observed, expected, measured = observed_and_reference_weights(case, parts, x)
    try:
        assert_close(observed, expected, dtype=x.dtype, magnitude=1.0, measured=measured,
                     bound=softmax_rounding(x.dtype, score_magnitude, case.cfg.rope),
                     what=f"attention weights vs softmax(QK^T/sqrt({case.kind.attention_head_dim(case.cfg)}))")
    except Violation as mismatch:
        head_dim, cfg = case.kind.attention_head_dim(case.cfg), case.cfg
        for label, d_k in ((f"sqrt(d_out={cfg.d_out})", cfg.d_out), (f"sqrt(d_in={cfg.d_in})", cfg.d_in),
                           ("1 (no scaling)", 1), (f"head_dim={head_dim} (not its sqrt)", head_dim**2)):
            if d_k == head_dim:
                continue
            other = oracle.reference_weights(case.kind, cfg, parts, x, d_k=d_k).reshape(expected.shape)
            if (observed.double() - other).abs().max() <= 1e3 * max(measured.item(), 1e-7):
                raise Violation(f"{mismatch}; the weights match scores divided by {label}, "
                                f"expected sqrt(head_dim)={math.sqrt(head_dim):.4g}") from None
        raise

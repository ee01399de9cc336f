"""Dropout on the attention weights: inverted dropout, unbiased, at the configured rate.

Statistical checks run at a stated false-alarm rate FALSE_ALARM per example; their randomness
comes from the config's seed, so a verdict is reproducible and CI (derandomized) is deterministic."""

import math
from statistics import NormalDist

import torch

from attnspec import oracle
from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import CAUSAL_KINDS, invariant
from attnspec.invariants.weights import eval_head_order, layout_of
from attnspec.strategies import MODERATE_DROPOUTS, NONZERO_DROPOUTS
from attnspec.tolerance import allowed_error, assert_close, softmax_rounding

FALSE_ALARM = 1e-6  # probability that a correct module fails one example of the exact binomial test
# dropout-unbiased uses a normal approximation of the mean of skewed draws, whose tails are heavier
# than normal. Computed exactly for one key (the most skewed case, T=1) over p in [0.05, 0.9]: at a
# nominal 1e-6 the true rate reaches 5.6e-5 (p=0.05); at the nominal 1e-10 used here, 9.2e-7.
UNBIASED_NOMINAL = 1e-10
DRAWS = 1024  # dropout draws averaged by dropout-unbiased (at least; see unbiased_draws)
# The calibration above holds when the rarest kept pattern is seen ~100 times: 1024 (1 - p) >= ~100 for one
# dropout. mha and gqa may also drop their output (nanoGPT's resid_dropout, x-transformers' to_out): an
# element then takes its large values with probability (1 - p)^2 (0.01 at p = 0.9, ~10 of 1024 draws; with
# none drawn, P = e^-10, the sample variance collapses and the normal bound fails: 5e-5 per element
# measured, against 1e-6 / elements). So the draws keep (1 - p)^stages * draws >= RARE_SEEN. The search draws
# only rates where that is 1024 (strategies.MODERATE_DROPOUTS, p <= 0.6: a module looping over its batch in Python
# spent 7 s on 10000 draws at p = 0.9); a user's --example at a higher rate gets up to 10000 draws. Higher rates
# are checked on the weights (dropout-on-weights, every rate up to 0.9).
RARE_SEEN = 100


def unbiased_draws(kind, p):
    """Draws for dropout-unbiased at rate p: the rarest kept pattern seen RARE_SEEN times."""
    stages = 2 if kind.head_split and kind.structure == "attention" else 1  # (a second dropout after out_proj)
    return max(DRAWS, math.ceil(RARE_SEEN / (1 - p) ** stages))


def binomial_two_sided_p(k, n, p):
    """P-value of k successes in n Bernoulli(p) trials: min(1, 2 min(P(X <= k), P(X >= k))), exact and
    conservative (P(p-value <= a) <= a for every a). Only the tail away from the mean is summed, in log
    space over a vectorized range from k outward of 40 standard deviations + 40 terms: each further step
    shrinks the terms by at least exp(-j / (n p (1-p))), so the rest is < e^-800 of the sum. O(sqrt(n))."""
    if not 0.0 < p < 1.0:  # a degenerate rate: the outcome is certain
        return 1.0 if k == round(n * p) else 0.0
    width = int(40 * math.sqrt(n * p * (1 - p))) + 40
    lo, hi = (max(0, k - width), k) if k <= n * p else (k, min(n, k + width))
    i = torch.arange(lo, hi + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p))
    return min(1.0, 2 * torch.logsumexp(log_pmf, 0).exp().item())


@invariant("dropout-on-weights",
           "train mode: each applied weight is 0 or w/(1-p) (w its eval weight), and a fraction ~p of w>0 is zeroed",
           CAUSAL_KINDS, "weights", dropouts=NONZERO_DROPOUTS)
def dropout_on_weights(case):
    x, p = case.input(), case.cfg.dropout
    _, eval_seen = case.observe(x)
    _, train_seen = case.observe(x, train=True)
    fused_dropout_requested(eval_seen, train_seen, p)
    zeroed = total = 0
    for scores, softmax, w, a in _paired_weights(case, x, eval_seen, train_seen):
        if a.shape != w.shape:
            raise Violation(f"train-mode weights have shape {tuple(a.shape)}, eval-mode {tuple(w.shape)}")
        kept = a != 0
        # eval and train may take two paths (SDPA in eval, an eager softmax in train), each rounding the weights
        # by up to softmax_rounding of the scores: off-centre input makes scores of hundreds
        scores = scores[(softmax > 0) & torch.isfinite(scores)]  # (not a finite mask fill's)
        bound = 2 * softmax_rounding(x.dtype, scores.abs().max().item()) / (1 - p) if scores.numel() else 0.0
        assert_close(a[kept], (w / (1 - p))[kept], dtype=x.dtype, magnitude=1 / (1 - p), bound=bound,
                     what=f"kept train-mode weights vs eval weights / (1 - p={p})")
        positive = w > 0
        zeroed += int((positive & ~kept).sum())
        total += int(positive.sum())
    if total and binomial_two_sided_p(zeroed, total, p) < FALSE_ALARM:
        raise Violation(f"dropout zeroed {zeroed} of {total} positive weights ({zeroed / total:.3f}), "
                        f"expected a fraction p={p} (exact binomial test, p-value < {FALSE_ALARM:g})")


def _paired_weights(case, x, eval_seen, train_seen):
    """[(eval scores, eval softmax output, eval applied weights, train-mode applied weights)] call by call where
    eval and train called softmax alike; else (one stacked call in eval, one per head in train: a fused inference
    path) one such tuple, each stacked as (..., H, T, T) (``layout_of``), so that each weight meets itself; a train
    path that attends with fewer heads still shows as a shape mismatch."""
    evals, trains = eval_seen.applied_weights(), train_seen.applied_weights()
    if [w.shape for w in evals] == [a.shape for a in trains]:
        return [(h.scores, h.weights, w, a) for h, w, a in zip(eval_seen.heads, evals, trains)]
    stack_eval = layout_of(case, x, eval_seen, also=[[h.scores for h in eval_seen.heads], evals])
    return [(stack_eval([h.scores for h in eval_seen.heads]), stack_eval([h.weights for h in eval_seen.heads]),
             stack_eval(evals), layout_of(case, x, train_seen, train=True)(trains))]


MAX_CALL_BATCH = 1024  # dropout-unbiased: batch rows of one forward call


@invariant("dropout-unbiased",
           f"train mode is unbiased: the mean of {DRAWS} dropout draws of forward(x) matches eval forward(x)",
           ("causal-attention", "mha-wrapper", "mha", "gqa"), "forward", dropouts=MODERATE_DROPOUTS, dtypes=("float64",),
           regimes=("small",))  # 1024 draws: at long, wide or many sizes each example costs ~0.1-1 s
def dropout_unbiased(case):
    x, draws_needed = case.input(), unbiased_draws(case.kind, case.cfg.dropout)
    with torch.no_grad():  # a draw's autograd graph is ~336 MiB at GPT-2 size: keep none
        expected = case.forward(x).double().cpu()
        # Replicas along the batch are independent draws; chunked so T x T weights fit in memory at real
        # sizes and a call's batch stays <= MAX_CALL_BATCH rows (a module looping over batch elements in Python
        # would otherwise spend seconds on one call); the statistics are merged chunk by chunk (Chan et al.).
        rows = x.shape[0] if x.dim() == 3 else 1
        chunk = max(1, min(draws_needed, 2**22 // (x.numel() * x.shape[-2] * case.cfg.num_heads), MAX_CALL_BATCH // rows))
        count, mean, m2 = 0, torch.zeros_like(expected), torch.zeros_like(expected)
        for start in range(0, draws_needed, chunk):
            n = min(chunk, draws_needed - start)
            draws = case.forward(x.repeat(n, *([1] * (x.dim() - 1))), train=True, seed_salt=start)
            draws = draws.double().cpu().reshape(n, *expected.shape)
            chunk_mean = draws.mean(0)
            delta = chunk_mean - mean
            mean = mean + delta * (n / (count + n))
            m2 = m2 + ((draws - chunk_mean) ** 2).sum(0) + delta**2 * (count * n / (count + n))
            count += n
    stderr = (m2 / (draws_needed - 1)).sqrt() / math.sqrt(draws_needed)
    # Bonferroni over the elements: a correct module exceeds z_crit anywhere with probability < FALSE_ALARM
    # (normal approximation of the mean of DRAWS independent draws).
    z_crit = NormalDist().inv_cdf(1 - UNBIASED_NOMINAL / (2 * expected.numel()))
    slack = z_crit * stderr + allowed_error(x.dtype, expected.abs().max().item())
    excess = (mean - expected).abs() - slack
    if (excess > 0).any():
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        got, want = mean[index].item(), expected[index].item()
        ratio = f"; ratio {got / want:.3f}" if want != 0 else ""
        raise Violation(f"mean of {draws_needed} train-mode outputs at {index} is {got:.5g}, eval output {want:.5g} "
                        f"(± {slack[index].item():.2g} at false-alarm rate {FALSE_ALARM:g}){ratio}")


def fused_dropout_requested(eval_seen, train_seen, p):
    """A fused kernel (scaled_dot_product_attention, multi_head_attention_forward) applies the dropout it
    is asked for: dropout-on-weights requires dropout_p = p in train mode and 0 in eval mode."""
    for mode, seen, expected in (("eval", eval_seen, 0.0), ("train", train_seen, p)):
        for head in seen.heads:
            if head.dropout_p is not None and abs(head.dropout_p - expected) > 1e-12:
                raise Violation(f"{head.source} was called with dropout_p={head.dropout_p:g} in {mode} mode, "
                                f"expected {expected:g} (the configured dropout={p:g} in train mode, 0 in eval)")


@invariant("dropout-output-from-applied-weights",
           "train mode: forward(x) equals the oracle computed with the weights the module applied (dropped) in place "
           "of the softmax's, on its own projections: no dropout beyond the weights (mha: or on its output)",
           ("causal-attention", "mha-wrapper", "mha", "gqa"), "weights+params", dropouts=NONZERO_DROPOUTS)
def dropout_output_from_applied_weights(case):
    """Exact, not statistical (false-alarm rate 0 beyond the tolerance rule): with A_h the applied weights
    observed by the probe, out = out_proj(concat_h A_h V_h) (mha), concat_h A_h V_h (the wrapper), A V
    (one head). Dropout applied again to the values, the context or the heads' outputs breaks it. For mha
    an inverted dropout of the whole output after out_proj (nanoGPT's resid_dropout) is accepted: every
    element is then 0 or expected / (1 - p)."""
    parts, x, p = case.projections(), case.input(), case.cfg.dropout
    if case.kind.head_split and "out" not in parts:
        raise NotApplicable("the output projection is not found (out_proj; an adapter can name it)")
    out, seen = case.observe(x, train=True)
    T, heads = x.shape[-2], case.kind.attention_heads(case.cfg)
    applied = layout_of(case, x, seen, train=True)(seen.applied_weights())
    if applied.shape[-3] != heads:
        raise NotApplicable(f"the applied weights are not observed as {heads} (num_tokens x num_tokens) matrices "
                            f"per batch element", structural=False)
    if len(seen.heads) > 1:  # one softmax call per head, in the order the module visits them: as in eval mode
        order = eval_head_order(case, parts, x)
        if order is None:
            raise NotApplicable("the heads' eval weights are equal: which head each softmax call computed cannot be "
                                "told", structural=False)
        applied = applied.index_select(-3, order.to(applied.device))

    def computed(dtype):
        return oracle.output_from_weights(case.kind, case.cfg, oracle.cast(parts, dtype), x.to(dtype), applied.to(dtype))

    expected = computed(torch.float64)
    measured = (computed(x.dtype) - expected).abs().max().item()
    try:
        assert_close(out, expected, dtype=x.dtype, measured=measured,
                     what=f"train-mode output vs the output computed from the applied (dropped) weights, p={p}")
    except Violation as mismatch:
        if not case.kind.head_split:
            raise
        scaled = expected / (1 - p)  # the output after an inverted dropout of the output itself
        got = out.detach().to(scaled)  # (float64, on the module's device)
        err = torch.minimum(got.abs(), (got - scaled).abs())
        if (err > allowed_error(x.dtype, scaled.abs().max().item(), measured / (1 - p))).any():
            raise Violation(f"{mismatch}; nor is it an inverted dropout of that output (0 or expected / (1 - p)): "
                            f"dropout is applied beyond the weights (to the values or the context?)") from None


def _replicas_for_masks(p, rows_per_element, heads):
    """Batch replicas N making both mask-sharing tests decisive: if shared, (p^2+(1-p)^2)^(N m) and
    (p^N+(1-p)^N)^(H m) below FALSE_ALARM / 2 (m causal positions per head and element)."""
    for replicas in range(1, 4097):
        heads_chance = (p * p + (1 - p) ** 2) ** (replicas * rows_per_element)
        batch_chance = (p**replicas + (1 - p) ** replicas) ** (heads * rows_per_element)
        if heads_chance < FALSE_ALARM / 2 and batch_chance < FALSE_ALARM / 2:
            return replicas
    return 4096


@invariant("dropout-masks-independent",
           "train mode: the heads do not all share one dropout mask, nor do the batch elements",
           CAUSAL_KINDS, "weights", dropouts=NONZERO_DROPOUTS)
def dropout_masks_independent(case):
    """Over the n positions (batch x query x key, causal) where every one of K masks applies to a positive
    weight, K independent Bernoulli masks are all identical with probability (p^K + (1-p)^K)^n. Checked for
    K = the heads (n over the batch) and K = the batch elements (n over the heads), each flagged only when
    that chance is below FALSE_ALARM / 2: together at most FALSE_ALARM per example. The input is repeated
    along the batch (replicas are independent draws) so that a shared mask is found even at 1 token."""
    p, x = case.cfg.dropout, case.input()
    if p == 0:
        raise NotApplicable("needs dropout > 0")
    T, heads = x.shape[-2], case.kind.attention_heads(case.cfg)
    replicas = _replicas_for_masks(p, x.shape[0] * T * (T + 1) // 2, heads)
    x = x.repeat(replicas, 1, 1)
    _, seen = case.observe(x, train=True)
    layout = layout_of(case, x, seen, train=True)
    kept = layout([a != 0 for a in seen.applied_weights()]).cpu()
    if kept.shape[-3] != heads:
        raise NotApplicable("the applied weights are not observed per head and batch element", structural=False)
    positive = layout([h.weights > 0 for h in seen.heads]).cpu()
    positive &= ~oracle.causal_mask(T)
    for dim, group in ((1, "heads"), (0, "batch elements")):
        k = kept.shape[dim]
        common = positive.all(dim)
        n = int(common.sum())
        if k < 2 or not n:
            continue
        chance = (p**k + (1 - p) ** k) ** n
        identical = bool(((kept == kept.narrow(dim, 0, 1)).all(dim) | ~common).all())
        if identical and chance < FALSE_ALARM / 2:
            raise Violation(f"all {k} {group} share one dropout mask over {n} positions (input of {tuple(x.shape)}; "
                            f"independent masks coincide with probability {chance:.2g} < {FALSE_ALARM / 2:g})")

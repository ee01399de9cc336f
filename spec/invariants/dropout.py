"""Dropout on the attention weights: inverted dropout, unbiased, at the configured rate.

Statistical checks run at a stated false-alarm rate FALSE_ALARM per example; their randomness
comes from the config's seed, so a verdict is reproducible and CI (derandomized) is deterministic."""

import math
from statistics import NormalDist

import torch

from attnspec.errors import Violation
from attnspec.invariants.base import invariant
from attnspec.strategies import NONZERO_DROPOUTS
from attnspec.tolerance import allowed_error, assert_close

FALSE_ALARM = 1e-6  # probability that a correct module fails one example of the exact binomial test
# dropout-unbiased uses a normal approximation of the mean of skewed draws, whose tails are heavier
# than normal. Computed exactly for one key (the most skewed case, T=1) over p in [0.05, 0.9]: at a
# nominal 1e-6 the true rate reaches 5.6e-5 (p=0.05); at the nominal 1e-10 used here, 9.2e-7.
UNBIASED_NOMINAL = 1e-10
DRAWS = 1024  # dropout draws averaged by dropout-unbiased


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
           ("causal-attention", "mha-wrapper", "mha", "transformer-block"), "weights", dropouts=NONZERO_DROPOUTS)
def dropout_on_weights(case):
    x, p = case.input(), case.cfg.dropout
    _, eval_seen = case.observe(x)
    _, train_seen = case.observe(x, train=True)
    zeroed = total = 0
    for w, a in zip(eval_seen.applied_weights(), train_seen.applied_weights()):
        if a.shape != w.shape:
            raise Violation(f"train-mode weights have shape {tuple(a.shape)}, eval-mode {tuple(w.shape)}")
        kept = a != 0
        assert_close(a[kept], (w / (1 - p))[kept], dtype=x.dtype, magnitude=1 / (1 - p),
                     what=f"kept train-mode weights vs eval weights / (1 - p={p})")
        positive = w > 0
        zeroed += int((positive & ~kept).sum())
        total += int(positive.sum())
    if total and binomial_two_sided_p(zeroed, total, p) < FALSE_ALARM:
        raise Violation(f"dropout zeroed {zeroed} of {total} positive weights ({zeroed / total:.3f}), "
                        f"expected a fraction p={p} (exact binomial test, p-value < {FALSE_ALARM:g})")


@invariant("dropout-unbiased",
           f"train mode is unbiased: the mean of {DRAWS} dropout draws of forward(x) matches eval forward(x)",
           ("causal-attention", "mha-wrapper", "mha"), "forward", dropouts=NONZERO_DROPOUTS, dtypes=("float64",),
           regimes=("small",))  # 1024 draws: at long, wide or many sizes each example costs ~0.1-1 s
def dropout_unbiased(case):
    x = case.input()
    with torch.no_grad():  # a draw's autograd graph is ~336 MiB at GPT-2 size: keep none
        expected = case.forward(x).double().cpu()
        # Replicas along the batch are independent draws; chunked so T x T weights fit in memory at real
        # sizes; their statistics are merged chunk by chunk (Chan et al.), never stacked.
        chunk = max(1, min(DRAWS, 2**22 // (x.numel() * x.shape[-2] * case.cfg.num_heads)))
        count, mean, m2 = 0, torch.zeros_like(expected), torch.zeros_like(expected)
        for start in range(0, DRAWS, chunk):
            n = min(chunk, DRAWS - start)
            draws = case.forward(x.repeat(n, *([1] * (x.dim() - 1))), train=True, seed_salt=start)
            draws = draws.double().cpu().reshape(n, *expected.shape)
            chunk_mean = draws.mean(0)
            delta = chunk_mean - mean
            mean = mean + delta * (n / (count + n))
            m2 = m2 + ((draws - chunk_mean) ** 2).sum(0) + delta**2 * (count * n / (count + n))
            count += n
    stderr = (m2 / (DRAWS - 1)).sqrt() / math.sqrt(DRAWS)
    # Bonferroni over the elements: a correct module exceeds z_crit anywhere with probability < FALSE_ALARM
    # (normal approximation of the mean of DRAWS independent draws).
    z_crit = NormalDist().inv_cdf(1 - UNBIASED_NOMINAL / (2 * expected.numel()))
    slack = z_crit * stderr + allowed_error(x.dtype, expected.abs().max().item())
    excess = (mean - expected).abs() - slack
    if (excess > 0).any():
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        got, want = mean[index].item(), expected[index].item()
        ratio = f"; ratio {got / want:.3f}" if want != 0 else ""
        raise Violation(f"mean of {DRAWS} train-mode outputs at {index} is {got:.5g}, eval output {want:.5g} "
                        f"(± {slack[index].item():.2g} at false-alarm rate {FALSE_ALARM:g}){ratio}")

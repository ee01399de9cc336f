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
    """Exact two-sided p-value of k successes in n Bernoulli(p) trials (sum of outcomes no likelier than k)."""
    def log_pmf(i):
        return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    observed = log_pmf(k)
    return min(1.0, sum(math.exp(log_pmf(i)) for i in range(n + 1) if log_pmf(i) <= observed + 1e-9))


@invariant("dropout-on-weights",
           "train mode: each applied weight is 0 or w/(1-p) (w its eval weight), and a fraction ~p of w>0 is zeroed",
           ("causal-attention", "mha-wrapper", "mha", "transformer-block"), "weights", dropouts=NONZERO_DROPOUTS)
def dropout_on_weights(case):
    x, p = case.input(), case.cfg.dropout
    _, eval_seen = case.observe(x)
    _, train_seen = case.observe(x, train=True)
    fused_dropout_requested(eval_seen, train_seen, p)
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
           ("causal-attention", "mha-wrapper", "mha"), "forward", dropouts=NONZERO_DROPOUTS, dtypes=("float64",))
def dropout_unbiased(case):
    x = case.input()
    expected = case.forward(x)
    # Replicas along the batch are independent draws; chunked so T x T weights fit in memory at real sizes.
    chunk = max(1, min(DRAWS, 2**22 // (x.numel() * x.shape[-2] * case.cfg.num_heads)))
    draws = torch.cat([case.forward(x.repeat(n, *([1] * (x.dim() - 1))), train=True, seed_salt=start).cpu()
                       for start in range(0, DRAWS, chunk) for n in [min(chunk, DRAWS - start)]])
    draws = draws.reshape(DRAWS, *expected.shape).double()
    expected = expected.cpu()
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(DRAWS)
    # Bonferroni over the elements: a correct module exceeds z_crit anywhere with probability < FALSE_ALARM
    # (normal approximation of the mean of DRAWS independent draws).
    z_crit = NormalDist().inv_cdf(1 - UNBIASED_NOMINAL / (2 * expected.numel()))
    slack = z_crit * stderr + allowed_error(x.dtype, expected.abs().max().item())
    excess = (mean - expected.double()).abs() - slack
    if (excess > 0).any():
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise Violation(f"mean of {DRAWS} train-mode outputs at {index} is {mean[index].item():.5g}, eval output "
                        f"{expected[index].item():.5g} (± {slack[index].item():.2g} at false-alarm rate {FALSE_ALARM:g}); "
                        f"ratio {mean[index].item() / expected[index].item():.3f}")


def fused_dropout_requested(eval_seen, train_seen, p):
    """A fused kernel (scaled_dot_product_attention, multi_head_attention_forward) applies the dropout it
    is asked for: dropout-on-weights requires dropout_p = p in train mode and 0 in eval mode."""
    for mode, seen, expected in (("eval", eval_seen, 0.0), ("train", train_seen, p)):
        for head in seen.heads:
            if head.dropout_p is not None and abs(head.dropout_p - expected) > 1e-12:
                raise Violation(f"{head.source} was called with dropout_p={head.dropout_p:g} in {mode} mode, "
                                f"expected {expected:g} (the configured dropout={p:g} in train mode, 0 in eval)")

"""Where information may flow: causality, prefixes, the batch, token order."""

import torch

from attnspec.errors import Violation
from attnspec.invariants.base import CAUSAL_KINDS, invariant
from attnspec.invariants.history import _fresh_with_parameters_of
from attnspec.strategies import WIDE_SCALES
from attnspec.tolerance import assert_close


MAX_CUTS = 8  # positions checked per example: all of them at small sizes, spread out at T = 1024


def _magnitude(*tensors):
    return max(t.detach().abs().max().item() for t in tensors)


def _cuts(num_tokens):
    """Positions t in [0, num_tokens - 2] to cut at: every one, or MAX_CUTS spread evenly (ends included)."""
    last = num_tokens - 2
    if last + 1 <= MAX_CUTS:
        return list(range(last + 1))
    return sorted({round(i * last / (MAX_CUTS - 1)) for i in range(MAX_CUTS)})


def evaluation_noise(case, x, out):
    """max |forward(x') - out|, x' a copy of x one element off x's memory alignment: how far the module's
    own arithmetic moves its output when nothing but the layout changes (MKL and oneDNN pick their
    vectorization by alignment; in float32 at scores ~1e4 that moves outputs by ~eps * |s| * |v|, 2e-4
    relative). A causal module computes its outputs at positions <= t from those tokens alone in exact
    arithmetic, so differences within FUDGE times this are its rounding, not a leak (the ``measured`` of
    spec.tolerance). 0 for a module whose result does not depend on the layout (most, at small sizes), and
    taken as 0 off the CPU, where a custom kernel may require aligned inputs (no misaligned input is given)."""
    if x.device.type != "cpu":
        return 0.0
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view_as(x)
    shifted.copy_(x)
    return (case.forward(shifted) - out).abs().max().item()


def _replicas(x, cuts):
    """x repeated once per cut along the batch: one forward checks every cut (replica i = cut i)."""
    return x.repeat(len(cuts), *([1] * (x.dim() - 1)))


def _confirmed(check, batched, alone):
    """Run ``check(batched)``; if it fails, the failure counts only if ``check(alone())`` fails too, so a
    module that mixes batch elements (batch-independence's finding) is not reported as a causal leak."""
    try:
        check(batched)
    except Violation:
        check(alone())


@invariant("causal-perturbation", "changing tokens after t leaves outputs at positions <= t unchanged",
           CAUSAL_KINDS, "forward", min_tokens=2, scales=WIDE_SCALES)
def causal_perturbation(case):
    x = case.input()
    out = case.forward(x)
    noise = -case.input(salt=1)  # negated: off-centre tokens change by ~2 * offset, not by scale only
    b, cuts = x.shape[0], _cuts(x.shape[-2])
    perturbed = _replicas(x, cuts)
    for i, t in enumerate(cuts):
        perturbed[i * b:(i + 1) * b, t + 1:] = noise[:, t + 1:]
    changed = case.forward(perturbed)
    noise = evaluation_noise(case, x, out)
    for i, t in enumerate(cuts):
        def check(outputs, t=t):
            assert_close(outputs[:, : t + 1], out[:, : t + 1], dtype=x.dtype, magnitude=_magnitude(out, x),
                         measured=noise, what=f"outputs at positions <= {t} after changing tokens > {t}")
        _confirmed(check, changed[i * b:(i + 1) * b], lambda i=i: case.forward(perturbed[i * b:(i + 1) * b]))


@invariant("prefix-consistency", "forward(x[:, :t]) equals forward(x)[:, :t] for every t < num_tokens",
           CAUSAL_KINDS, "forward", min_tokens=2, scales=WIDE_SCALES)
def prefix_consistency(case):
    """A module that splits its work by position (queries in chunks, key tiles) computes a prefix with other matmul
    shapes than the whole sequence, so the two round differently: a difference beyond the misaligned-copy noise
    is judged again against the module's own rounding of that prefix (``_own_rounding``), which sees no future token."""
    x = case.input()
    out = case.forward(x)
    noise = evaluation_noise(case, x, out)
    for t in (cut + 1 for cut in _cuts(x.shape[-2])):
        prefix = x[..., :t, :].contiguous()
        got = case.forward(prefix)

        def check(measured, t=t, got=got):
            assert_close(got, out[..., :t, :], dtype=x.dtype, measured=measured, magnitude=_magnitude(out, x),
                         what=f"forward of the {t}-token prefix vs the first {t} outputs")
        try:
            check(noise)
        except Violation:  # (the prefix drawn again: a module may have changed its input in place)
            own = _own_rounding(case, case.input()[..., :t, :].contiguous(), got)
            if own is None:
                raise
            check(max(noise, own))


def _own_rounding(case, x, out):
    """max |out - forward64(x)|, ``out`` being forward(x) and forward64 a copy of the module run in float64: the
    module's own rounding in x's dtype (``measured`` of spec.tolerance, the module its own float64 reference).
    None in float64, or where the module does not run in float64."""
    if x.dtype == torch.float64:
        return None
    try:
        module = _fresh_with_parameters_of(case, case.module)
        case.guard("module.to(torch.float64)", module.to, torch.float64)
        exact = case.forward(x.double(), module=module)
    except Violation:
        return None
    return (out.double() - exact).abs().max().item()


@invariant("gradient-causality", "d out_t / d x_s = 0 for every s > t",
           CAUSAL_KINDS, "forward", min_tokens=2, scales=WIDE_SCALES)
def gradient_causality(case):
    x, cuts = case.input(), _cuts(case.cfg.num_tokens)
    b = x.shape[0]

    def gradients(inputs, positions):
        """d sum(out[replica i, positions[i]]) / d inputs, one backward for every replica; None if unused."""
        inputs = inputs.detach().clone().requires_grad_(True)
        out = case.forward(inputs, needs_grad=True)
        total = sum(out[i * b:(i + 1) * b, t].sum() for i, t in enumerate(positions))
        return case.guard("backward", torch.autograd.grad, total, inputs, allow_unused=True)[0]

    grads = gradients(_replicas(x, cuts), cuts)
    if grads is None:
        return  # the output does not depend on x at all: trivially causal
    for i, t in enumerate(cuts):
        def check(grad, t=t):
            if grad is None:
                return
            future = grad[:, t + 1:]
            assert_close(future, torch.zeros_like(future), dtype=x.dtype, magnitude=_magnitude(grad),
                         what=f"d out[{t}] / d x[s > {t}] (should be 0)")
        _confirmed(check, grads[i * b:(i + 1) * b], lambda t=t: gradients(x, [t]))


@invariant("batch-independence", "each batch element's output equals forward of that element alone",
           CAUSAL_KINDS, "forward", min_batch=2, scales=WIDE_SCALES)
def batch_independence(case):
    x = case.input()
    out = case.forward(x)
    for i in range(x.shape[0]):
        assert_close(case.forward(x[i:i + 1]), out[i:i + 1], dtype=x.dtype, magnitude=_magnitude(out, x),
                     what=f"batch element {i} alone vs in the batch of {x.shape[0]}")


@invariant("permutation-equivariance", "non-causal self-attention commutes with token permutations: f(Px) = P f(x)",
           ("self-attention",), "forward", min_tokens=2, scales=WIDE_SCALES)
def permutation_equivariance(case):
    x = case.input()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(case.cfg.seed))
    if torch.equal(perm, torch.arange(x.shape[0])):
        perm = perm.roll(1)
    out = case.forward(x)
    assert_close(case.forward(x[perm]), out[perm], dtype=x.dtype, magnitude=_magnitude(out, x),
                 what=f"f(x[perm]) vs f(x)[perm] with perm={perm.tolist()}")

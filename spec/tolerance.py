"""The one place numerical comparisons get their tolerance.

allowed = max(RTOL[dtype] * magnitude, FUDGE * measured), where ``magnitude`` is the size of the
values compared (max |reference|, at least the size of the input), and ``measured`` is, when a
float64 reference exists, the error of the same reference formula evaluated in the module's dtype
(the error any correct implementation in that dtype can be expected to make). This follows
PyTorch's SDPA tests: derive the bound from the dtype and the oracle's own error, never guess it.

The float64 rule. Real code run in float64 still holds some constants and steps in float32: the
book's GELU builds sqrt(2/pi) as a float32 tensor (relative error 3e-9 in the output, where float64
arithmetic alone gives 1e-16), x-transformers computes the softmax in float32 and casts back (rows
sum to 1 within 6e-8). One float32 rounding of a value is a relative error of at most 2**-24, and
the weights' row sums and the outputs are weighted averages of such values, so they inherit it
without growth. A float64 run therefore allows FLOAT64_ULPS float32 ulps, 4 * 2**-23 = 4.8e-7,
relative to the magnitude: what a float32 constant or upcast costs, far below the real deviations
the spec rejects in float64 as in float32 (a softmax denominator + 1e-6: 1e-6; LayerNorm eps outside
the square root: 5e-6 at unit variance and more at small ones; exact-erf GELU for tanh: 4e-4).
A module computed entirely in float32 and cast to float64 at the end may pass this rule at small
sizes; float32 runs check float32 behaviour. A failure whose error is below the next lower
precision's tolerance (float32's for a float64 run) says that it may be only a precision matter.
"""

import torch

from attnspec.errors import Violation

# Relative error a correct kernel may make, in units of the values' magnitude: ~2**7 ulps for the
# float formats (reductions over d, exp, division), larger for the 8/11-bit mantissas.
FLOAT64_ULPS = 4  # float32 ulps (2**-23) a float64 run allows: see the float64 rule above
RTOL = {
    torch.float64: FLOAT64_ULPS * 2.0**-23,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# Rotary angles p * base^(-2i/r) as real modules compute them (Hugging Face, Meta's Llama, litgpt): in
# float32, also in a float64 run (the float64 rule above: a constant held in float32). The rounding of an
# angle grows with the position p, so the reference's own error (``measured``) is computed with them too.
ROPE_ANGLES = torch.float32
# The next lower precision, for saying that a failure may be only a precision matter.
LOWER = {torch.float64: torch.float32, torch.float32: torch.float16, torch.float16: torch.bfloat16}
# How much worse than the float64 reference evaluated in low precision a module may be.
FUDGE = 10.0


# Scores of size |s| rounded to a precision of machine epsilon eps move the softmax weights by up to
# about eps * |s| (softmax is 1/2-Lipschitz in the max-norm), whatever the implementation: above this
# limit, a comparison of the weights with the float64 oracle checks nothing but luck (bfloat16 at
# |s| ~ 2000 cannot tell two keys 6 apart), so the example is not used and another is drawn. float32
# reaches it at |s| ~ 4e6, float64 (held in float32, the float64 rule) at the same.
CONDITIONING_LIMIT = 0.5


# Rotating q and k in the module's dtype rounds cos, sin and the rotated pairs: ~2 eps relative on each
# of q and k, so ~4 eps |q| |k| / sqrt(d) more on a score than the product's own rounding.
ROTARY_ROUNDINGS = 4


def softmax_rounding(dtype, score_magnitude, rotary=False):
    """The error of attention weights that rounding their scores (of size ``score_magnitude``) to the
    precision a correct module computing in ``dtype`` may hold them in costs: eps * |s| (with rotary
    embeddings applied in that precision, (1 + ROTARY_ROUNDINGS) eps * |s|)."""
    return torch.finfo(held_dtype(dtype)).eps * float(score_magnitude) * (1 + ROTARY_ROUNDINGS * bool(rotary))


def rotary_angle_rounding(num_positions, score_magnitude):
    """The error of scores of size ``score_magnitude`` that computing the rotary angles p * theta_k
    (theta_k <= 1, p < num_positions) in ROPE_ANGLES precision costs: an angle rounds by up to eps * p
    and turns q and k by as much, so a score moves by up to 2 eps p |q| |k| / sqrt(d). The observed
    scores stand in for |q| |k| / sqrt(d), with FUDGE for what they fall short of it."""
    return FUDGE * 2 * torch.finfo(ROPE_ANGLES).eps * num_positions * float(score_magnitude)


# The same two tokens scored at two positions by a correct module computing in a half precision: each score
# rounds cos, sin, the rotated q and k and their product, ~9 eps |q| |k| / sqrt(d) between the two if every
# rounding fell the same way; they do not: measured on Hugging Face's Llama, Mistral and Qwen2, the bundled
# gqa and a NeoX-style module with cached cos/sin tables (head_dim 4-32, up to 129 tokens, bases 10 and
# 1e4), at most 0.9 eps. Rotary angles rounded to the half precision instead (p * theta near 40 is 0.25 apart
# in bfloat16) differ by 2-13 eps from 65 tokens on.
ROTATED_SCORE_ROUNDINGS = 4


def rotated_score_rounding(dtype, score_magnitude):
    """The difference a correct module computing in ``dtype`` may show between the score of two tokens and
    the score of the same tokens at other positions, for scores bounded by ``score_magnitude`` (|q| |k| /
    sqrt(d)): ROTATED_SCORE_ROUNDINGS eps of it."""
    return ROTATED_SCORE_ROUNDINGS * torch.finfo(dtype).eps * float(score_magnitude)


def residual_rounding(dtype, magnitude):
    """The error of out - x for out = x + b computed by a correct module in ``dtype``, |x| + |b| <= ``magnitude``:
    b (a dropout-scaled value, 1/(1-p) held in the held precision) and the sum each round by half an ulp,
    so 2 eps * magnitude bounds it with room (exact values, not a kernel's reductions: RTOL would blur
    0, 1 and 1/(1-p) together in bfloat16)."""
    return 2 * torch.finfo(held_dtype(dtype)).eps * float(magnitude) + torch.finfo(dtype).tiny


def ill_conditioned(dtype, score_magnitude, rotary=False):
    """Why scores of size ``score_magnitude`` make ``dtype``'s attention weights meaningless, or None."""
    rounding = softmax_rounding(dtype, score_magnitude, rotary)
    if rounding > CONDITIONING_LIMIT:
        return (f"ill-conditioned in {str(dtype).replace('torch.', '')}: scores up to {score_magnitude:.3g} round by "
                f"up to {rounding:.3g}, so no precision-{str(dtype).replace('torch.', '')} weights can be compared")
    return None


def held_dtype(dtype):
    """The precision a correct module computing in ``dtype`` may hold its inputs and constants in: for
    float64, float32 (the float64 rule above); else ``dtype`` itself. An invariant measures the
    reference's own error on inputs rounded to it, so that error reflects the values' real sizes
    (values of 3 averaged to an output of 0.1 keep the rounding error of 3)."""
    return torch.float32 if dtype == torch.float64 else dtype


def allowed_error(dtype, magnitude, measured=0.0, bound=0.0):
    """Absolute error allowed between two computations of values of size ``magnitude``; ``bound`` is an
    a-priori bound on a correct implementation's error where rounding is amplified (``softmax_rounding``)."""
    return max(RTOL[dtype] * float(magnitude), FUDGE * float(measured), float(bound)) + torch.finfo(dtype).tiny


def gradient_magnitudes(magnitudes):
    """Gradients are compared normwise: each tensor's magnitude is at least the largest one's. The
    softmax backward cancels (a query's gradient is exactly 0 with one key, or with equal keys), and a
    correct kernel that cancels in another order leaves rounding of the size of the whole backward's
    terms (SDPA: 2.6e-10 where the oracle has 0, every other gradient ~1e-2)."""
    largest = max(magnitudes, default=0.0)
    return [max(m, largest) for m in magnitudes]


def assert_close(actual, expected, *, dtype, what, magnitude=None, measured=0.0, bound=0.0):
    """Raise Violation naming the worst element unless |actual - expected| <= allowed_error.

    A NaN or inf in ``actual`` where ``expected`` is finite always fails."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise Violation(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    bad = ~torch.isfinite(actual) & torch.isfinite(expected)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise Violation(f"{what}: non-finite value {actual[index].item()} at index {index}")
    if magnitude is None:
        magnitude = expected.abs().max().item() if expected.numel() else 0.0
    tol = allowed_error(dtype, magnitude, measured, bound)
    err = (actual - expected).abs().nan_to_num(0.0)
    if err.numel() and err.max().item() > tol:
        index = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        lower = LOWER.get(dtype)
        hint = ""
        if lower is not None and err.max().item() <= RTOL[lower] * float(magnitude):
            hint = (f"; only a precision matter? the error is within {str(lower).replace('torch.', '')}'s "
                    f"tolerance ({RTOL[lower] * float(magnitude):.3g}): a constant or a step computed in lower "
                    f"precision, or a small deviation of the formula")
        raise Violation(
            f"{what}: at index {index} got {actual[index].item():.10g}, expected "
            f"{expected[index].item():.10g} (|error| {err[index].item():.3g} > allowed {tol:.3g}){hint}"
        )

"""The one place numerical comparisons get their tolerance.

allowed = max(RTOL[dtype] * magnitude, FUDGE * measured), where ``magnitude`` is the size of the
values compared (max |reference|, at least the size of the input), and ``measured`` is, when a
float64 reference exists, the error of the same reference formula evaluated in the module's dtype
(the error any correct implementation in that dtype can be expected to make). This follows
PyTorch's SDPA tests: derive the bound from the dtype and the oracle's own error, never guess it.
"""

import torch

from attnspec.errors import Violation

# Relative error a correct kernel may make, in units of the values' magnitude: ~2**7 ulps for the
# float formats (reductions over d, exp, division), larger for the 8/11-bit mantissas.
RTOL = {
    torch.float64: 1e-11,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# How much worse than the float64 reference evaluated in low precision a module may be.
FUDGE = 10.0


def allowed_error(dtype, magnitude, measured=0.0):
    """Absolute error allowed between two computations of values of size ``magnitude``."""
    return max(RTOL[dtype] * float(magnitude), FUDGE * float(measured)) + torch.finfo(dtype).tiny


def assert_close(actual, expected, *, dtype, what, magnitude=None, measured=0.0):
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
    tol = allowed_error(dtype, magnitude, measured)
    err = (actual - expected).abs().nan_to_num(0.0)
    if err.numel() and err.max().item() > tol:
        index = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise Violation(
            f"{what}: at index {index} got {actual[index].item():.6g}, expected "
            f"{expected[index].item():.6g} (|error| {err[index].item():.3g} > allowed {tol:.3g})"
        )

"""The forward contract: what any module of the kind returns, and what it must leave alone."""

import torch

from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import ALL_KINDS, DROPOUT_KINDS, invariant
from attnspec.strategies import LARGE_SCALES, NONZERO_DROPOUTS, ZERO_DROPOUT, ZERO_OFFSET
from attnspec.tolerance import assert_close


@invariant("output-contract", "forward(x) is a Tensor of the kind's output shape, x's dtype and device",
           ALL_KINDS, "forward")
def output_contract(case):
    x = case.input()
    out = case.forward(x)  # checks Tensor and shape
    if out.dtype != x.dtype or out.device != x.device:
        raise Violation(f"output dtype/device {out.dtype}/{out.device}, expected {x.dtype}/{x.device}")


@invariant("finite-output", "finite x of any magnitude (|x| up to 1e4) gives finite output; softmax must not overflow",
           ALL_KINDS, "forward", scales=LARGE_SCALES)
def finite_output(case):
    # The input stays where the dtype can represent the scores (Config.input_magnitude: float16 |x| <= 4).
    case.forward(case.input())  # Case.forward rejects a non-finite output for a finite input, in every invariant


@invariant("input-not-mutated", "forward leaves its input bit-for-bit unchanged, in eval and in train mode",
           ALL_KINDS, "forward")
def input_not_mutated(case):
    x = case.input()
    before = x.clone()
    for train in (False, True):
        case.forward(x, train=train)
        if not torch.equal(x, before):
            changed = (x != before).nonzero()[0].tolist()
            raise Violation(f"forward ({'train' if train else 'eval'}) changed input at index {tuple(changed)}: "
                            f"{before[tuple(changed)].item():.6g} -> {x[tuple(changed)].item():.6g}")


@invariant("state-unchanged", "forward leaves every parameter and buffer unchanged (no in-place mask or weight edits)",
           ALL_KINDS, "forward")
def state_unchanged(case):
    def state():  # parameters and every buffer, persistent or not
        return {**dict(case.module.named_parameters()), **dict(case.module.named_buffers())}

    before = {k: v.detach().clone() for k, v in state().items()}
    x = case.input()
    for train in (False, True):
        case.forward(x, train=train)
        for name, value in state().items():
            if name not in before or not torch.equal(value.nan_to_num(7.0), before[name].nan_to_num(7.0)):
                raise Violation(f"forward ({'train' if train else 'eval'}) changed {name!r}")


@invariant("eval-deterministic", "in eval mode forward is a function: two calls on the same x agree, a later call "
                                  "leaves the returned tensor as it was, and a call on x laid out in memory otherwise "
                                  "agrees (float64: a non-contiguous view of its values)",
           ALL_KINDS, "forward", dropouts=NONZERO_DROPOUTS)  # p > 0: where an eval path that drops shows
def eval_deterministic(case):
    """The second call runs from another RNG state (eval must not use it); a call on another input then must leave
    the tensor the first call returned as it was (a static output buffer, as CUDA-graph replays keep, fails). The
    last call gets x's values with its last
    two dimensions' strides swapped, as a transposed activation or a slice hands them over: code that reads the
    input's memory as if contiguous (as_strided, data_ptr, a raw kernel) computes on other values; one that raises
    on it (a .view of the input) is let be. In float64 only, where another layout's kernels round far below the
    tolerance."""
    x = case.input()
    first = case.forward(x)
    returned = case.returned
    second = case.forward(x, seed_salt=1)
    assert_close(second, first, dtype=x.dtype, what="second eval forward vs first")
    if returned is not None:
        case.forward(case.input(salt=1))
        try:  # (a CUDA-graph replay marks the outputs it overwrote: reading them raises)
            kept = torch.equal(returned.detach(), first.detach())
        except RuntimeError as e:
            kept, why = False, f" (reading it raised: {e})"
        else:
            why = ""
        if not kept:
            raise Violation("the tensor the first eval forward returned changed when forward was called again on another "
                            "input: forward reuses its output buffer, so a caller that keeps an output gets later values"
                            + why)
    if x.dtype == torch.float64:  # (in the lower precisions another layout takes kernels that round otherwise)
        strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        try:
            out = case.forward(strided)
        except Violation:  # a module may require a contiguous input (Hugging Face's Conv1D views it): not wrong
            return
        assert_close(out, first, dtype=x.dtype,
                     what=f"eval forward of x non-contiguous (strides {strided.stride()}) vs contiguous")


@invariant("train-p0-equals-eval", "with dropout=0, train-mode forward equals eval-mode forward",
           DROPOUT_KINDS, "forward", dropouts=ZERO_DROPOUT)
def train_p0_equals_eval(case):
    x = case.input()
    assert_close(case.forward(x, train=True), case.forward(x), dtype=x.dtype, what="train (p=0) vs eval output")


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)  # an example's: (seed // 2) % 2 picks


@invariant("autocast-mixed-precision",
           "a float32 module that runs in bfloat16 (float16) also runs under torch.autocast to it, and agrees with its "
           "float32 forward to that dtype's precision",
           ALL_KINDS, "forward", dtypes=("float32",), offsets=ZERO_OFFSET)
def autocast_mixed_precision(case):
    """Mixed-precision training runs attention under torch.autocast: float32 parameters and input, matmuls in the
    low dtype, softmax and norms in float32. A mask value taken from the input's dtype (torch.finfo(float32).min)
    overflows the low-precision scores there. Asked only of modules that run in that dtype (a copy moved to it);
    the allowed error is the low dtype's, or FUDGE times the error that copy makes on x in the low dtype."""
    low = AUTOCAST_DTYPES[(case.cfg.seed // 2) % 2]
    name = str(low).replace("torch.", "")
    x = case.input()
    expected = case.forward(x)
    copy = case.build()
    try:
        copy = case.guard(f"module.to({name})", copy.to, low)
        in_low = case.forward(x.to(low), module=copy)
    except Violation:
        raise NotApplicable(f"the module does not run in {name}") from None
    with torch.autocast(x.device.type, dtype=low):
        mixed = case.forward(x)
    assert_close(mixed, expected, dtype=low, measured=(in_low.double() - expected.double()).abs().max().item(),
                 what=f"float32 forward under torch.autocast({name}) vs without autocast")

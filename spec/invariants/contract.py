"""The forward contract: what any module of the kind returns, and what it must leave alone."""

import torch

from attnspec.errors import Violation
from attnspec.invariants.base import ALL_KINDS, DROPOUT_KINDS, invariant
from attnspec.strategies import LARGE_SCALES, NONZERO_DROPOUTS, ZERO_DROPOUT
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


@invariant("eval-deterministic", "in eval mode forward is a function: two calls on the same x agree",
           ALL_KINDS, "forward", dropouts=NONZERO_DROPOUTS)  # p > 0: where an eval path that drops shows
def eval_deterministic(case):
    x = case.input()
    first = case.forward(x)
    second = case.forward(x, seed_salt=1)  # a different RNG state: eval must not use it
    assert_close(second, first, dtype=x.dtype, what="second eval forward vs first")


@invariant("train-p0-equals-eval", "with dropout=0, train-mode forward equals eval-mode forward",
           DROPOUT_KINDS, "forward", dropouts=ZERO_DROPOUT)
def train_p0_equals_eval(case):
    x = case.input()
    assert_close(case.forward(x, train=True), case.forward(x), dtype=x.dtype, what="train (p=0) vs eval output")

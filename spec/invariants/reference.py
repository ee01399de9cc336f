"""Differential checks against the float64 oracle on the module's own parameters."""

import torch

from attnspec import oracle
from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import ALL_KINDS, invariant
from attnspec.strategies import REGIMES
from attnspec.tolerance import ROPE_ANGLES, assert_close, held_dtype, ill_conditioned


def _projection_leaves(kind, parts):
    """(label, (weight, bias)) for every query/key/value projection in ``parts``."""
    if kind.structure == "wrapper":
        return [(f"head {h} {n}", head[n]) for h, head in enumerate(parts) for n in ("query", "key", "value")]
    att = parts["att"] if kind.structure == "block" else parts
    return [(n, att[n]) for n in ("query", "key", "value")]


def _tensors(parts):
    if isinstance(parts, torch.Tensor):
        return [parts]
    values = parts.values() if isinstance(parts, dict) else parts if isinstance(parts, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


@invariant("oracle-float64", "eval forward(x) equals the float64 oracle evaluated on the module's own parameters",
           ALL_KINDS, "params", regimes=REGIMES[:-1] + ("longest",))  # one example in eight past 256 tokens
def oracle_float64(case):
    parts, x = case.projections(), case.input()
    if case.kind.head_split and case.kind.structure == "attention" and "out" not in parts:
        raise NotApplicable("the output projection is not found (out_proj; an adapter can name it)")
    unusable = ill_conditioned(x.dtype, oracle.score_magnitude(case.kind, case.cfg, parts, x), case.cfg.rope)
    if unusable:
        raise NotApplicable(unusable, structural=False)
    gelu = case.contract.gelu
    expected = oracle.reference(case.kind, case.cfg, parts, x, gelu=gelu)
    held = held_dtype(x.dtype)  # the reference's own error, on inputs held as a correct module may hold them
    low = oracle.reference(case.kind, case.cfg, oracle.cast(parts, held), x.to(held), dtype=x.dtype, gelu=gelu,
                           angles=ROPE_ANGLES)
    measured = (low - expected).abs().max()
    assert_close(case.forward(x), expected, dtype=x.dtype, measured=measured,
                 magnitude=max(expected.abs().max().item(), 1e-30), what="output vs float64 oracle")


@invariant("qkv-bias", "qkv_bias=True gives the query/key/value projections a bias, False none; out_proj always has one "
           "(variant out-proj-no-bias: iff qkv_bias)",
           ALL_KINDS, "params")
def qkv_bias(case):
    parts = case.projections()
    for label, (_, bias) in _projection_leaves(case.kind, parts):
        if (bias is not None) != case.cfg.qkv_bias:
            raise Violation(f"qkv_bias={case.cfg.qkv_bias} but the {label} projection "
                            f"{'has a bias' if bias is not None else 'has no bias'}")
    out = (parts["att"] if case.kind.structure == "block" else parts).get("out") if isinstance(parts, dict) else None
    wanted = case.contract.out_proj_has_bias(case.cfg)
    if out is not None and case.kind.out_proj_bias and (out[1] is not None) != wanted:
        rule = ("variant out-proj-no-bias: one bias flag, a bias iff qkv_bias" if case.contract.out_proj_bias == "qkv_bias"
                else "the seed's out_proj is nn.Linear(d_out, d_out), with bias; one bias flag for every "
                     "projection is --variant out-proj-no-bias")
        raise Violation(f"qkv_bias={case.cfg.qkv_bias} but the output projection "
                        f"{'has no bias' if wanted else 'has a bias'} ({rule})")


@invariant("weight-transfer",
           "the seed's weight transfer: a module built from another seed, given these projections, computes the same output",
           ALL_KINDS, "params")
def weight_transfer(case):
    source = case.projections()
    covered = {t.data_ptr() for t in _tensors(source)}
    outside = [n for n, p in case.module.named_parameters() if p.data_ptr() not in covered]
    if outside:
        raise NotApplicable(f"parameters outside the projections cannot be transferred: {', '.join(outside[:4])}")
    other = case.build(seed=case.cfg.seed + 1)
    destination = case.projections(other)
    pairs = list(zip(_tensors(destination), _tensors(source)))
    if len(pairs) != len(_tensors(source)) or any(d.shape != s.shape for d, s in pairs):
        raise Violation("modules built from two seeds have differently shaped projections")
    with torch.no_grad():
        for d, s in pairs:
            d.copy_(s)
    x = case.input()
    assert_close(case.forward(x, module=other), case.forward(x), dtype=x.dtype,
                 what="output of a module given this module's projections vs this module")

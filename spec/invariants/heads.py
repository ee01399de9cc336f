"""Heads: the multi-head split and merge, the wrapper's concatenation, independent heads."""

import torch

from attnspec import oracle
from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import invariant
from attnspec.tolerance import assert_close, held_dtype


@invariant("head-split-equivalence",
           "mha(x) = out_proj(concat_h attention(x; rows h*hd:(h+1)*hd of W_query, W_key, W_value)), hd = d_out/num_heads",
           ("mha",), "params")
def head_split_equivalence(case):
    parts, x = case.projections(), case.input()
    if "out" not in parts:
        raise NotApplicable("no output projection found (out_proj)")

    def per_head(dtype, held=torch.float64):
        p, xd = oracle.cast(oracle.cast(parts, held), dtype), x.to(held).to(dtype)
        heads = [oracle.attention(xd, h, causal=True)[0] for h in oracle.head_slices(p, case.cfg.num_heads)]
        return oracle.linear(torch.cat(heads, dim=-1), p["out"])

    expected = per_head(torch.float64)
    assert_close(case.forward(x), expected, dtype=x.dtype, measured=(per_head(x.dtype, held_dtype(x.dtype)) - expected).abs().max(),
                 magnitude=max(expected.abs().max().item(), 1e-30),
                 what=f"mha output vs out_proj of {case.cfg.num_heads} concatenated single-head attentions")


@invariant("wrapper-concatenation", "wrapper(x) = concat(head_1(x), ..., head_H(x)) along the last dim, H = num_heads",
           ("mha-wrapper",), "structure")
def wrapper_concatenation(case):
    heads = case.guard("the adapter's heads()", case.target.adapter.heads, case.module)
    if heads is None:
        raise NotApplicable("the wrapper's heads are not found (no `heads` list; an adapter can name them)")
    if len(heads) != case.cfg.num_heads:
        raise Violation(f"the wrapper has {len(heads)} heads, expected num_heads={case.cfg.num_heads}")
    x = case.input()
    expected = torch.cat([case.guard(f"head {i}", head.eval(), x) for i, head in enumerate(heads)], dim=-1)
    assert_close(case.forward(x), expected, dtype=x.dtype, what="wrapper output vs concatenated head outputs")


@invariant("heads-independent", "the wrapper's heads share no parameter tensor and are initialized independently",
           ("mha-wrapper",), "params")
def heads_independent(case):
    heads = case.projections()
    for i in range(len(heads)):
        for j in range(i):
            for name in ("query", "key", "value"):
                a, b = heads[i][name][0], heads[j][name][0]
                if a.data_ptr() == b.data_ptr():
                    raise Violation(f"heads {j} and {i} share the {name} projection tensor")
                if torch.equal(a, b):
                    raise Violation(f"heads {j} and {i} have identical {name} weights (not independently initialized)")

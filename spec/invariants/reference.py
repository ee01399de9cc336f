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
           ALL_KINDS, "params", landmarks=True, regimes=REGIMES[:-1] + ("longest", "most", "widest") * 2,  # two in thirteen past 256
           extreme_dtype="float32")  # tokens, 16 heads, head_dim 128 each; in float32, well conditioned there
def oracle_float64(case):
    parts, x = case.projections(), case.input()
    if case.kind.head_split and case.kind.structure == "attention" and "out" not in parts:
        raise NotApplicable("the output projection is not found (out_proj; an adapter can name it)")
    unusable = ill_conditioned(x.dtype, oracle.score_magnitude(case.kind, case.cfg, parts, x), case.cfg.rope)
    if unusable:
        raise NotApplicable(unusable, structural=False)
    gelu = case.contract.gelu
    expected = oracle.reference(case.kind, case.cfg, parts, x, gelu=gelu)
    out, magnitude = case.forward(x.clone()), max(expected.abs().max().item(), 1e-30)  # (x kept: a module may change it)
    try:  # within RTOL[dtype] of the magnitude, the reference's own error need not be measured
        return assert_close(out, expected, dtype=x.dtype, magnitude=magnitude, what="output vs float64 oracle")
    except Violation:
        pass
    held = held_dtype(x.dtype)  # the reference's own error, on inputs held as a correct module may hold them
    low = oracle.reference(case.kind, case.cfg, oracle.cast(parts, held), x.to(held), dtype=x.dtype, gelu=gelu,
                           angles=ROPE_ANGLES)
    measured = (low - expected).abs().max()
    assert_close(out, expected, dtype=x.dtype, measured=measured, magnitude=magnitude, what="output vs float64 oracle")


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


LAYERS = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv1d)  # (and Hugging Face's Conv1D, by name)


def _in_layer(module, name):
    """Whether parameter ``name`` belongs to a projection or norm layer (anywhere on its path: a parametrized
    weight lives in the layer's ``parametrizations``): a projection attnspec did not recognise (an output
    projection named ``out``), not a parameter the specification lacks."""
    path = name.split(".")[:-1]
    owners = [module.get_submodule(".".join(path[:i])) for i in range(1, len(path) + 1)]
    return any(isinstance(o, LAYERS) or type(o).__name__ == "Conv1D" or type(o).__name__.endswith("RMSNorm")
               for o in owners)


def _outside_parameters_inert(case, names, x):
    """Violation if the output moves when the parameters ``names`` (in no projection or norm layer)
    take a random step of half their rms (of 1/2 where they are all zero): the specification's attention has no
    such parameter, so a learned temperature or a zero-initialised score bias, equal to it at initialisation,
    makes every trained module differ."""
    params = dict(case.module.named_parameters())
    before = case.forward(x)
    generator = torch.Generator().manual_seed(case.cfg.seed)
    with torch.no_grad():
        saved = {n: params[n].detach().clone() for n in names}
        for n in names:
            p = params[n]
            rms = p.double().pow(2).mean().sqrt().item() if p.numel() else 0.0
            step = torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5 * (rms or 1.0)
            p.add_(step.to(device=p.device, dtype=p.dtype))
    try:
        assert_close(case.forward(x), before, dtype=x.dtype, what="")
    except Violation:
        raise Violation(f"the output depends on parameters outside the specification's projections "
                        f"({', '.join(names[:4])}): after a random step of them it changes, and the specification's "
                        f"attention has no such parameter (a learned score scale or bias equals it only at "
                        f"initialisation)") from None
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


@invariant("weight-transfer",
           "the seed's weight transfer: a module built from another seed, given these projections, computes the same "
           "output (and no other parameter moves the output)",
           ALL_KINDS, "params")
def weight_transfer(case):
    source, x = case.projections(), case.input()
    covered = {t.data_ptr() for t in _tensors(source)}
    outside = [n for n, p in case.module.named_parameters() if p.data_ptr() not in covered]
    in_layers = [n for n in outside if _in_layer(case.module, n)]
    trained = [n for n, p in case.module.named_parameters() if n in outside and p.requires_grad]  # (frozen: buffers)
    if in_layers:
        raise NotApplicable(f"parameters outside the projections cannot be transferred: {', '.join(in_layers[:4])}")
    if trained:
        _outside_parameters_inert(case, trained, x)
    other = case.build(seed=case.cfg.seed + 1)
    destination = case.projections(other)
    pairs = list(zip(_tensors(destination), _tensors(source)))
    if len(pairs) != len(_tensors(source)) or any(d.shape != s.shape for d, s in pairs):
        raise Violation("modules built from two seeds have differently shaped projections")
    with torch.no_grad():
        for d, s in pairs:
            d.copy_(s)
        mine = dict(case.module.named_parameters())  # inert (above), copied so they cannot blur the comparison
        for name, p in other.named_parameters():
            if name in outside and p.shape == mine[name].shape:
                p.copy_(mine[name])
    assert_close(case.forward(x, module=other), case.forward(x), dtype=x.dtype,
                 what="output of a module given this module's projections vs this module")

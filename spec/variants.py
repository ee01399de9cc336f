"""Contract variants: named, documented deviations from the seed's contract that real code makes on purpose.

The seed's contract is the default. A variant is a record of what it changes in ``Contract``; a
target is checked against the default with its active variants applied (the adapter's declared
``variants`` plus each ``--variant NAME``), and the report says which. Invariants read the result as
``case.contract``; nothing else knows a variant's name.
"""

import dataclasses
from dataclasses import dataclass

from attnspec.errors import UsageError


@dataclass(frozen=True)
class Contract:
    """The choices of the seed's contract that a variant may change (the defaults are the seed's)."""

    out_proj_bias: str = "always"  # "always": out_proj = nn.Linear(d_out, d_out) with bias; "qkv_bias": iff qkv_bias
    gelu: str = "tanh"  # the block's feed-forward GELU: "tanh" 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))), "erf" 0.5x(1+erf(x/sqrt2))

    def out_proj_has_bias(self, cfg):
        return cfg.qkv_bias if self.out_proj_bias == "qkv_bias" else True


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str  # one line: what real code does and who does it
    changes: dict  # Contract field -> value
    invariants: tuple  # the invariant ids whose check reads the change


VARIANTS = {v.name: v for v in [
    Variant("out-proj-no-bias",
            "one bias flag for every projection: out_proj has a bias iff qkv_bias (nanoGPT, x-transformers, "
            "nn.MultiheadAttention(bias=...))",
            {"out_proj_bias": "qkv_bias"}, ("qkv-bias",)),
    Variant("gelu-erf",
            "the block's feed-forward uses the exact GELU 0.5x(1+erf(x/sqrt2)) instead of the tanh approximation "
            "(nn.GELU(), nn.TransformerEncoderLayer(activation='gelu'))",
            {"gelu": "erf"}, ("feedforward-gelu-tanh", "oracle-float64")),
]}


def check_names(names):
    """The names, sorted and deduplicated; a UsageError for one that is not in VARIANTS."""
    for name in names:
        if name not in VARIANTS:
            raise UsageError(f"unknown contract variant {name!r}: expected one of {', '.join(VARIANTS)} "
                             f"(`attnspec list --variants`)")
    return tuple(sorted(set(names)))


def contract(names=()):
    """The seed's contract with the named variants applied."""
    changes = {}
    for name in check_names(names):
        changes.update(VARIANTS[name].changes)
    return dataclasses.replace(Contract(), **changes)

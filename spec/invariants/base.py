"""The invariant record. The catalogue is data: the CLI, the pytest tests, SPEC.md and the reports
all read it. Adding an invariant means adding one decorated check function to a section module."""

from dataclasses import dataclass, field

ALL_KINDS = ("self-attention", "causal-attention", "mha-wrapper", "mha", "transformer-block", "gqa")
CAUSAL_KINDS = ("causal-attention", "mha-wrapper", "mha", "transformer-block", "gqa")
DROPOUT_KINDS = CAUSAL_KINDS
PADDING_KINDS = ("gqa",)  # forward(x, attention_mask=m) is checked where the module takes it
OBSERVES = {
    "forward": "black-box: calls forward only",
    "weights": "the attention weights, recorded by a softmax/dropout/matmul probe",
    "params": "the query/key/value/output projections (seed names or an adapter)",
    "weights+params": "the attention weights and the projections",
    "structure": "named sub-modules: the wrapper's heads, the block's att/ff (seed names or an adapter)",
}

CATALOGUE = []


@dataclass(frozen=True)
class Invariant:
    id: str  # stable: used by --only/--skip, reports and repro commands
    statement: str  # one line, the math
    kinds: tuple
    observes: str  # a key of OBSERVES
    section: str  # the spec module it lives in
    check: object = field(repr=False)  # check(case) -> None; raises Violation or NotApplicable
    configs: dict = field(default_factory=dict, repr=False)  # keyword overrides for strategies.configs
    landmarks: bool = False  # also checked at strategies.LANDMARKS (real sizes), once each, after a search that passed

    def applies_to(self, kind):
        """The kind is one of ``kinds`` and has every optional feature the invariant requires (a kind an
        adapter narrowed to a module without a sliding window has no sliding-window invariants)."""
        return kind.name in self.kinds and all(getattr(kind, f) for f in self.configs.get("require", ()))


def invariant(id, statement, kinds, observes, landmarks=False, **configs):
    """Register ``check(case)`` as an invariant of the catalogue (its ci budget: ``profiles.CI_EXAMPLES``)."""
    assert observes in OBSERVES, observes

    def register(check):
        section = check.__module__.rsplit(".", 1)[-1]
        CATALOGUE.append(Invariant(id, statement, tuple(kinds), observes, section, check, configs, landmarks))
        return check

    return register

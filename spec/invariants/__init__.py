"""The catalogue of invariants, one module per section of the spec, in reading order."""

from attnspec.invariants import block, causality, contract, dropout, gradients, heads, history, modern, reference, weights  # noqa: F401  (registers)
from attnspec.invariants.base import CATALOGUE, OBSERVES, Invariant

SECTIONS = ["contract", "causality", "weights", "dropout", "heads", "reference", "gradients", "history", "modern", "block"]
CATALOGUE.sort(key=lambda inv: SECTIONS.index(inv.section))
BY_ID = {inv.id: inv for inv in CATALOGUE}

__all__ = ["CATALOGUE", "BY_ID", "OBSERVES", "Invariant"]

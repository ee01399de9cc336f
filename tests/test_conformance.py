"""Every invariant of the catalogue, driven by Hypothesis, on every target it applies to
(the bundled impl modules, or those given with --impl)."""

import pytest

from attnspec.invariants import CATALOGUE
from attnspec.plugin import conformance_targets
from attnspec.runner import Tally, hypothesis_test


def pytest_generate_tests(metafunc):
    if {"invariant", "target"} <= set(metafunc.fixturenames):
        pairs = [(inv, t) for t in conformance_targets(metafunc.config) for inv in CATALOGUE if inv.applies_to(t.kind)]
        metafunc.parametrize("invariant,target", pairs, ids=[f"{inv.id}[{t.spec}]" for inv, t in pairs])


def test_invariant_holds(invariant, target):
    tally = Tally()
    hypothesis_test(invariant, target, tally=tally)()
    if tally.internal:  # attnspec's own code raised: an error of the harness, never a pass
        pytest.fail(f"attnspec internal error on {tally.internal[0].to_json()}: {tally.internal[1]}")
    if tally.checked == 0:
        pytest.skip(f"not applicable: {tally.na_reason or tally.unsupported_reason}")

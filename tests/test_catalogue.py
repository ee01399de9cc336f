"""The catalogue is complete, consistent, and SPEC.md says what it says."""

import re
from pathlib import Path

import pytest

from attnspec import report
from attnspec.invariants import CATALOGUE, OBSERVES
from attnspec.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]


def test_ids_are_unique_stable_kebab_case():
    ids = [inv.id for inv in CATALOGUE]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    bad = [i for i in ids if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i)]
    assert not bad, f"ids must be kebab-case: {bad}"


@pytest.mark.parametrize("inv", CATALOGUE, ids=lambda inv: inv.id)
def test_every_invariant_is_fully_described(inv):
    assert inv.statement and "\n" not in inv.statement, f"{inv.id}: statement must be one line"
    assert inv.kinds and set(inv.kinds) <= set(KINDS), f"{inv.id}: kinds {inv.kinds} not all in {list(KINDS)}"
    assert inv.observes in OBSERVES, f"{inv.id}: observes={inv.observes!r} not in {list(OBSERVES)}"
    assert callable(inv.check)


def test_every_kind_is_covered_by_invariants():
    for kind in KINDS:
        assert sum(kind in inv.kinds for inv in CATALOGUE) >= 8, f"kind {kind} has few invariants"


def test_spec_md_is_generated_from_the_catalogue():
    expected = report.catalogue_markdown(CATALOGUE, OBSERVES)
    actual = (ROOT / "SPEC.md").read_text()
    assert actual == expected, "SPEC.md is stale: run `attnspec list --markdown > SPEC.md`"

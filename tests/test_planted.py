"""The harness rejects every planted bug (tests/planted.py), through the public check path.

1. every bug of the corpus fails each invariant its record says ``catches`` it;
2. every invariant of the catalogue rejects at least one planted bug;
3. a failure report is readable: the counterexample is minimal and the repro line reproduces it.

(The correct modules are checked by tests/test_conformance.py.) ``ATTNSPEC_PLANTED_ALL=1`` also
checks each bug's ``also`` invariants: they reject it too, but their counterexamples are slower to
find and shrink, so the default run leaves them out.
"""

import os
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from spec.invariants import BY_ID, CATALOGUE
from spec.kinds import KINDS, Config
from spec.runner import Options, check_target
from spec.targets import resolve

PLANTED = Path(__file__).with_name("planted.py")
if str(PLANTED.parent) not in sys.path:
    sys.path.insert(0, str(PLANTED.parent))
from planted import CORPUS  # noqa: E402

BY_NAME = {bug.name: bug for bug in CORPUS}


def _target(kind, name):
    """The target as a user writes it: relative to the working directory when that is shorter."""
    path = os.path.relpath(PLANTED) if not os.path.relpath(PLANTED).startswith("..") else str(PLANTED)
    return resolve(f"{kind}={path}:{name}")


@lru_cache(maxsize=None)
def _check(name, ids):
    bug = BY_NAME[name]
    return {r.invariant: r for r in check_target(_target(bug.kind, name), Options(only=ids)).results}


def _assert_rejected(bug, ids):
    results = _check(bug.name, tuple(ids))
    missed = {i: f"{results[i].status}: {results[i].reason}" for i in ids if results[i].status != "fail"}
    assert not missed, f"{bug.kind}={bug.name} ({bug.note}) is not rejected by {missed}"
    for i in ids:
        r = results[i]
        assert r.counterexample and r.reason and r.repro.startswith("attnspec check "), r


@pytest.mark.parametrize("bug", CORPUS, ids=[bug.name for bug in CORPUS])
def test_planted_bug_is_rejected(bug):
    _assert_rejected(bug, bug.catches)


ALSO = [bug for bug in CORPUS if bug.also]


@pytest.mark.skipif(not os.environ.get("ATTNSPEC_PLANTED_ALL"), reason="set ATTNSPEC_PLANTED_ALL=1 to run")
@pytest.mark.parametrize("bug", ALSO, ids=[bug.name for bug in ALSO])
def test_planted_bug_is_also_rejected(bug):
    _assert_rejected(bug, bug.also)


def test_corpus_records_are_well_formed():
    names = [bug.name for bug in CORPUS]
    assert len(names) == len(set(names)), "duplicate bug names"
    for bug in CORPUS:
        assert bug.kind in KINDS, bug
        assert bug.catches, f"{bug.name}: catches is empty"
        assert not set(bug.catches) & set(bug.also), f"{bug.name}: an id in both catches and also"
        for inv_id in (*bug.catches, *bug.also):
            assert inv_id in BY_ID, f"{bug.name}: unknown invariant id {inv_id!r}"
            assert BY_ID[inv_id].applies_to(KINDS[bug.kind]), f"{bug.name}: {inv_id} does not apply to {bug.kind}"


def test_every_invariant_rejects_a_planted_bug():
    caught = {inv_id for bug in CORPUS for inv_id in bug.catches}
    missing = [inv.id for inv in CATALOGUE if inv.id not in caught]
    assert not missing, f"invariants shown to reject no planted bug: {missing}"


def test_every_kind_has_planted_bugs():
    assert {bug.kind for bug in CORPUS} == set(KINDS)


def _reproduce(bug, result):
    """Run the repro line's --example through the public path: it must fail the same invariant."""
    argv = shlex.split(result.repro)
    assert argv[:2] == ["attnspec", "check"] and argv[argv.index("--only") + 1] == result.invariant, result.repro
    example = Config.from_json(argv[argv.index("--example") + 1])
    assert example.to_json() == Config(**result.counterexample).to_json()
    kind, _, ref = argv[2].partition("=")
    assert kind == bug.kind and ref.endswith(f"planted.py:{bug.name}"), argv[2]
    again = check_target(resolve(argv[2]), Options(only=(result.invariant,)), example=example).results[0]
    assert again.status == "fail", again


def test_report_scaling_bug_is_minimal():
    """sqrt(d_out) vs sqrt(head_dim) needs two heads, and no more: the counterexample has exactly that."""
    bug = BY_NAME["ScaleByDOut"]
    result = _check(bug.name, ("scaling-sqrt-head-dim",))["scaling-sqrt-head-dim"]
    cfg = result.counterexample
    assert result.status == "fail"
    assert cfg["num_heads"] == 2 and cfg["d_out"] == 2 and cfg["batch"] == 1, cfg
    assert cfg["num_tokens"] == 2 and cfg["d_in"] <= 2 and cfg["dropout"] == 0.0 and not cfg["qkv_bias"], cfg
    assert "sqrt(d_out=2)" in result.reason, result.reason  # the diagnosis names the wrong scale
    _reproduce(bug, result)


def test_report_masking_bug_is_minimal():
    """A future leak needs two tokens and one head; the report says which positions changed."""
    bug = BY_NAME["MaskFillZero"]
    result = _check(bug.name, ("causal-perturbation",))["causal-perturbation"]
    cfg = result.counterexample
    assert result.status == "fail"
    assert cfg["num_tokens"] == 2 and cfg["num_heads"] == 1 and cfg["batch"] == 1, cfg
    assert cfg["d_in"] <= 2 and cfg["d_out"] <= 2 and cfg["dropout"] == 0.0 and cfg["dtype"] == "float32", cfg
    assert "positions <= 0" in result.reason, result.reason
    _reproduce(bug, result)


def test_report_shape_dependent_bug_needs_a_short_sequence():
    """mask[:T] only breaks when num_tokens < context_length: the counterexample is the smallest such."""
    bug = BY_NAME["MaskRowsOnly"]
    result = _check(bug.name, ("output-contract",))["output-contract"]
    cfg = result.counterexample
    assert result.status == "fail"
    assert cfg["num_tokens"] == 1 and cfg["context_length"] == 2 and cfg["batch"] == 1, cfg
    assert "forward raised" in result.reason, result.reason
    _reproduce(bug, result)


@pytest.mark.parametrize("name,kind", [("SelfSteps", "self-attention"), ("CausalSteps", "causal-attention"),
                                       ("MHASteps", "mha")])
def test_step_templates_are_correct(name, kind):
    """The templates the bugs override are the impl modules' forward, step by step: each bug is ONE change."""
    results = check_target(_target(kind, name), Options(only=("oracle-float64", "scaling-sqrt-head-dim"))).results
    assert all(r.status == "pass" for r in results), [(r.invariant, r.status, r.reason) for r in results]

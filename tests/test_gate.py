"""The gate cannot go green on nothing (issue 11, part 1): n/a fails it unless accepted, rejected
configurations do not use up the budget, a selection that checks nothing is a usage error, and every
report says how much was checked. Modules: tests/gate_targets/vacuous.py.

Exit statuses under test: 0 checked and holds, 1 violation, 2 usage error, 3 not fully checked
(n/a not accepted), 4 internal error (precedence 2, 1, 4, 3, 0: ``runner.exit_status``)."""

import json
import re
import xml.etree.ElementTree as ET

import pytest

from attnspec.invariants import BY_ID, CATALOGUE
from attnspec.kinds import KINDS
from attnspec.runner import Options, Result, TargetReport, check_invariant, exit_status
from attnspec.targets import resolve
from test_cli import GOOD, assert_no_traceback, assert_usage_error, attnspec, check, target_report

VACUOUS = "tests/gate_targets/vacuous.py"
FAST = ("--profile", "ci", "--max-examples", "5")


def _report(*statuses, accepted=""):
    return TargetReport(resolve(GOOD), [Result(f"i{n}", s, accepted=accepted) for n, s in enumerate(statuses)])


@pytest.mark.parametrize("statuses,accepted,expected", [
    (("pass",), "", 0),
    (("pass", "not-applicable"), "", 3),
    (("pass", "not-applicable"), "accepted: reason", 0),
    (("not-applicable",), "accepted: reason", 3),  # nothing checked at all is never green
    (("pass", "fail", "not-applicable", "internal-error"), "", 1),
    (("pass", "not-applicable", "internal-error"), "", 4),
    ((), "", 3),
])
def test_exit_status_precedence(statuses, accepted, expected):
    assert exit_status([_report(*statuses, accepted=accepted)]) == expected
    assert exit_status([_report(*statuses, accepted=accepted)], usage_error=True) == 2


def test_adapter_declining_configurations_does_not_hide_a_leaking_mask(tmp_path):
    """The README-style adapter declines 15 of 16 drawn configurations; they are replaced by supported
    ones (not counted), so the budget is spent on checks and the next-token leak is found: exit 1."""
    spec = f"mha={VACUOUS}:LeakyNanoGPT"
    proc, report = check(spec, *FAST, "--only", "output-contract,causal-perturbation", tmp_path=tmp_path)
    assert_no_traceback(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = {r["invariant"]: r for r in target_report(report, spec)["results"]}
    assert results["causal-perturbation"]["status"] == "fail", results
    contract = results["output-contract"]
    assert contract["status"] == "pass" and contract["examples"] >= 5 and contract["rejected"] > 0, contract


def test_adapter_declining_everything_is_not_fully_checked(tmp_path):
    spec = f"mha={VACUOUS}:DeclinesEverything"
    proc, report = check(spec, *FAST, "--only", "output-contract,causal-perturbation", tmp_path=tmp_path)
    assert_no_traceback(proc)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert report["exit_status"] == 3 and report["passed"] is False
    for r in target_report(report, spec)["results"]:
        assert r["status"] == "not-applicable" and r["examples"] == 0 and "unsupported" in r["reason"], r
    assert re.search(r"^verdict: NOT FULLY CHECKED.*\(exit 3\): 1 targets, 0 invariants checked", proc.stdout, re.M)


def test_hidden_projections_and_a_scaling_bug_do_not_pass(tmp_path):
    """Every parameter- and weight-level invariant is n/a, so the 1/sqrt(d_model) bug goes unseen:
    the gate says so (exit 3) instead of exiting 0; accepting the n/a's explicitly makes it 0."""
    spec = f"mha={VACUOUS}:HiddenProjections"
    only = ("--only", "output-contract,oracle-float64,scaling-sqrt-head-dim")
    proc, report = check(spec, *FAST, *only, tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    statuses = {r["invariant"]: r["status"] for r in target_report(report, spec)["results"]}
    assert statuses == {"output-contract": "pass", "oracle-float64": "not-applicable",
                        "scaling-sqrt-head-dim": "not-applicable"}
    assert re.search(r"n/a oracle-float64 on .*projections are not found.*not accepted", proc.stdout), proc.stdout

    accepted, report = check(spec, *FAST, *only, "--accept-na", "oracle-float64,scaling-*", tmp_path=tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert all(r["accepted"] for r in target_report(report, spec)["results"] if r["status"] == "not-applicable")


@pytest.mark.parametrize("suffix,text", [
    (".txt", "# accepted\nmha=*vacuous.py:HiddenProjections  oracle-float64  # names we do not use\n"
             "mha=*vacuous.py:HiddenProjections  scaling-*       # fused kernel\n"
             "mha=*:Nowhere  qkv-bias  # matches nothing\n"),
    (".toml", '[[accept-na]]\ntarget = "mha=*vacuous.py:HiddenProjections"\n'
              'invariants = ["oracle-float64", "scaling-*"]\nreason = "fused"\n'
              '[[accept-na]]\ntarget = "mha=*:Nowhere"\ninvariants = ["qkv-bias"]\n'),
    (".json", json.dumps([{"target": "mha=*vacuous.py:HiddenProjections", "invariants": ["oracle-float64", "scaling-*"],
                           "reason": "fused"}, {"target": "mha=*:Nowhere", "invariant": "qkv-bias"}])),
])
def test_expectations_file_accepts_n_a_and_warns_about_unmatched_entries(suffix, text, tmp_path):
    path = tmp_path / f"expect{suffix}"
    path.write_text(text)
    spec = f"mha={VACUOUS}:HiddenProjections"
    proc, report = check(spec, *FAST, "--only", "output-contract,oracle-float64,scaling-sqrt-head-dim",
                         "--expectations", str(path), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"warning: expectation mha=\*:Nowhere qkv-bias .* matches no checked", proc.stderr), proc.stderr
    accepted = [r for r in target_report(report, spec)["results"] if r["status"] == "not-applicable"]
    assert len(accepted) == 2 and all(r["accepted"] for r in accepted), accepted
    assert "accepted:" in proc.stdout


@pytest.mark.parametrize("text,pattern", [
    ("mha=* no-such-invariant\n", r"expect\.txt:1: 'no-such-invariant' matches no invariant id"),
    ("mha=*\n", r"expect\.txt:1: expected `TARGET-glob INVARIANT-glob"),
])
def test_bad_expectations_file_is_a_usage_error(text, pattern, tmp_path):
    path = tmp_path / "expect.txt"
    path.write_text(text)
    assert_usage_error(attnspec("check", GOOD, *FAST, "--expectations", str(path)), pattern)


@pytest.mark.parametrize("args,pattern", [
    (["self-attention=attnspec.impl:SelfAttention_v1", "--only", "head-split-equivalence"],
     r"--only head-split-equivalence does not apply to kind self-attention"),
    ([GOOD, "--only", "output-contract", "--skip", "output-contract"],
     r"--only and --skip both name output-contract"),
    (["self-attention=attnspec.impl:SelfAttention_v1", GOOD, "--only", "head-split-equivalence"],
     r"leave nothing to check on kind self-attention"),
    ([GOOD, "--accept-na", "no-such-id"], r"'no-such-id' matches no invariant id"),
])
def test_selection_that_checks_nothing_is_a_usage_error(args, pattern):
    assert_usage_error(attnspec("check", *args, *FAST), pattern)


def test_rejected_examples_do_not_count_toward_the_budget():
    """SelfAttention_v1 has no qkv_bias parameter: qkv_bias=False is drawn, never declined."""
    target = resolve("self-attention=attnspec.impl:SelfAttention_v1")
    result = check_invariant(BY_ID["output-contract"], target, Options(profile="ci", max_examples=7))
    assert result.status == "pass" and result.examples >= 7 and result.unsupported == 0, result
    declining = resolve(f"mha={VACUOUS}:LeakyNanoGPT")
    result = check_invariant(BY_ID["output-contract"], declining, Options(profile="ci", max_examples=7))
    assert result.status == "pass" and result.examples >= 7 and result.rejected > 0, result


def test_example_that_the_target_declines_is_not_a_pass():
    from attnspec.kinds import Config

    cfg = Config(d_in=2, d_out=4, num_heads=2, context_length=3, num_tokens=3, batch=1, dropout=0.0,
                 qkv_bias=False, dtype="float32", scale=1.0, seed=0)
    result = check_invariant(BY_ID["output-contract"], resolve(f"mha={VACUOUS}:LeakyNanoGPT"), Options(), example=cfg)
    assert result.status == "not-applicable" and result.examples == 0, result


def test_every_report_says_how_much_was_checked(tmp_path):
    md, xml = tmp_path / "summary.md", tmp_path / "junit.xml"
    spec = f"mha={VACUOUS}:HiddenProjections"
    proc, report = check(spec, GOOD, *FAST, "--only", "output-contract,oracle-float64", "--report-md", str(md),
                         "--junit-xml", str(xml), tmp_path=tmp_path)
    assert proc.returncode == 3
    assert re.search(rf"^\[1\] {re.escape(spec)}: NOT FULLY CHECKED \(1 checked \(5 examples each\), 0 failed, "
                     r"1 n/a not accepted, 0 n/a accepted, \d+ do not apply to mha, \d+ deselected\)(; projections: .*)?$", proc.stdout, re.M)
    counts = target_report(report, GOOD)["counts"]
    assert counts["checked"] == 2 and counts["not_for_kind"] == len(CATALOGUE) - sum(
        inv.applies_to(KINDS["mha"]) for inv in CATALOGUE) and counts["examples_min"] >= 5, counts
    text = md.read_text()
    assert "NOT FULLY CHECKED" in text and "(exit 3)" in text and "### Not applicable" in text
    assert "projections are not found" in text and "**not accepted**" in text
    suite = ET.parse(xml).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {f"{i}[{s}]" for i in ("output-contract", "oracle-float64") for s in (spec, GOOD)}
    assert cases[f"oracle-float64[{spec}]"].find("failure").get("type") == "attnspec.not-checked"
    assert cases[f"output-contract[{GOOD}]"].find("failure") is None
    assert suite.get("tests") == "4" and suite.get("failures") == "1"


def test_junit_xml_renders_a_violation_and_an_accepted_n_a(tmp_path):
    xml = tmp_path / "junit.xml"
    proc = attnspec("check", "mha=tests/bad_targets/returns_tuple.py:MHA", f"mha={VACUOUS}:HiddenProjections", *FAST,
                    "--only", "output-contract,oracle-float64", "--accept-na", "oracle-float64", "--junit-xml", str(xml))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    failure = cases["output-contract[mha=tests/bad_targets/returns_tuple.py:MHA]"].find("failure")
    assert failure.get("type") == "attnspec.violation" and "tuple" in failure.get("message")
    assert "reproduce: attnspec check" in failure.text
    assert cases[f"oracle-float64[mha={VACUOUS}:HiddenProjections]"].find("skipped") is not None


def test_version_and_no_numpy_warning():
    from attnspec import __version__

    proc = attnspec("--version", fresh=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"attnspec {__version__}", proc.stdout + proc.stderr
    assert "NumPy" not in proc.stderr


def test_no_targets_says_it_checks_the_bundled_modules():
    proc = attnspec("check", "--profile", "ci", "--max-examples", "1", "--only", "output-contract")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no targets given: checking the 7 bundled modules of attnspec.impl" in proc.stderr

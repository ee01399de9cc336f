"""The command line as a user meets it: `python -m attnspec ...` in its own process, bad input included.

Contract under test (other tools depend on it):

* exit 0: every applicable invariant was checked and holds for every target; 1: at least one is
  violated (a module that raises, returns the wrong type or shape, produces NaN, or hangs past the
  time limit is a violation); 2: usage error, with a one-line ``attnspec: error: ...`` message on
  stderr; 3: not fully checked (an n/a the user did not accept); 4: internal error of attnspec;
* the harness never crashes (no Python traceback) and a bad target never hides another target's
  results;
* the JSON report has ``targets[*].{kind,target,results[*].{invariant,status}}`` and, for a failure,
  ``counterexample`` and ``repro`` (a shell command line that reproduces it).

The broken modules live in ``tests/bad_targets/`` (one concern each). Every check runs the ``ci``
profile (derandomized: the same verdict on every run) with few examples or ``--only``, to stay fast.

Most runs call ``attnspec.cli.main`` in the test process (importing torch costs ~3 s a process);
``test_fresh_process_entry_points`` and the repro test run ``[sys.executable, "-m", "attnspec", ...]`` and
the ``attnspec`` console script in their own processes; ``ATTNSPEC_TEST_FRESH=1`` runs every test that way.
"""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from attnspec.cli import main
from attnspec.report import md_code

ROOT = Path(__file__).resolve().parents[1]
BAD = "tests/bad_targets"
GOOD = "mha=attnspec.impl:MultiHeadAttention"
STATUSES = {"pass", "fail", "not-applicable", "internal-error"}
FAST = ("--profile", "ci", "--max-examples", "5")
TIMEOUT_S = 180
ENV = {**{k: v for k, v in os.environ.items() if k != "HYPOTHESIS_PROFILE"},
       "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def bad(name, attr="MHA"):
    return f"mha={BAD}/{name}.py:{attr}"


def attnspec(*args, fresh=False, console_script=False, timeout=TIMEOUT_S):
    """Run `attnspec ARGS` from the repo root: in this process (``attnspec.cli.main``, stdout and stderr
    captured, an escaping exception printed as the interpreter would), or (fresh) in its own
    ``[sys.executable, "-m", "attnspec", *ARGS]`` process, or (console_script) the installed ``attnspec``."""
    if console_script:
        argv = [str(Path(sys.executable).with_name("attnspec")), *args]
    elif fresh or os.environ.get("ATTNSPEC_TEST_FRESH"):
        argv = [sys.executable, "-m", "attnspec", *args]
    else:
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(list(args))
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    rc = 1
        finally:
            os.chdir(cwd)
        return subprocess.CompletedProcess(["attnspec", *args], rc, out.getvalue(), err.getvalue())
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def check(*args, tmp_path, fresh=False):
    """``attnspec check ARGS --report-json``: (completed process, parsed JSON report or None)."""
    path = tmp_path / f"report-{time.monotonic_ns()}.json"
    proc = attnspec("check", *args, "--report-json", str(path), fresh=fresh)
    return proc, (json.loads(path.read_text()) if path.exists() else None)


def assert_no_traceback(proc):
    for stream, text in (("stderr", proc.stderr), ("stdout", proc.stdout)):
        assert "Traceback (most recent call last)" not in text, f"the harness crashed ({stream}):\n{text}"


def assert_usage_error(proc, pattern):
    """Exit 2, nothing on stdout, exactly one stderr line ``attnspec: error: ...`` matching pattern."""
    assert_no_traceback(proc)
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("attnspec: error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    assert proc.stdout == "", f"a usage error printed a report:\n{proc.stdout}"


def target_report(report, spec):
    kind, _, name = spec.partition("=")
    found = [t for t in report["targets"] if t["kind"] == kind and t["target"] == name]
    assert len(found) == 1, f"{spec} not (once) in the report: {[(t['kind'], t['target']) for t in report['targets']]}"
    return found[0]


def assert_report_shape(report):
    assert isinstance(report["targets"], list) and report["targets"]
    for t in report["targets"]:
        assert {"kind", "target", "results"} <= t.keys()
        assert t["results"], f"{t['target']}: no results"
        for r in t["results"]:
            assert {"invariant", "status"} <= r.keys()
            assert r["status"] in STATUSES, r
            if r["status"] == "fail":
                assert isinstance(r["counterexample"], dict) and r["counterexample"], r
                assert r["repro"].startswith("attnspec check "), r


def assert_all_good(report, spec=GOOD):
    results = target_report(report, spec)["results"]
    bad_results = [r for r in results if r["status"] not in ("pass", "not-applicable")]
    assert not bad_results, f"{spec} is correct but got {bad_results}"
    assert any(r["status"] == "pass" for r in results), f"{spec}: nothing was checked: {results}"


def run_repro(repro):
    """The report's repro line, `attnspec check ...`, run through this interpreter."""
    argv = shlex.split(repro)
    assert argv[:2] == ["attnspec", "check"], repro
    return attnspec(*argv[1:], fresh=True)


# ---------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line on stderr naming the problem, nothing checked.

USAGE_ERRORS = {
    "unknown-kind": (["foo=attnspec.impl:MultiHeadAttention"], r"unknown kind 'foo'.*self-attention.*transformer-block"),
    "no-equals": (["mha"], r"malformed target 'mha'.*KIND=module:Attr"),
    "no-colon": (["mha=attnspec.impl"], r"malformed target 'attnspec.impl'.*module:Attr"),
    "empty-attr": (["mha=attnspec.impl:"], r"malformed target 'attnspec.impl:'"),
    "missing-file": ([bad("no_such_file")], r"tests/bad_targets/no_such_file\.py.*not found"),
    "missing-module": (["mha=no_such_pkg.attn:MHA"], r"cannot import module 'no_such_pkg\.attn'.*No module named 'no_such_pkg'"),
    "missing-attr": (["mha=attnspec.impl:NoSuchAttention"], r"'attnspec.impl' has no attribute 'NoSuchAttention'.*MultiHeadAttention"),
    "missing-attr-in-file": ([bad("not_callable", "Nope")], r"not_callable\.py' has no attribute 'Nope'"),
    "wrong-signature": ([bad("wrong_signature")], r"cannot be called with the mha kind's arguments: expected "
                        r"MHA\(d_in, d_out, .*the target is MHA\(d_model, n_heads\).*adapter"),
    "not-callable": ([bad("not_callable")], r"not_callable\.py:MHA' is not a class, factory or adapter: it is int"),
    "import-raises-file": ([bad("raises_on_import")], r"importing 'tests/bad_targets/raises_on_import\.py' raised RuntimeError: broken at import time"),
    "import-raises-module": (["mha=tests.bad_targets.raises_on_import:MHA"], r"importing 'tests\.bad_targets\.raises_on_import' raised RuntimeError"),
    "unknown-only-id": ([GOOD, "--only", "unknown-id"], r"unknown invariant id 'unknown-id'.*attnspec list"),
    "unknown-skip-id": ([GOOD, "--skip", "output-contract,no-such-id"], r"unknown invariant id 'no-such-id'"),
    "max-examples-0": ([GOOD, "--max-examples", "0"], r"--max-examples=0 must be at least 1"),
    "example-not-json": ([GOOD, "--example", "{not json"], r"--example is not a configuration JSON"),
    "example-missing-keys": ([GOOD, "--example", '{"d_in": 2}'], r"--example is not a configuration JSON.*missing"),
}


@pytest.mark.parametrize("args,pattern", list(USAGE_ERRORS.values()), ids=list(USAGE_ERRORS))
def test_usage_error_exits_2_with_one_line(args, pattern):
    assert_usage_error(attnspec("check", *args, "--profile", "ci"), pattern)


def test_usage_error_stops_before_checking_good_targets(tmp_path):
    """A bad target among good ones is still a usage error: nothing is checked, no report written."""
    proc, report = check(GOOD, "mha=attnspec.impl:NoSuchAttention", "--only", "output-contract", tmp_path=tmp_path)
    assert_usage_error(proc, r"NoSuchAttention")
    assert report is None


# ---------------------------------------------------------------------------------------------
# Violations: exit 1, the failing invariant and the cause in stdout and in the JSON report, and the
# correct target checked in the same call still reported, all pass / n/a.

VIOLATIONS = {
    "constructor-raises": ("constructor_raises", [], "output-contract",
                           r"the constructor raised RuntimeError: MHA is not implemented yet"),
    "raises-for-one-token": ("raises_one_token", [], "output-contract",
                             r"forward raised ValueError: need at least two tokens"),
    "returns-tuple": ("returns_tuple", [], "output-contract",
                      r"forward returned a (builtins\.)?tuple, expected a torch\.Tensor"),
    "returns-numpy": ("returns_numpy", [], "output-contract",
                      r"forward returned a numpy\.ndarray, expected a torch\.Tensor"),
    "wrong-shape": ("wrong_shape", ["--only", "output-contract"], "output-contract",
                    r"forward returned shape \(\d+, \d+, \d+\), expected \(\d+, \d+, \d+\)"),
    "nan-for-short-input": ("nan_short", ["--only", "finite-output"], "finite-output", r"(?i)\bnan\b"),
    "mutates-input": ("mutates_input", ["--only", "input-not-mutated"], "input-not-mutated",
                      r"forward \(eval\) changed input at index"),
    "never-returns": ("hangs", ["--time-limit", "1"], "output-contract", r"forward did not return within 1 s"),
    "exits-in-forward": ("exits_in_forward", [], "output-contract", r"forward raised SystemExit"),
}


@pytest.mark.parametrize("module,extra,invariant,cause", list(VIOLATIONS.values()), ids=list(VIOLATIONS))
def test_violation_exits_1_names_invariant_and_cause(module, extra, invariant, cause, tmp_path):
    spec = bad(module)
    start = time.monotonic()
    proc, report = check(spec, GOOD, *FAST, *extra, tmp_path=tmp_path)
    assert_no_traceback(proc)
    assert proc.returncode == 1, f"exit {proc.returncode}, expected 1\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert f"FAIL {invariant} on {spec}" in proc.stdout, proc.stdout
    assert re.search(cause, proc.stdout), f"cause {cause!r} not named in stdout:\n{proc.stdout}"
    assert report is not None, "no JSON report written"
    assert_report_shape(report)
    assert report.get("passed", False) is False
    failed = {r["invariant"]: r for r in target_report(report, spec)["results"] if r["status"] == "fail"}
    assert invariant in failed, f"{invariant} not failed in the JSON report: {sorted(failed)}"
    assert re.search(cause, failed[invariant]["reason"]), failed[invariant]
    assert_all_good(report)  # the good target, checked after the bad one, is all there
    assert time.monotonic() - start < 90, "the check took too long (time limit not applied?)"


def test_printing_module_passes_with_a_warning_and_clean_stdout(tmp_path):
    """print() in forward: exit 0, a warning in the report, the module's text kept out of stdout."""
    spec = bad("prints")
    proc, report = check(spec, GOOD, *FAST, "--only", "output-contract,eval-deterministic,causal-perturbation",
                         tmp_path=tmp_path)
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DEBUG-FROM-USER-MODULE" not in proc.stdout, f"the module's print leaked into the report:\n{proc.stdout}"
    assert re.search(rf"warning: {re.escape(spec)} printed \d+ characters to stdout", proc.stdout), proc.stdout
    assert re.search(rf"^\[1\] {re.escape(spec)}: ok \(3 checked \(5 examples each\), 0 failed, 0 n/a not accepted, "
                     rf"0 n/a accepted, \d+ do not apply to mha, \d+ deselected\)$", proc.stdout, re.M), proc.stdout
    assert_report_shape(report)
    assert_all_good(report, spec)
    assert_all_good(report)
    assert target_report(report, spec).get("stdout_chars", 1) > 0


# ---------------------------------------------------------------------------------------------
# Reports, list, repro.

def test_json_report_fields(tmp_path):
    proc, report = check(bad("returns_tuple"), GOOD, *FAST, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert_report_shape(report)
    assert [(t["kind"], t["target"]) for t in report["targets"]] == [
        ("mha", f"{BAD}/returns_tuple.py:MHA"), ("mha", "attnspec.impl:MultiHeadAttention")]
    failure = next(r for r in target_report(report, bad("returns_tuple"))["results"] if r["status"] == "fail")
    assert failure["invariant"] == "output-contract"
    assert {"d_in", "d_out", "num_heads", "context_length", "num_tokens", "batch", "dtype", "seed"} <= failure["counterexample"].keys()
    assert "--example" in failure["repro"] and "--only output-contract" in failure["repro"]
    good = target_report(report, GOOD)["results"]
    assert all(r.get("counterexample") in (None, {}) and not r.get("repro") for r in good)


def test_report_md_writes_a_markdown_table(tmp_path):
    md = tmp_path / "summary.md"
    proc = attnspec("check", bad("returns_numpy"), GOOD, *FAST, "--only", "output-contract,finite-output",
                    "--report-md", str(md))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = md.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("## attnspec: ❌ FAIL") and "(exit 1)" in lines[0], lines[0]
    targets = next(i for i, line in enumerate(lines) if line.startswith("| target |"))
    assert md_code(bad("returns_numpy")) in lines[targets + 2], lines[targets + 2]
    assert md_code(GOOD) in lines[targets + 3], lines[targets + 3]
    header = next(i for i, line in enumerate(lines) if line.startswith("| invariant |"))
    assert re.fullmatch(r"\|(---\|){3}", lines[header + 1]), lines[header + 1]
    rows = {line.split("|")[1].strip(): line for line in lines[header + 2:] if line.startswith("| <code>")}
    assert set(rows) == {"<code>output-contract</code>", "<code>finite-output</code>"}, rows
    assert all(line.count("|") == 4 for line in rows.values()), rows
    assert "numpy.ndarray" in text  # the failure is explained under the table


def test_list_prints_every_invariant_id():
    from attnspec.invariants import CATALOGUE

    proc = attnspec("list")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line and not line[0].isspace()}
    assert listed == {inv.id for inv in CATALOGUE}
    assert len(CATALOGUE) >= 20


@pytest.mark.slow
def test_fresh_process_entry_points(tmp_path):
    """The real entry points, cold: `python -m spec` (a violation beside a good target, a usage error)
    and the installed `attnspec` console script."""
    spec = bad("returns_tuple")
    proc, report = check(spec, GOOD, *FAST, tmp_path=tmp_path, fresh=True)
    assert_no_traceback(proc)
    assert proc.returncode == 1 and f"FAIL output-contract on {spec}" in proc.stdout, proc.stdout + proc.stderr
    assert_report_shape(report)
    assert_all_good(report)
    assert_usage_error(attnspec("check", "mha=attnspec.impl", fresh=True), r"malformed target 'attnspec.impl'")
    script = Path(sys.executable).with_name("attnspec")
    if script.exists():
        proc = attnspec("check", "nope=attnspec.impl:MultiHeadAttention", console_script=True)
        assert_usage_error(proc, r"unknown kind 'nope'")


def test_repro_line_from_the_json_report_reproduces_the_failure(tmp_path):
    """A failure found by search (NaN only for num_tokens < context_length, not in the simplest
    configuration): its repro line, run as given, fails the same invariant on the same config."""
    spec = bad("nan_short")
    proc, report = check(spec, *FAST, "--only", "finite-output", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failure = next(r for r in target_report(report, spec)["results"] if r["status"] == "fail")
    cex = failure["counterexample"]
    assert cex["num_tokens"] < cex["context_length"], cex
    again = run_repro(failure["repro"])
    assert_no_traceback(again)
    assert again.returncode == 1, again.stdout + again.stderr
    assert f"FAIL finite-output on {spec}" in again.stdout
    assert re.search(r"(?i)\bnan\b", again.stdout)
    # the same configuration on a correct module passes: the example, not the harness, fails
    ok = attnspec("check", GOOD, "--only", "finite-output", "--example", json.dumps(cex))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_no_targets_checks_the_bundled_modules(tmp_path):
    proc, report = check("--profile", "ci", "--max-examples", "1", "--only", "output-contract", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {t["kind"] for t in report["targets"]} == {"self-attention", "causal-attention", "mha-wrapper", "mha", "gqa",
                                                      "transformer-block"}
    for t in report["targets"]:
        assert [r["status"] for r in t["results"]] == ["pass"], t


# ---------------------------------------------------------------------------------------------
# A new user's first session: a subtle bug, a failing check that names it, a fix, a green check.

USER_MODULE = '''\
import torch
import torch.nn as nn


class MyMHA(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / SCALE ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, self.d_out))
'''


def test_new_user_walkthrough(tmp_path):
    """Scaling by sqrt(d_out) instead of sqrt(head_dim) agrees with the seed for one head only."""
    module = tmp_path / "my_attention.py"
    module.write_text(USER_MODULE.replace("SCALE", "self.d_out"))
    spec = f"mha={module}:MyMHA"
    args = (*FAST, "--only", "output-contract,causal-perturbation,scaling-sqrt-head-dim")

    proc, report = check(spec, *args, tmp_path=tmp_path)
    assert_no_traceback(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL scaling-sqrt-head-dim on {spec}" in proc.stdout, proc.stdout
    statuses = {r["invariant"]: r["status"] for r in target_report(report, spec)["results"]}
    assert statuses == {"output-contract": "pass", "causal-perturbation": "pass", "scaling-sqrt-head-dim": "fail"}
    failure = next(r for r in target_report(report, spec)["results"] if r["status"] == "fail")
    assert failure["counterexample"]["num_heads"] > 1, failure  # one head hides the bug

    module.write_text(USER_MODULE.replace("SCALE", "self.head_dim"))
    proc, report = check(spec, *args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert_all_good(report, spec)


# ---------------------------------------------------------------------------------------------
# Bad options are usage errors (exit 2, one line), found before any module is checked.


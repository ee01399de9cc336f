"""Reports cannot be forged: every string a module or a path puts into a report is escaped for its
medium (issue 12, "Reports that can be forged"). Pure functions of TargetReports: no module runs."""

import json
import re
import xml.etree.ElementTree as ET

from attnspec import report
from attnspec.invariants import CATALOGUE, OBSERVES
from attnspec.kinds import KINDS
from attnspec.runner import Options, Result, TargetReport
from attnspec.targets import Adapter, Target

HOSTILE = ("boom</details><script>alert(1)</script>\n# All checks passed\n```\n| fake | row |\n"
           "\x1b[2J\x1b[32m[1] mha=x: ok\x1b[0m \ud800 \u202e `code` [link](http://x) $x$ & <b>")
SPEC_NAME = "weird|`dir`/<a>.py:A\x1b[31m"


def _reports():
    target = Target(KINDS["mha"], SPEC_NAME, Adapter())
    cex = {"d_in": 1, "d_out": 2}
    results = [Result("output-contract", "pass", examples=25),
               Result("causal-perturbation", "fail", reason=HOSTILE, counterexample=cex, repro=f"attnspec check {HOSTILE}"),
               Result("oracle-float64", "not-applicable", reason=HOSTILE),
               Result("qkv-bias", "not-applicable", reason=HOSTILE, accepted=HOSTILE),
               Result("weight-transfer", "internal-error", reason=HOSTILE)]
    return [TargetReport(target, results)]


def test_markdown_cannot_be_forged():
    text = report.to_markdown(_reports(), "attnspec-ci")
    for raw in ("<script", "</details>", "```", "\x1b", "\ud800", "\u202e", "](http", "<b>", "$x$"):
        assert raw not in text, raw
    headings = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert all(line.startswith(("## attnspec:", "### ")) for line in headings), headings
    for line in text.splitlines():  # every table row has its own columns only
        if line.startswith("| [1]"):
            assert line.count("|") == 9, line
        elif line.startswith("| <code>"):
            assert line.count("|") == 3, line
    blocks = re.findall(r"<pre>(.*?)</pre>", text, re.S)
    assert blocks and all("<" not in b for b in blocks), blocks
    assert text.count("<pre>") == text.count("</pre>") == len(blocks)
    assert "&#92;x1b" in text  # shown, not interpreted


def test_terminal_shows_control_characters_visibly():
    text = report.matrix(_reports()) + "\n" + report.details(_reports()) + "\n" + report.verdict(_reports())
    assert not any(not c.isprintable() for c in text.replace("\n", "")), repr(text)
    assert "\\x1b[2J" in text and "\\ud800" in text and "\\u202e" in text
    forged = [line for line in text.splitlines() if line.startswith("[1] mha=x")]
    assert not forged, forged
    assert re.search(r"^verdict: FAIL", text, re.M)


def test_junit_and_json_stay_well_formed():
    xml = report.to_junit(_reports(), "attnspec-ci")
    cases = ET.fromstring(xml.split("\n", 1)[1]).find("testsuite").findall("testcase")
    assert len(cases) == 5
    assert "\x1b" not in xml and "\ud800" not in xml
    data = json.loads(json.dumps(report.to_json(_reports(), "attnspec-ci", Options())))
    assert data["exit_status"] == 1 and data["targets"][0]["results"][1]["reason"] == HOSTILE


def test_spec_md_rows_have_as_many_cells_as_their_header():
    columns = None
    for line in report.catalogue_markdown(CATALOGUE, OBSERVES).splitlines():
        if not line.startswith("|"):
            columns = None
        elif columns is None:
            columns = line.count("|")  # the table's header row
        else:
            assert line.count("|") == columns, line

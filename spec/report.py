"""Reports: the terminal matrix (invariants x targets), JSON, Markdown, JUnit XML. Only formatting
lives here; the verdict is ``runner.exit_status``.

Every report says how much was checked (invariants checked, n/a with the reason and whether the user
accepted it, invariants that do not apply to the kind, examples per invariant), and every string a
module or a path can put into a report is escaped for its medium: control characters (ANSI escapes,
newlines, lone surrogates, bidi overrides) are shown as ``\\x1b``-style escapes on the terminal and in
XML; Markdown gets HTML entities for every character that could open a structure (``| ` * _ [ ] < > &
# ~ ! \\ $``), and multi-line text goes into ``<pre>`` blocks whose content cannot close them."""

import json
import platform
import xml.etree.ElementTree as ET

import torch

from attnspec.invariants import BY_ID, CATALOGUE
from attnspec.runner import EXIT, exit_status, result_status
from attnspec.variants import VARIANTS

LEGEND = "pass = checked and holds; N/A = not checked and not accepted; n/a = not checked, accepted; · = does not apply to the kind"


# --- escaping ------------------------------------------------------------------------------------

def _escape_char(c):
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text):
    """``text`` with every non-printable character (control, format, separator, surrogate) written as a
    Python-style escape: a module's ANSI codes or newlines cannot redraw the terminal or forge a line."""
    return "".join(c if c.isprintable() else _escape_char(c) for c in str(text))


_MD = str.maketrans({c: f"&#{ord(c)};" for c in "&<>|`*_[]\\#~!$"})


def md_text(text):
    """Inline Markdown (a table cell, a list item): visible, with structure characters as HTML entities."""
    return visible(text).translate(_MD)


def md_code(text):
    return f"<code>{md_text(text)}</code>"


def md_block(text):
    """A ``<pre>`` block: an HTML block in GitHub Markdown, ended only by a ``</pre>`` the escaping rules out."""
    return "<pre>" + "\n".join(md_text(line) for line in str(text).split("\n")) + "</pre>"


# --- counting ------------------------------------------------------------------------------------

def _mark(result, marks):
    if result.status == "not-applicable":
        return marks["accepted" if result.accepted else "not-applicable"]
    return marks.get(result.status, result.status)


MARK = {"pass": "pass", "fail": "FAIL", "not-applicable": "N/A", "accepted": "n/a", "internal-error": "ERROR"}
VERDICT = {0: "ok", 1: "FAIL", 3: "NOT FULLY CHECKED", 4: "INTERNAL ERROR"}


def _cell(rep, inv_id, marks):
    """The mark of ``inv_id`` on one target, or "·" where the invariant does not apply to its kind."""
    result = next((r for r in rep.results if r.invariant == inv_id), None)
    return _mark(result, marks) if result else "·"


def _ids(reports):
    """Catalogue order, only the invariants some target was checked against."""
    return [inv_id for inv_id in BY_ID if any(r.invariant == inv_id for rep in reports for r in rep.results)]


def counts(rep):
    """How much of the catalogue was checked on one target."""
    kind = rep.target.kind
    statuses = [r.status for r in rep.results]
    examples = [r.examples for r in rep.results if r.status == "pass"]
    applicable = sum(inv.applies_to(kind) for inv in CATALOGUE)
    return {
        "checked": statuses.count("pass"),
        "failed": statuses.count("fail"),
        "internal_errors": statuses.count("internal-error"),
        "not_applicable": sum(r.status == "not-applicable" and not r.accepted for r in rep.results),
        "accepted_not_applicable": sum(r.status == "not-applicable" and bool(r.accepted) for r in rep.results),
        "not_for_kind": len(CATALOGUE) - applicable,
        "deselected": applicable - len(rep.results),
        "examples_min": min(examples, default=0),
        "examples_max": max(examples, default=0),
        "rejected": sum(r.rejected for r in rep.results),
    }


def _examples(c):
    lo, hi = c["examples_min"], c["examples_max"]
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summary(rep):
    """One line: how much was checked on ``rep``'s target."""
    c = counts(rep)
    parts = [f"{c['checked']} checked ({_examples(c)} examples each)", f"{c['failed']} failed",
             f"{c['not_applicable']} n/a not accepted", f"{c['accepted_not_applicable']} n/a accepted",
             f"{c['not_for_kind']} do not apply to {rep.target.kind.name}"]
    if c["internal_errors"]:
        parts.insert(2, f"{c['internal_errors']} internal errors")
    if c["deselected"]:
        parts.append(f"{c['deselected']} deselected")
    return ", ".join(parts)


def totals(reports):
    """What the run checked, summed over its targets."""
    total = {k: sum(counts(rep)[k] for rep in reports) for k in ("checked", "failed", "not_applicable",
                                                                   "accepted_not_applicable", "internal_errors")}
    examples = [r.examples for rep in reports for r in rep.results if r.status == "pass"]
    span = f"{min(examples)}-{max(examples)}" if examples and min(examples) != max(examples) else f"{max(examples, default=0)}"
    return (f"{len(reports)} targets, {total['checked']} invariants checked ({span} examples each), "
            f"{total['failed']} failed, {total['internal_errors']} internal errors, "
            f"{total['not_applicable']} n/a not accepted, {total['accepted_not_applicable']} n/a accepted")


def verdict(reports):
    """The run's last line: the exit status, what it means, and the totals."""
    code = exit_status(reports)
    return f"verdict: {EXIT[code]} (exit {code}): {totals(reports)}"


# --- terminal ------------------------------------------------------------------------------------

def header(profile, options, targets):
    lines = [f"attnspec: profile={profile} dtypes={','.join(options.dtypes)} device={options.device} "
             f"torch={torch.__version__} python={platform.python_version()}"]
    lines += [f"  {t.kind.name:<18} {visible(t.name)}  ({visible(type(t.adapter).__name__)}){visible(_variants_text(t))}"
              for t in targets]
    return "\n".join(lines)


def _variants_text(target):
    """' variants: a, b' for a target checked against contract variants, else ''."""
    return f" variants: {', '.join(target.variants)}" if getattr(target, "variants", ()) else ""


def matrix(reports):
    ids = _ids(reports)
    cols = [f"[{i + 1}]" for i in range(len(reports))]
    width = max(len(i) for i in ids) if ids else 10
    lines = [" " * width + "  " + "  ".join(f"{c:>5}" for c in cols)]
    for inv_id in ids:
        marks = [_cell(rep, inv_id, MARK) for rep in reports]
        lines.append(f"{inv_id:<{width}}  " + "  ".join(f"{m:>5}" for m in marks))
    lines.append(f"({LEGEND})")
    for col, rep in zip(cols, reports):
        lines.append(f"{col} {visible(rep.target.spec)}: {VERDICT[rep.status]} ({summary(rep)})"
                     + visible(_variants_text(rep.target))
                     + (f"; projections: {visible(rep.layout)}" if rep.layout else ""))
    return "\n".join(lines)


def details(reports):
    """For each failure: statement, minimal counterexample, the offending values, one repro line;
    then every n/a with its reason and what was rejected or captured, so nothing is silent."""
    lines = []
    for rep in reports:
        spec = visible(rep.target.spec)
        for r in rep.results:
            if r.status == "fail":
                inv = BY_ID[r.invariant]
                lines += [f"FAIL {r.invariant} on {spec}",
                          f"  invariant: {inv.statement}",
                          f"  counterexample: {visible(_config_text(r.counterexample))}",
                          f"  {visible(r.reason)}",
                          f"  reproduce: {visible(r.repro)}", ""]
            elif r.status == "internal-error":
                lines += [f"INTERNAL ERROR {r.invariant} on {spec} (a bug in attnspec, not in the module)",
                          f"  {visible(r.reason)}",
                           f"  configuration: {visible(_config_text(r.counterexample))}",
                           f"  reproduce: {visible(r.repro)}", ""]
        for r in (r for r in rep.results if r.status == "not-applicable"):
            tail = f" [accepted: {visible(r.accepted)}]" if r.accepted else " [not accepted: exit 3; see --accept-na]"
            lines.append(f"n/a {r.invariant} on {spec}: {visible(r.reason)}{tail}")
        rejected = [r for r in rep.results if r.rejected and r.status == "pass"]
        if rejected:
            lines.append(f"note: {spec}: {sum(r.rejected for r in rejected)} drawn configurations rejected and "
                         f"replaced by supported ones ({visible(rejected[0].reason)})")
        if rep.printed:
            lines.append(f"warning: {spec} printed {rep.printed} characters to stdout during the "
                         f"check (captured; modules should not print in forward)")
    return "\n".join(lines)


def item_text(target, result):
    """One result as the pytest plugin reports a failing item: what failed or why it was not checked."""
    spec = visible(target.spec)
    if result.status == "fail":
        return "\n".join([f"FAIL {result.invariant} on {spec}", f"  invariant: {BY_ID[result.invariant].statement}",
                          f"  counterexample: {visible(_config_text(result.counterexample))}",
                          f"  {visible(result.reason)}", f"  reproduce: {visible(result.repro)}"])
    if result.status == "not-applicable":
        return (f"NOT CHECKED {result.invariant} on {spec}: n/a: {visible(result.reason)}\n"
                f"  an n/a fails the gate unless accepted: add `{spec} {result.invariant}  # why` to the expectations "
                f"file (--attnspec-expectations or the ini key attnspec_expectations)")
    return f"INTERNAL ERROR {result.invariant} on {spec} (a bug in attnspec, not in the module): {visible(result.reason)}"


def _config_text(cfg):
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) if cfg else ""


# --- JSON ----------------------------------------------------------------------------------------

def to_json(reports, profile, options):
    code = exit_status(reports)
    return {
        "attnspec": 2,
        "profile": profile,
        "torch": torch.__version__,
        "dtypes": list(options.dtypes),
        "device": options.device,
        "exit_status": code,
        "verdict": EXIT[code],
        "passed": code == 0,
        "targets": [
            {
                "kind": rep.target.kind.name,
                "target": rep.target.name,
                "status": {0: "pass", 1: "fail", 3: "not-fully-checked", 4: "internal-error"}[rep.status],
                "exit_status": rep.status,
                "counts": counts(rep),
                "layout": rep.layout,
                "variants": list(getattr(rep.target, "variants", ())),
                "stdout_chars": rep.printed,
                "results": [
                    {"invariant": r.invariant, "status": r.status, "statement": BY_ID[r.invariant].statement,
                     "examples": r.examples, "budget": r.budget, "rejected": r.rejected, "unsupported": r.unsupported,
                     "seconds": r.seconds, "reason": r.reason, "accepted": r.accepted,
                     "counterexample": r.counterexample, "repro": r.repro, "layout": r.layout}
                    for r in rep.results
                ],
            }
            for rep in reports
        ],
    }


def write_json(path, reports, profile, options):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_json(reports, profile, options), f, indent=2)


# --- Markdown (a GitHub job summary) -------------------------------------------------------------

ICON = {"pass": "✅", "fail": "❌", "not-applicable": "⚠️ n/a", "accepted": "n/a", "internal-error": "💥"}
VERDICT_ICON = {0: "✅", 1: "❌", 3: "⚠️", 4: "💥"}


def to_markdown(reports, profile):
    code = exit_status(reports)
    lines = [f"## attnspec: {VERDICT_ICON[code]} {md_text(EXIT[code])} (exit {code})", "",
             md_text(totals(reports)) + f"; profile {md_code(profile)}", "",
             "| target | verdict | checked | failed | n/a not accepted | n/a accepted | do not apply to the kind "
             "| examples per invariant |", "|---|---|---|---|---|---|---|---|"]
    for i, rep in enumerate(reports, 1):
        c = counts(rep)
        lines.append(f"| [{i}] {md_code(rep.target.spec)} | {md_text(VERDICT[rep.status])} | {c['checked']} | "
                     f"{c['failed']} | {c['not_applicable']} | {c['accepted_not_applicable']} | {c['not_for_kind']} | "
                     f"{_examples(c)} |")
    lines += ["", "| invariant | " + " | ".join(f"[{i}]" for i in range(1, len(reports) + 1)) + " |",
              "|---|" + "---|" * len(reports)]
    for inv_id in _ids(reports):
        lines.append(f"| {md_code(inv_id)} | " + " | ".join(_cell(rep, inv_id, ICON) for rep in reports) + " |")
    lines += ["", md_text(LEGEND)]
    lines += [f"\n{md_code(rep.target.spec)} checked against contract variants: {md_text(', '.join(rep.target.variants))}"
              for rep in reports if getattr(rep.target, "variants", ())]
    not_applicable = [(rep, r) for rep in reports for r in rep.results if r.status == "not-applicable"]
    if not_applicable:
        lines += ["", "### Not applicable", ""]
        for rep, r in not_applicable:
            tail = f" (accepted: {md_text(r.accepted)})" if r.accepted else " — **not accepted**"
            lines.append(f"- {md_code(r.invariant)} on {md_code(rep.target.spec)}: {md_text(r.reason)}{tail}")
    problems = [(rep, r) for rep in reports for r in rep.results if r.status in ("fail", "internal-error")]
    if problems:
        lines += ["", "### Failures", ""]
        for rep, r in problems:
            text = (f"{r.reason}" if r.status == "internal-error" else
                    f"counterexample: {_config_text(r.counterexample)}\n{r.reason}\nreproduce: {r.repro}")
            lines += [f"{ICON[r.status]} {md_code(r.invariant)} on {md_code(rep.target.spec)}: "
                      f"{md_text(BY_ID[r.invariant].statement)}", "", md_block(text), ""]
    layouts = [(rep.target.spec, rep.layout) for rep in reports if rep.layout]
    if layouts:
        lines += ["", "Projections found: " + "; ".join(f"{md_code(spec)}: {md_text(layout)}" for spec, layout in layouts)]
    return "\n".join(lines) + "\n"


# --- JUnit XML -----------------------------------------------------------------------------------

def junit_name(target_spec, inv_id):
    """The test name shared by the CLI's JUnit XML and the pytest plugin's items."""
    return f"{inv_id}[{target_spec}]"


def to_junit(reports, profile):
    """One testcase per (target, invariant): a violation is a <failure>, an n/a not accepted a <failure>
    of type not-checked, an accepted n/a <skipped>, an internal error an <error>."""
    cases = [(rep, r) for rep in reports for r in rep.results]
    suite = ET.Element("testsuite", name="attnspec", tests=str(len(cases)),
                       failures=str(sum(result_status(r) in (1, 3) for _, r in cases)),
                       errors=str(sum(r.status == "internal-error" for _, r in cases)),
                       skipped=str(sum(r.status == "not-applicable" and bool(r.accepted) for _, r in cases)),
                       time=f"{sum(r.seconds for _, r in cases):.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in (("profile", profile), ("torch", torch.__version__), ("exit_status", str(exit_status(reports)))):
        ET.SubElement(props, "property", name=name, value=value)
    for rep, r in cases:
        case = ET.SubElement(suite, "testcase", classname="attnspec", name=visible(junit_name(rep.target.spec, r.invariant)),
                             time=f"{r.seconds:.3f}")
        if r.status == "fail":
            el = ET.SubElement(case, "failure", type="attnspec.violation", message=visible(r.reason))
            el.text = visible(f"invariant: {BY_ID[r.invariant].statement}\ncounterexample: "
                              f"{_config_text(r.counterexample)}\n") + visible(r.reason) + "\nreproduce: " + visible(r.repro)
        elif r.status == "internal-error":
            ET.SubElement(case, "error", type="attnspec.internal-error", message=visible(r.reason))
        elif r.status == "not-applicable" and r.accepted:
            ET.SubElement(case, "skipped", message=visible(f"n/a (accepted: {r.accepted}): {r.reason}"))
        elif r.status == "not-applicable":
            ET.SubElement(case, "failure", type="attnspec.not-checked",
                          message=visible(f"not checked (n/a, not accepted): {r.reason}"))
        else:
            ET.SubElement(case, "system-out").text = f"{r.examples} examples checked ({r.rejected} rejected)"
    root = ET.Element("testsuites")
    root.append(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path, reports, profile):
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_junit(reports, profile))


# --- SPEC.md -------------------------------------------------------------------------------------

def catalogue_markdown(catalogue, observes):
    """SPEC.md: the human-readable spec, generated from the catalogue (a test keeps them in sync)."""
    lines = ["# The attnspec specification", "",
             "Generated by `attnspec list --markdown > SPEC.md` from the catalogue in `spec/invariants/`; "
             "`tests/test_catalogue.py` fails when the two disagree.", "",
             "What an invariant observes:", ""]
    lines += [f"- **{k}**: {md_text(v)}" for k, v in observes.items()]
    section = None
    for inv in catalogue:
        if inv.section != section:
            section = inv.section
            lines += ["", f"## {section}", "", "| id | statement | kinds | observes |", "|---|---|---|---|"]
        lines.append(f"| {md_code(inv.id)} | {md_text(inv.statement)} | {md_text(', '.join(inv.kinds))} | {md_text(inv.observes)} |")
    lines += ["", "## Contract variants", "",
              "The seed's contract is the default. `attnspec check --variant NAME` (or an adapter's `variants`) "
              "checks a module against a named variation instead; the report says which.", "",
              "| variant | what it changes | invariants |", "|---|---|---|"]
    lines += [f"| {md_code(v.name)} | {md_text(v.summary)} | {', '.join(md_code(i) for i in v.invariants)} |"
              for v in VARIANTS.values()]
    return "\n".join(lines) + "\n"

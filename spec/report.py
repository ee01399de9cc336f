"""Reports: the terminal matrix (invariants x targets), JSON, Markdown. Only formatting lives here."""

import json
import platform

import torch

from attnspec.invariants import BY_ID

MARK = {"pass": "pass", "fail": "FAIL", "not-applicable": "n/a", "internal-error": "ERROR"}


def _cell(rep, inv_id, marks):
    """The mark of ``inv_id`` on one target, or "·" where the invariant does not apply to its kind."""
    result = next((r for r in rep.results if r.invariant == inv_id), None)
    return marks[result.status] if result else "·"


def _ids(reports):
    """Catalogue order, only the invariants some target was checked against."""
    return [inv_id for inv_id in BY_ID if any(r.invariant == inv_id for rep in reports for r in rep.results)]


def header(profile, options, targets):
    lines = [f"attnspec: profile={profile} dtypes={','.join(options.dtypes)} device={options.device} "
             f"torch={torch.__version__} python={platform.python_version()}"]
    lines += [f"  {t.kind.name:<18} {t.name}  ({type(t.adapter).__name__})" for t in targets]
    return "\n".join(lines)


def _short(report):
    return report.target.spec if len(report.target.spec) <= 40 else "..." + report.target.spec[-37:]


def matrix(reports):
    ids = _ids(reports)
    cols = [f"[{i + 1}]" for i in range(len(reports))]
    width = max(len(i) for i in ids) if ids else 10
    lines = [" " * width + "  " + "  ".join(f"{c:>5}" for c in cols)]
    for inv_id in ids:
        marks = [_cell(rep, inv_id, MARK) for rep in reports]
        lines.append(f"{inv_id:<{width}}  " + "  ".join(f"{m:>5}" for m in marks))
    lines.append("(· = the invariant does not apply to the kind)")
    for col, rep in zip(cols, reports):
        counts = {s: sum(r.status == s for r in rep.results) for s in MARK}
        verdict = "FAIL" if rep.failed else "ok"
        lines.append(f"{col} {rep.target.spec}: {verdict} ({counts['pass']} pass, {counts['fail']} fail, "
                     f"{counts['not-applicable']} n/a)")
    return "\n".join(lines)


def details(reports):
    """For each failure: statement, minimal counterexample, the offending values, one repro line;
    then what was skipped or captured, so nothing is silent."""
    lines = []
    for rep in reports:
        for r in rep.results:
            if r.status == "fail":
                inv = BY_ID[r.invariant]
                lines += [f"FAIL {r.invariant} on {rep.target.spec}",
                          f"  invariant: {inv.statement}",
                          f"  counterexample: {_config_text(r.counterexample)}",
                          f"  {r.reason}",
                          f"  reproduce: {r.repro}", ""]
        unsupported = [r for r in rep.results if r.unsupported]
        if unsupported:
            total = sum(r.unsupported for r in unsupported)
            lines.append(f"note: {rep.target.spec}: {total} drawn configurations skipped as unsupported "
                         f"({unsupported[0].reason})")
        for r in (r for r in rep.results if r.status == "not-applicable"):
            lines.append(f"n/a {r.invariant} on {rep.target.spec}: {r.reason}")
        if rep.printed:
            lines.append(f"warning: {rep.target.spec} printed {rep.printed} characters to stdout during the "
                         f"check (captured; modules should not print in forward)")
    return "\n".join(lines)


def _config_text(cfg):
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) if cfg else ""


def to_json(reports, profile, options):
    return {
        "attnspec": 1,
        "profile": profile,
        "torch": torch.__version__,
        "dtypes": list(options.dtypes),
        "device": options.device,
        "passed": not any(rep.failed for rep in reports),
        "targets": [
            {
                "kind": rep.target.kind.name,
                "target": rep.target.name,
                "status": "fail" if rep.failed else "pass",
                "stdout_chars": rep.printed,
                "results": [
                    {"invariant": r.invariant, "status": r.status, "statement": BY_ID[r.invariant].statement,
                     "examples": r.examples, "unsupported": r.unsupported, "seconds": r.seconds,
                     "reason": r.reason, "counterexample": r.counterexample, "repro": r.repro}
                    for r in rep.results
                ],
            }
            for rep in reports
        ],
    }


def write_json(path, reports, profile, options):
    with open(path, "w") as f:
        json.dump(to_json(reports, profile, options), f, indent=2)


def to_markdown(reports, profile):
    ids = _ids(reports)
    icon = {"pass": "✅", "fail": "❌", "not-applicable": "n/a", "internal-error": "ERROR"}
    lines = [f"## attnspec conformance ({profile} profile)", "",
             "| invariant | " + " | ".join(f"`{rep.target.spec}`" for rep in reports) + " |",
             "|---|" + "---|" * len(reports)]
    for inv_id in ids:
        cells = [_cell(rep, inv_id, icon) for rep in reports]
        lines.append(f"| `{inv_id}` | " + " | ".join(cells) + " |")
    failures = [(rep, r) for rep in reports for r in rep.results if r.status == "fail"]
    if failures:
        lines += ["", "### Failures", ""]
        for rep, r in failures:
            lines += [f"**`{r.invariant}`** on `{rep.target.spec}`: {BY_ID[r.invariant].statement}", "",
                      f"- counterexample: `{_config_text(r.counterexample)}`", f"- {r.reason}",
                      f"- reproduce: `{r.repro}`", ""]
    return "\n".join(lines) + "\n"


def catalogue_markdown(catalogue, observes):
    """SPEC.md: the human-readable spec, generated from the catalogue (a test keeps them in sync)."""
    lines = ["# The attnspec specification", "",
             "Generated by `attnspec list --markdown > SPEC.md` from the catalogue in `spec/invariants/`; "
             "`tests/test_catalogue.py` fails when the two disagree.", "",
             "What an invariant observes:", ""]
    lines += [f"- **{k}**: {v}" for k, v in observes.items()]
    section = None
    for inv in catalogue:
        if inv.section != section:
            section = inv.section
            lines += ["", f"## {section}", "", "| id | statement | kinds | observes |", "|---|---|---|---|"]
        lines.append(f"| `{inv.id}` | {inv.statement} | {', '.join(inv.kinds)} | {inv.observes} |")
    return "\n".join(lines) + "\n"

"""Accepted n/a's: the invariants a user knows cannot be checked on a target, said out loud.

An n/a (not applicable: the invariant cannot observe what it needs) fails the gate (exit 3) unless it
is accepted, per invariant on the command line (``--accept-na ID[,ID]``, every target) or per target in
an expectations file read by both ``attnspec check --expectations PATH`` and the pytest plugin
(``--attnspec-expectations PATH`` or the ini key ``attnspec_expectations``). The plain-text format, as
array-api-tests' xfails file, one entry a line, ``#`` starts a comment (the reason)::

    # TARGET-glob                          INVARIANT-glob          # reason
    mha=examples/adapters.py:SDPAAttention  weights-*               # fused SDPA: weights not observable
    mha=*                                   weight-transfer         # our modules keep rotary buffers

TARGET-glob is matched (``fnmatch``) against ``KIND=TARGET`` as given, INVARIANT-glob against the
invariant ids. ``.toml`` and ``.json`` files hold the same entries as tables
``[[accept-na]] target = "...", invariants = ["..."], reason = "..."`` (JSON: a list of such objects, or
``{"accept-na": [...]}``). An invariant glob that matches no invariant id is a usage error; an entry
that matches none of the checked (target, invariant) pairs is reported as a warning."""

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from attnspec.errors import UsageError
from attnspec.invariants import BY_ID


@dataclass(frozen=True)
class Entry:
    target: str  # glob over KIND=TARGET
    invariant: str  # glob over invariant ids
    reason: str
    where: str  # file:line or --accept-na, for messages

    def matches(self, spec, inv_id):
        return fnmatch.fnmatchcase(spec, self.target) and fnmatch.fnmatchcase(inv_id, self.invariant)


def _entry(target, invariant, reason, where):
    if not isinstance(target, str) or not isinstance(invariant, str) or not target or not invariant:
        raise UsageError(f"{where}: an entry needs a target glob and an invariant id (strings)")
    if not fnmatch.filter(BY_ID, invariant):
        raise UsageError(f"{where}: {invariant!r} matches no invariant id (run `attnspec list`)")
    return Entry(target, invariant, str(reason or "").strip() or "accepted without a reason", where)


def _parse_text(text, path):
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        body, _, reason = line.partition("#")
        fields = body.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise UsageError(f"{path}:{number}: expected `TARGET-glob INVARIANT-glob  # reason`, got {line.strip()!r}")
        entries.append(_entry(*fields, reason, f"{path}:{number}"))
    return entries


def _parse_tables(data, path):
    tables = data.get("accept-na", []) if isinstance(data, dict) else data
    if not isinstance(tables, list):
        raise UsageError(f"{path}: expected a list of accept-na entries")
    entries = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise UsageError(f"{path}: accept-na entry {number} is not a table")
        invariants = table.get("invariants", table.get("invariant"))
        for invariant in invariants if isinstance(invariants, list) else [invariants]:
            entries.append(_entry(table.get("target"), invariant, table.get("reason"), f"{path}: entry {number}"))
    return entries


def load(path):
    """The entries of an expectations file (.txt or no suffix: lines; .toml; .json); UsageError if it
    cannot be read or parsed."""
    try:
        if not Path(path).is_file():  # a FIFO would block, /dev/zero never end
            raise OSError(f"{str(path)!r} is not a regular file")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"expectations file {str(path)!r} cannot be read: {e}") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".json":
            return _parse_tables(json.loads(text), path)
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise UsageError(f"{path}: TOML needs Python 3.11 (tomllib); use the .txt format") from None
            return _parse_tables(tomllib.loads(text), path)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, TOMLDecodeError, nesting too deep
        raise UsageError(f"expectations file {str(path)!r} is not valid {suffix[1:].upper()}: {e}") from None
    return _parse_text(text, path)


def from_ids(values):
    """``--accept-na ID[,ID]`` (globs allowed): entries for every target."""
    ids = [i for v in values for i in v.split(",") if i]
    return [_entry("*", i, "accepted on the command line (--accept-na)", "--accept-na") for i in ids]


def unmatched(entries, pairs):
    """Entries that match none of ``pairs`` ((KIND=TARGET, invariant id), the pairs to be checked)."""
    return [e for e in entries if not any(e.matches(spec, inv_id) for spec, inv_id in pairs)]


def acceptance(entries, spec, inv_id):
    """The first entry accepting an n/a of ``inv_id`` on ``spec``, as ``"where: reason"``, or ""."""
    entry = next((e for e in entries if e.matches(spec, inv_id)), None)
    return f"{entry.reason} ({entry.where})" if entry else ""


def apply(entries, reports):
    """Mark every n/a result that an entry accepts (``Result.accepted``); returns the reports."""
    for rep in reports:
        for r in rep.results:
            if r.status == "not-applicable":
                r.accepted = acceptance(entries, rep.target.spec, r.invariant)
    return reports


def warning(entry):
    return (f"warning: expectation {entry.target} {entry.invariant} ({entry.where}) matches no checked "
            f"(target, invariant) pair: remove it or fix the glob")

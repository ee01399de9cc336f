"""pytest plugin (loaded by the ``pytest11`` entry point wherever attnspec is installed): one test item
per (invariant, target), generated here, so a repository needs no test file to gate its modules, and
JUnit XML, ``-k``, ``-x``, xdist and sharding work on them as on any test.

Targets: ``--attnspec KIND=TARGET`` (repeatable; ``--impl`` is a deprecated alias), else the ini key
``attnspec_targets`` (a list, e.g. in pyproject's ``[tool.pytest.ini_options]``). Command-line targets
always add their items; ini targets add them when pytest runs the configured test paths or a directory
(not when it is given test files only, so ``pytest tests/test_x.py`` stays quick). No targets: no items.
Accepted n/a's: ``--attnspec-expectations PATH`` or ini ``attnspec_expectations`` (the format of
``attnspec.expectations``). Profile: ``--attnspec-profile`` / ini ``attnspec_profile`` /
$ATTNSPEC_PROFILE, else attnspec-ci when $CI is set, else attnspec-dev.

An item passes when the invariant was checked and holds; fails on a violation, and on an n/a that is
not accepted (the gate's exit 3: not fully checked); is skipped for an accepted n/a.

Loading the plugin changes nothing else in the run: it imports attnspec (and torch) only when targets
are given, loads no Hypothesis profile globally (each item runs under an explicit settings object),
and sets torch's thread count to one only while an attnspec item runs, restoring it after. Unlike
``attnspec check``, the items run in the pytest process itself: no per-target worker process or
external kill on timeout (``--time-limit`` applies in-process, by SIGALRM)."""

import os
import warnings

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("attnspec", "attnspec: check attention modules against the specification")
    group.addoption("--attnspec", action="append", default=[], metavar="KIND=TARGET", dest="attnspec_targets",
                    help="check this target against every invariant of its kind (repeatable); "
                         "replaces the ini key attnspec_targets")
    group.addoption("--impl", action="append", default=[], metavar="KIND=TARGET", dest="attnspec_impl",
                    help="deprecated alias of --attnspec")
    group.addoption("--attnspec-expectations", metavar="PATH", default=None,
                    help="accepted n/a's (lines `TARGET-glob INVARIANT-glob  # reason`, or .toml/.json)")
    group.addoption("--attnspec-profile", metavar="NAME", default=None,
                    help="attnspec's Hypothesis profile for its items: dev, ci, thorough (attnspec-*)")
    group.addoption("--attnspec-variant", action="append", default=[], metavar="NAME", dest="attnspec_variants",
                    help="check the targets against this contract variant (repeatable; `attnspec list --variants`)")
    parser.addini("attnspec_targets", type="linelist", default=[], help="KIND=TARGET to check, one per line")
    parser.addini("attnspec_expectations", type="string", default="",
                  help="expectations file (accepted n/a's), relative to the rootdir")
    parser.addini("attnspec_profile", type="string", default="", help="attnspec's Hypothesis profile")


def _targets(config):
    """(target texts, where they came from): the command line's, else the ini's when it applies."""
    given = config.getoption("attnspec_targets") + config.getoption("attnspec_impl")
    if given:
        return given, "--attnspec"
    ini = config.getini("attnspec_targets")
    explicit = config.args_source == pytest.Config.ArgsSource.ARGS
    if ini and (not explicit or any(os.path.isdir(arg.split("::")[0]) for arg in config.args)):
        return ini, "attnspec_targets"
    return [], None


def _profile(config):
    from attnspec import profiles

    try:
        return profiles.default_profile(config.getoption("attnspec_profile") or config.getini("attnspec_profile") or None)
    except ValueError as e:
        raise pytest.UsageError(f"attnspec: {e}") from None


def _expectations(config):
    from attnspec import expectations
    from attnspec.errors import UsageError

    path = config.getoption("attnspec_expectations")
    if not path and config.getini("attnspec_expectations"):
        path = str(config.rootpath / config.getini("attnspec_expectations"))
    try:
        return expectations.load(path) if path else []
    except UsageError as e:
        raise pytest.UsageError(f"attnspec: {e}") from None


def pytest_report_header(config):
    texts, source = _targets(config)
    if texts:
        return [f"attnspec: {len(texts)} targets ({source}), profile {_profile(config)}"]
    return None


class AttnspecFailure(Exception):
    """An attnspec item failed: the message is the whole report (no traceback of attnspec's code)."""


class AttnspecTargets(pytest.Collector):
    """The parent of attnspec's items (node id ``attnspec``); its items are made by the plugin."""

    def collect(self):
        return []


class AttnspecItem(pytest.Item):
    def __init__(self, *, invariant, target, options, accepted, **kwargs):
        super().__init__(**kwargs)
        self.invariant, self.target, self.options, self.accepted = invariant, target, options, accepted
        self.add_marker("attnspec")

    def runtest(self):
        import torch

        from attnspec import expectations, report
        from attnspec.runner import check_invariant

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only contend (restored below)
        try:
            result = check_invariant(self.invariant, self.target, self.options)
        finally:
            torch.set_num_threads(threads)
        if result.status == "not-applicable":
            result.accepted = expectations.acceptance(self.accepted, self.target.spec, self.invariant.id)
        self.user_properties += [("examples", result.examples), ("rejected", result.rejected)]
        if result.status == "pass":
            return
        if result.status == "not-applicable" and result.accepted:
            pytest.skip(report.visible(f"n/a (accepted: {result.accepted}): {result.reason}"))
        raise AttnspecFailure(report.item_text(self.target, result))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, AttnspecFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"attnspec {self.name}"


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection and xdist's collection report
def pytest_collection_modifyitems(session, config, items):
    texts, source = _targets(config)
    if not texts:
        return
    from attnspec import _torch  # noqa: F401  (first: torch without its NumPy warning)
    from attnspec import expectations
    from attnspec.errors import UsageError
    from attnspec.invariants import CATALOGUE
    from attnspec.report import junit_name
    from attnspec.runner import Options
    from attnspec.targets import resolve

    try:
        targets = [resolve(text, tuple(config.getoption("attnspec_variants"))) for text in texts]
    except UsageError as e:
        raise pytest.UsageError(f"attnspec ({source}): {e}") from None
    accepted = _expectations(config)
    options = Options(profile=_profile(config))
    pairs = [(t, inv) for t in targets for inv in CATALOGUE if inv.applies_to(t.kind)]
    for entry in expectations.unmatched(accepted, [(t.spec, inv.id) for t, inv in pairs]):
        warnings.warn(pytest.PytestConfigWarning(expectations.warning(entry)))
    parent = AttnspecTargets.from_parent(session, name="attnspec", nodeid="attnspec")
    items.extend(AttnspecItem.from_parent(parent, name=junit_name(t.spec, inv.id), invariant=inv, target=t,
                                          options=options, accepted=accepted) for t, inv in pairs)


def pytest_configure(config):
    config.addinivalue_line("markers", "attnspec: an attnspec conformance item (invariant x target)")

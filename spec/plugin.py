"""pytest plugin: ``--impl KIND=TARGET`` (repeatable) runs the property tests on those targets
instead of the bundled modules; ``--variant NAME`` checks them against a contract variant. Loads the
Hypothesis profile: ``--hypothesis-profile`` wins, else $HYPOTHESIS_PROFILE, else ci when $CI is
set, else dev."""

import pytest
import torch
from hypothesis import settings

from attnspec import profiles
from attnspec.errors import UsageError
from attnspec.targets import BUNDLED, resolve

settings.load_profile(profiles.default_profile())
# The tensors are tiny: intra-op threads only contend with the other xdist workers (a 2-thread op
# waits ~8 ms for a busy core). Parallelism comes from the workers, one thread each.
torch.set_num_threads(1)


def pytest_addoption(parser):
    group = parser.getgroup("attnspec")
    group.addoption("--impl", action="append", default=[], metavar="KIND=TARGET",
                    help="check this target instead of the bundled impl modules (repeatable)")
    group.addoption("--variant", action="append", default=[], metavar="NAME",
                    help="check the targets against this contract variant (repeatable; `attnspec list --variants`)")


def pytest_report_header(config):
    targets = config.getoption("--impl") or BUNDLED
    return [f"attnspec targets ({'--impl' if config.getoption('--impl') else 'bundled'}): {', '.join(targets)}",
            f"hypothesis profile: {settings.default}"[:200]]


def conformance_targets(config):
    """The resolved targets of this run; a bad --impl is a usage error before any test runs."""
    if not hasattr(config, "_attnspec_targets"):
        try:
            variants = tuple(config.getoption("--variant"))
            config._attnspec_targets = [resolve(t, variants) for t in (config.getoption("--impl") or BUNDLED)]
        except UsageError as e:
            raise pytest.UsageError(f"--impl/--variant: {e}") from None
    return config._attnspec_targets

"""pytest plugin: ``--impl KIND=TARGET`` (repeatable) runs the property tests on those targets
instead of the bundled modules. Loads the Hypothesis profile: ``--hypothesis-profile`` wins,
else $HYPOTHESIS_PROFILE, else ci when $CI is set, else dev."""

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


def pytest_report_header(config):
    targets = config.getoption("--impl") or BUNDLED
    return [f"attnspec targets ({'--impl' if config.getoption('--impl') else 'bundled'}): {', '.join(targets)}",
            f"hypothesis profile: {settings.default}"[:200]]


def conformance_targets(config):
    """The resolved targets of this run; a bad --impl is a usage error before any test runs."""
    if not hasattr(config, "_attnspec_targets"):
        try:
            config._attnspec_targets = [resolve(t) for t in (config.getoption("--impl") or BUNDLED)]
        except UsageError as e:
            raise pytest.UsageError(f"--impl: {e}") from None
    return config._attnspec_targets

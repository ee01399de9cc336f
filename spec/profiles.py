"""Hypothesis profiles, registered once, shared by pytest (conftest.py) and `attnspec check`.

dev: fast feedback while editing. ci: derandomized, fixed budget, no deadline (torch's first call
warms up for seconds), no database: the same verdict on every run. thorough: nightly, many examples."""

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               report_multiple_bugs=False)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
PROFILES = ("dev", "ci", "thorough")


def default_profile():
    """$HYPOTHESIS_PROFILE, else ci when $CI is set (true/1), else dev."""
    explicit = os.environ.get("HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    return "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"

"""attnspec's Hypothesis profiles, registered once under namespaced names (a user's own ``ci``/``dev``
profiles never collide), and applied to attnspec's own searches only: ``runner.hypothesis_test`` builds
an explicit settings object from the profile; nothing here loads a profile globally.

attnspec-dev: fast feedback while editing. attnspec-ci: derandomized, fixed budget, no deadline
(torch's first call warms up for seconds), no database: the same verdict on every run.
attnspec-thorough: nightly, many examples, with the example database. The short names ``dev``, ``ci``,
``thorough`` are accepted as aliases (``attnspec check --profile ci``)."""

import os

from hypothesis import HealthCheck, Phase, settings

# No explain phase: it re-runs variations of a minimal failure to annotate Hypothesis's own report, which
# attnspec does not print (its report is the counterexample and the repro line), at up to a time limit a run.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               report_multiple_bugs=False, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
settings.register_profile("attnspec-dev", max_examples=10, **_COMMON)
settings.register_profile("attnspec-ci", max_examples=25, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("attnspec-thorough", max_examples=500, **_COMMON)
PROFILES = ("attnspec-dev", "attnspec-ci", "attnspec-thorough")
# The ci gate's budget for a costly invariant (``Invariant.costly``: an example builds several modules,
# differentiates, or draws a thousand dropout samples; together they take a third of a verdict at 25 examples).
# Each is redundant with cheaper invariants on the bugs they catch: no wrong module needed a costly invariant's
# example past the 5th (183 modules of earlier sessions) or the 6th (52 held-out ones) to be rejected
# (benchmarks/RESULTS.md, sixth session). Applied where Options.profile names the profile (the CLI and the
# pytest plugin always do) or where it is the loaded one (Options() in the repository's tests and in benchmarks).
COSTLY_EXAMPLES = {"attnspec-ci": 12}
ALIASES = {name.removeprefix("attnspec-"): name for name in PROFILES}
CHOICES = (*ALIASES, *PROFILES)


def resolve(name):
    """The registered profile name for ``name`` (an alias or a full name); ValueError if neither."""
    if name in PROFILES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"profile {name!r} is not one of {', '.join(CHOICES)}")


def ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def default_profile(explicit=None):
    """``explicit``, else $ATTNSPEC_PROFILE, else $HYPOTHESIS_PROFILE (when it names one of attnspec's
    profiles), else attnspec-ci when $CI is set (true/1/yes), else attnspec-dev. Raises ValueError for
    an explicit name that is not attnspec's."""
    for name in (explicit, os.environ.get("ATTNSPEC_PROFILE")):
        if name:
            return resolve(name)
    hypothesis = os.environ.get("HYPOTHESIS_PROFILE")
    if hypothesis in CHOICES:
        return resolve(hypothesis)
    return "attnspec-ci" if ci() else "attnspec-dev"

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
# The ci gate's budget, per invariant: how many examples each search draws (at most the profile's max_examples,
# 25). Fitted to where searches first meet bugs (benchmarks/detection.py; benchmarks/RESULTS.md, ninth session):
# over 413 wrong modules (the planted bugs and red-team passes 1-9; 399 rejected at 25 examples) the first failing
# example of every invariant was recorded, and budgets were lowered, the most CPU saved first, through 25, 20, 18,
# 15, 12 and 10 while every module kept two failing invariants (one where only one fails it at 25) and every
# planted bug the invariants its record names. An invariant not listed gets CI_DEFAULT_EXAMPLES. Not below 10:
# with fewer, Hypothesis draws other examples (its small-example cap is max_examples // 10), and the study's
# indices would not hold. The table costs 62 % of the CPU of 25 examples (12 for the costly ones). Fitted on two of
# {planted bugs, passes 1-6, passes 7-9}, such a table missed 0.5-2.3 % of the third; 12 examples for every
# invariant, about the same CPU, miss 2.5 % (10 of the 399).
CI_EXAMPLES = {
    # the modules that set each budget, with the example where the invariant first failed them
    "dropout-on-weights": 25,  # a dropout that drops whole rows of weights (24)
    "rotary-relative-position": 25,  # RoPE positions or angles in bfloat16 past 256 tokens (23, 24)
    "oracle-float64": 20,  # 9+ heads folded into the batch; a bmm path for big batches (19, 20)
    "padding-mask": 20,  # a shortcut that skips the mask when the first row is unpadded (20)
    "output-contract": 18,  # a softmax stabilized by the max over the whole batch (18)
    "layernorm-pre-sublayer": 18,  # a LayerNorm that overflows in float16 (18)
    # 11-15: heads split in chunks, a backward that leaks future blocks, a KV cache that skips the window, ...
    "scaling-sqrt-head-dim": 15, "gradient-reaches-parameters": 15, "causal-perturbation": 15,
    "gradient-causality": 15, "kv-cache-decoding": 15, "padding-weights": 15,
    "eval-deterministic": 12, "gradient-finite-differences": 12,
    # the invariants planted records name: BlockLocalMaxSoftmax (15), InferenceModeMergeNoTranspose, RopeLayoutIgnored
    "finite-output": 15, "head-split-equivalence": 12, "rotary-embedding": 12,
}
CI_DEFAULT_EXAMPLES = 10
PER_INVARIANT_BUDGETS = {"attnspec-ci": (CI_EXAMPLES, CI_DEFAULT_EXAMPLES)}
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

"""The pytest plugin in a run of someone else's tests changes nothing but adding its items: no
Hypothesis profile loaded (the user's @given test keeps 100 examples and its own `ci` profile name),
torch's thread count restored, no items without targets, and `-k`/`-x` act on its items.
(tests/test_wheel.py does the same from an installed wheel; this runs in this environment, faster.)"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # each test starts pytest in a fresh process

CONFTEST = textwrap.dedent('''\
    import torch
    from hypothesis import settings

    settings.register_profile("ci", max_examples=7)  # the user's own profile named ci: no collision
    STATE = {}


    def pytest_configure(config):
        STATE["threads"], STATE["profile"] = torch.get_num_threads(), settings._current_profile


    def pytest_sessionfinish(session):
        after = (torch.get_num_threads(), settings._current_profile)
        with open("state.txt", "w") as f:
            f.write("unchanged" if after == (STATE["threads"], STATE["profile"]) else f"changed: {after} {STATE}")
    ''')
USER_TEST = textwrap.dedent('''\
    from hypothesis import given, settings, strategies as st

    SEEN = []


    @given(st.integers())
    def test_user_property(n):
        SEEN.append(n)


    def test_user_budget_is_hypothesis_default():
        assert len(SEEN) == 100 and settings.default.max_examples == 100
        assert settings.get_profile("ci").max_examples == 7
    ''')


def _pytest(tmp_path, *args):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HYPOTHESIS", "ATTNSPEC", "COV_")) and k != "CI"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=tmp_path,
                          env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=300)


def test_no_targets_no_items(tmp_path):
    run = _pytest(tmp_path)
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout + run.stderr
    assert (tmp_path / "state.txt").read_text() == "unchanged"


def test_items_leave_the_users_run_as_it_was(tmp_path):
    run = _pytest(tmp_path, "--attnspec", "mha=attnspec.impl:MultiHeadAttention", "--attnspec-profile", "ci",
                  "-k", "user or output-contract or causal-perturbation", "-rA")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout, run.stdout
    assert "PASSED attnspec::output-contract[mha=attnspec.impl:MultiHeadAttention]" in run.stdout, run.stdout
    assert (tmp_path / "state.txt").read_text() == "unchanged"


def test_unaccepted_n_a_fails_the_item_and_an_expectation_skips_it(tmp_path):
    target = "mha=attnspec_vacuous:HiddenProjections"  # projections under names no layout knows
    (tmp_path / "attnspec_vacuous.py").write_text(
        (__import__("pathlib").Path(__file__).parent / "gate_targets" / "vacuous.py").read_text())
    args = ("--attnspec", target, "--attnspec-profile", "ci", "-k", "oracle-float64")
    failed = _pytest(tmp_path, *args)
    assert failed.returncode == 1 and "NOT CHECKED oracle-float64" in failed.stdout, failed.stdout
    (tmp_path / "expect.txt").write_text(f"{target} oracle-*  # projections hidden\n")
    skipped = _pytest(tmp_path, *args, "--attnspec-expectations", "expect.txt", "-rs")
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout and "accepted: projections hidden" in skipped.stdout, \
        skipped.stdout


def test_variant_option(tmp_path):
    """`pytest --attnspec ... --attnspec-variant NAME` checks against the variant; an unknown name is a
    usage error before any test runs."""
    block = "transformer-block=attnspec.impl:TransformerBlock"
    args = ("--attnspec", block, "--attnspec-profile", "ci", "-k", "feedforward-gelu-tanh")
    erf = _pytest(tmp_path, *args, "--attnspec-variant", "gelu-erf")
    assert erf.returncode == 1 and "gelu-erf" in erf.stdout, erf.stdout  # the tanh block breaks the erf variant
    unknown = _pytest(tmp_path, *args, "--attnspec-variant", "nope")
    assert unknown.returncode == 4 and "unknown contract variant 'nope'" in unknown.stderr, unknown.stderr


def test_loading_the_plugin_imports_no_torch():
    """pytest loads the plugin in every run where attnspec is installed: without targets it costs no torch import
    (~1.5 s); the package's public names still import on first use."""
    code = ("import sys, attnspec.plugin; print('torch' in sys.modules); "
            "from attnspec import Adapter, KINDS; print('torch' in sys.modules, Adapter.__name__, 'mha' in KINDS)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["False", "True", "Adapter", "True"], run.stdout + run.stderr

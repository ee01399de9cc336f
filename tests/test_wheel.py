"""Done-when of issue 11: attnspec used from a wheel, by a repository that is not attnspec's.

The wheel is built from the tracked files, installed (``pip --python``) into a fresh virtual
environment that has no attnspec, no numpy and no checkout on its path; the third-party packages it
needs (torch, hypothesis, pytest) are reused read-only from this environment through a ``.pth`` file
pointing at a directory of links to them (installing torch again costs minutes and a network). From a
separate directory that has its own ``spec/`` and ``impl/`` packages and its own ``@given`` test:

* ``pytest --attnspec mha=mypkg.attn:MyMHA --junitxml=out.xml`` passes with one JUnit case per
  invariant of the kind, and the user's own test still runs Hypothesis's default 100 examples;
* a planted bug fails the run;
* ``attnspec_targets`` in that directory's pyproject.toml selects the targets;
* the ``attnspec`` console script works there (``--version``) without a NumPy warning.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from attnspec.invariants import CATALOGUE
from attnspec.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("torch", "functorch", "torchgen", "hypothesis", "_hypothesis", "sortedcontainers", "pytest", "_pytest",
          "py.py", "pluggy", "iniconfig", "packaging", "pygments", "typing_extensions", "filelock", "fsspec",
          "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "isympy")

MHA = '''\
import torch
import torch.nn as nn

from spec.layers import causal_mask  # the user's own `spec` package, not attnspec's


class MyMHA(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_mask(context_length, LEAK))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, self.d_out))
'''

USER_FILES = {
    "spec/__init__.py": "",
    "spec/layers.py": "import torch\n\n\ndef causal_mask(n, leak=0):\n"
                      "    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1 + leak)\n",
    "impl/__init__.py": "VERSION = 'the user impl'\n",
    "mypkg/__init__.py": "",
    "mypkg/attn.py": MHA.replace("LEAK", "0") + "\n\nclass Leaky(MyMHA):\n    pass\n",
    "tests/test_own.py": textwrap.dedent('''\
        from hypothesis import given, settings, strategies as st

        import impl
        import spec.layers

        EXAMPLES = []


        @given(st.integers())
        def test_own_property(n):
            EXAMPLES.append(n)


        def test_own_property_ran_the_default_budget():
            assert settings.default.max_examples == 100, settings.default
            assert len(EXAMPLES) == 100, len(EXAMPLES)
            assert impl.VERSION == "the user impl" and spec.layers.causal_mask(2).shape == (2, 2)
        '''),
}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, a user repository directory)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (base / "dist").glob("attnspec-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # links to the reused third-party packages (no numpy, no attnspec), in a directory named site-packages as
    # theirs is: Hypothesis reads the constants of every module outside one (all of torch: ~9 s a pytest run)
    shared = base / "shared" / "site-packages"
    shared.mkdir(parents=True)
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.lower().startswith(SHARED) and not entry.name.startswith(("pytest_", "numpy")) \
                and not entry.name.endswith(".pth"):
            (shared / entry.name).symlink_to(entry)
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "shared.pth").write_text(f"{shared}\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    repo = base / "user-repo"
    for name, text in USER_FILES.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    return python, repo


def _run(python, repo, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_", "HYPOTHESIS", "ATTNSPEC"))}
    env.update(PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.run([str(python), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def _cases(path):
    return {(c.get("classname"), c.get("name")): c for c in ET.parse(path).getroot().iter("testcase")}


MHA_IDS = {inv.id for inv in CATALOGUE if inv.applies_to(KINDS["mha"])}


@pytest.mark.slow
def test_plugin_from_a_wheel_in_a_user_repository(fresh):
    python, repo = fresh
    found = _run(python, repo, "-c", "import attnspec, sys; print(attnspec.__file__); "
                                     "print(any(p.endswith('/spec') for p in sys.path))")
    assert found.returncode == 0 and "site-packages/attnspec/__init__.py" in found.stdout, found.stdout + found.stderr
    version = _run(python, repo, "-m", "attnspec", "--version")
    assert version.returncode == 0 and version.stdout.startswith("attnspec "), version.stdout + version.stderr
    assert "NumPy" not in version.stderr, version.stderr

    # no targets: the plugin adds nothing, and the user's test keeps its 100 examples
    alone = _run(python, repo, "-m", "pytest", "-p", "no:cacheprovider", "-q")
    assert alone.returncode == 0 and "2 passed" in alone.stdout, alone.stdout + alone.stderr

    # targets on the command line: one JUnit case per invariant of the kind
    out = repo / "out.xml"
    run = _run(python, repo, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--attnspec", "mha=mypkg.attn:MyMHA",
               "--attnspec-profile", "dev", f"--junitxml={out}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cases = _cases(out)
    assert {name for cls, name in cases if cls == "attnspec"} == {f"{i}[mha=mypkg.attn:MyMHA]" for i in MHA_IDS}
    assert ("tests.test_own", "test_own_property_ran_the_default_budget") in cases  # the user's test ran, 100 examples
    assert all(c.find("failure") is None and c.find("skipped") is None for c in cases.values())

    # a planted bug (the mask admits the next token) fails the run, naming the invariant
    (repo / "mypkg" / "attn.py").write_text(MHA.replace("LEAK", "0") + "\n\n" + MHA.replace("MyMHA", "Leaky")
                                            .replace("LEAK", "1").split("\n\n\n", 1)[1])
    bug = _run(python, repo, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "--attnspec", "mha=mypkg.attn:Leaky",
               "--attnspec-profile", "dev", "-k", "attnspec")
    assert bug.returncode == 1, bug.stdout[-3000:] + bug.stderr[-3000:]
    assert "FAIL causal-perturbation on mha=mypkg.attn:Leaky" in bug.stdout, bug.stdout[-3000:]
    assert "reproduce: attnspec check" in bug.stdout

    # targets from the repository's pyproject.toml
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\nattnspec_targets = ["mha=mypkg.attn:MyMHA"]\n'
                                         'attnspec_profile = "dev"\n')
    ini = _run(python, repo, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={out}", "-k",
               "output-contract or causal-perturbation or own")
    assert ini.returncode == 0, ini.stdout[-3000:] + ini.stderr[-3000:]
    assert {name for cls, name in _cases(out) if cls == "attnspec"} == {
        "output-contract[mha=mypkg.attn:MyMHA]", "causal-perturbation[mha=mypkg.attn:MyMHA]"}

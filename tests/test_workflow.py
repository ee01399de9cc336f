"""examples/github-workflow.yml: pinned CPU torch and attnspec, the Hypothesis database restored where
the check reads it and saved even when the check fails, the summary written even on failure; and its
check and summary steps, run here as a runner would (a tiny budget, a bundled target, a failing one).

The YAML is read by a minimal parser for the subset the file uses (no PyYAML dependency)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-workflow.yml"


def _steps(text):
    """The steps of the (single) job: [{key: str or {sub: str}}], block scalars joined with newlines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "steps:")
    steps, key, indent = [], None, None
    for line in lines[start + 1:]:
        if not line.strip() or line.lstrip().startswith("#"):
            if key and isinstance(steps[-1].get(key), list):
                steps[-1][key].append("")
            continue
        body = line.lstrip()
        depth = len(line) - len(body)
        if body.startswith("- ") and depth == 6:
            steps.append({})
            body, depth = body[2:], 8
        if key and isinstance(steps[-1].get(key), list) and depth > indent:
            steps[-1][key].append(line[indent + 2:])
            continue
        name, _, value = body.partition(":")
        value = value.strip()
        if depth == 8:
            key, indent = name, depth
            steps[-1][name] = [] if value == "|" else ({} if value == "" else value)
        elif depth == 10 and isinstance(steps[-1].get(key), dict):
            steps[-1][key][name] = value
        else:
            raise AssertionError(f"unexpected YAML line in the workflow: {line!r}")
    return [{k: "\n".join(v).strip() if isinstance(v, list) else v for k, v in step.items()} for step in steps]


STEPS = _steps(WORKFLOW.read_text())
BY_NAME = {step.get("name"): step for step in STEPS}


def _step(pattern):
    (step,) = [s for s in STEPS if re.search(pattern, s.get("name", "") + s.get("uses", ""))]
    return step


def test_install_pins_cpu_torch_and_attnspec():
    run = _step("Install")["run"]
    assert re.search(r"torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", run), run
    assert re.search(r"attnspec==\d+\.\d+\.\d+", run), run


def test_hypothesis_database_is_restored_where_the_check_reads_it_and_saved_on_failure():
    restore, save = _step("Restore the Hypothesis"), _step("Save the Hypothesis")
    assert restore["uses"].startswith("actions/cache/restore@") and save["uses"].startswith("actions/cache/save@")
    assert restore["with"]["path"] == save["with"]["path"] == ".hypothesis/examples"  # dev/thorough's database
    assert save["if"] == "always()" and restore["with"]["restore-keys"] in save["with"]["key"]
    order = [s.get("name") for s in STEPS]
    assert order.index(restore["name"]) < order.index(_step("Check the modules")["name"]) < order.index(save["name"])


def test_summary_and_artifacts_are_written_even_on_failure():
    assert _step("Job summary")["if"] == "always()" and "GITHUB_STEP_SUMMARY" in _step("Job summary")["run"]
    assert _step("upload-artifact")["if"] == "always()"


@pytest.mark.parametrize("targets,status", [
    ("mha=attnspec.impl:MultiHeadAttention", 0),
    (f"mha={ROOT}/tests/bad_targets/returns_tuple.py:MHA", 1),
])
def test_check_and_summary_steps_run_locally(targets, status, tmp_path):
    """The check step's script, with a tiny budget, then the summary step, in a working directory of
    their own (a runner's is the checkout)."""
    check, summary = _step("Check the modules")["run"], _step("Job summary")["run"]
    check = check.replace("attnspec check", "attnspec check --max-examples 2 --only output-contract,causal-perturbation")
    job_summary = tmp_path / "summary.md"
    env = {**os.environ, "TARGETS": targets, "PROFILE": check_profile(), "GITHUB_STEP_SUMMARY": str(job_summary),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = subprocess.run(["bash", "-e", "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == status, ran.stdout + ran.stderr
    subprocess.run(["bash", "-e", "-c", summary], cwd=tmp_path, env=env, check=True, timeout=60)
    text = job_summary.read_text()
    assert text.startswith("## attnspec: ") and f"(exit {status})" in text.splitlines()[0], text
    for name in ("attnspec.json", "attnspec.xml"):
        assert (tmp_path / name).stat().st_size > 0


def check_profile():
    """What the step's PROFILE expression gives on a push (not the nightly schedule)."""
    expression = _step("Check the modules")["env"]["PROFILE"]
    assert expression == "${{ github.event_name == 'schedule' && 'thorough' || 'ci' }}", expression
    return "ci"

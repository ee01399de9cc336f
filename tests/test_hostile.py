"""Nothing a module does can crash, hang, fool or silence the gate (issue 12).

Each hostile module (tests/hostile/) or malformed command line is run through `attnspec check` beside
a correct target (GOOD, checked after it): the documented exit status, no harness traceback, the
correct target judged all-pass, and the JSON and Markdown reports written and well-formed. Most runs
call ``attnspec.cli.main`` in this process (its targets still run in worker processes); the ones about
the supervisor's own process (signals, a closed stdout, argv bytes, the output encoding) run it fresh.
Runs use ``--only`` with one or two cheap invariants and ``--max-examples 2``.
"""

import contextlib
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from attnspec.cli import main

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "hostile"
GOOD = "mha=attnspec.impl:MultiHeadAttention"
FAST = ("--profile", "ci", "--max-examples", "2", "--only", "output-contract")
TL1 = ("--time-limit", "1")
ENV = {**{k: v for k, v in os.environ.items() if k != "HYPOTHESIS_PROFILE"}, "OMP_NUM_THREADS": "1"}


def hostile(attr, file="modules.py"):
    return f"mha={HOSTILE / file}:{attr}"


def run(*args, tmp_path, cwd=ROOT):
    """`attnspec check ARGS --report-json --report-md` in this process: (rc, stdout, stderr, JSON, Markdown)."""
    json_path, md_path = tmp_path / "report.json", tmp_path / "report.md"
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(["check", *args, "--report-json", str(json_path), "--report-md", str(md_path)])
            except SystemExit as e:
                rc = e.code
            except BaseException:
                traceback.print_exc()
                rc = "crashed"
    finally:
        os.chdir(before)
    return rc, out.getvalue(), err.getvalue(), *_reports(json_path, md_path)


def _reports(json_path, md_path):
    report = json.loads(json_path.read_text()) if json_path.is_file() else None  # (not a FIFO a module made there)
    md = md_path.read_text(encoding="utf-8") if md_path.is_file() else None
    return report, md


def results(report, spec):
    kind, _, name = spec.partition("=")
    [target] = [t for t in report["targets"] if t["kind"] == kind and t["target"] == name]
    return target["results"]


def assert_judged(rc, out, err, report, md, spec, status, cause):
    """The documented status; no traceback; the reports well-formed; the hostile target failed with
    ``cause`` (status 1) or passed (0); GOOD, checked in the same run, all pass."""
    assert "Traceback (most recent call last)" not in out + err, out + err
    assert rc == status, f"exit {rc}, expected {status}\nstdout:\n{out}\nstderr:\n{err}"
    assert report is not None and md is not None, "reports not written"
    assert md.startswith("## attnspec: ") and GOOD.split("=")[1] in md
    for r in results(report, GOOD):
        assert r["status"] == "pass", r
    mine = results(report, spec)
    if cause is None:
        assert all(r["status"] == "pass" for r in mine), mine
    else:
        failed = [r for r in mine if r["status"] == "fail"]
        assert failed and re.search(cause, failed[0]["reason"]), mine
        assert f"FAIL {failed[0]['invariant']} on {spec}" in out


TIMER = r"forward did not return within 1 s"
CASES = {  # name: (target, extra args, exit status, cause of the failure)
    "os._exit(0) in forward": (hostile("Exit0Forward"), (), 1, r"worker process exited with status 0 during forward"),
    "os._exit(0) from a thread": (hostile("Exit0Thread"), (), 1, r"exited with status 0 during forward"),
    "atexit hook exits 0": (hostile("AtexitExit0"), (), 1, r"forward returned shape"),
    "os._exit(0) at import": (hostile("MHA", "exits_at_import.py"), (), 1, r"exited with status 0 while importing"),
    "subclass with a zero difference": (hostile("FakeSubNotCausal"), ("--only", "causal-perturbation"), 1, r"."),
    "SIGKILL itself": (hostile("KillSelf"), (), 1, r"killed by signal SIGKILL during forward"),
    "SIGTERM itself": (hostile("TermSelf"), (), 1, r"killed by signal SIGTERM during forward"),
    "segfault": (hostile("Segfault"), (), 1, r"killed by signal SIGSEGV during forward"),
    "ignores SIGALRM": (hostile("IgnoresAlarm"), TL1, 1, TIMER),
    "blocks SIGALRM": (hostile("BlocksAlarm"), TL1, 1, TIMER),
    "signal.alarm(0)": (hostile("CancelsAlarm"), TL1, 1, TIMER),
    "bare except swallows the timeout": (hostile("SwallowsTimeout"), TL1, 1, TIMER),
    "one long C++ op": (hostile("LongNativeCall"), TL1, 1, TIMER + r".*worker killed after \d+ s"),
    "exception __str__ hangs": (hostile("MessageHangs"), TL1, 1, r"forward raised _HangingMessage: <its message did not format"),
    "hang at import": (hostile("MHA", "hangs_at_import.py"), TL1, 1, r"importing the target did not finish within 3 s"),
    "non-daemon thread": (hostile("NonDaemonThread"), (), 0, None),
    "KeyboardInterrupt": (hostile("RaisesKeyboardInterrupt"), (), 1, r"forward raised KeyboardInterrupt"),
    "GeneratorExit": (hostile("RaisesGeneratorExit"), (), 1, r"forward raised GeneratorExit"),
    "lone surrogate": (hostile("LoneSurrogate"), (), 1, r"forward raised ValueError: bad byte \\udc80"),
    "meta tensor output": (hostile("MetaOutput"), (), 1, r"on device meta, expected .* on cpu"),
    ".train() raises": (hostile("TrainRaises"), ("--only", "input-not-mutated"), 1,
                        r"module\.train\(\) raised RuntimeError: this module cannot train"),
    ".to() returns None": (hostile("ToReturnsNone"), (), 1, r"module\.to\(device, dtype\) returned NoneType"),
    "exception __str__ raises": (hostile("MessageRaises"), (), 1, r"forward raised _RaisingMessage: <its message cannot"),
    "deletes its working directory": (hostile("DeletesCwd"), (), 0, None),
    ".txt target file": (hostile("MHA", "correct_module.txt"), (), 0, None),
    **{f"poisons: {p}": (hostile(p), ("--only", "output-contract,gradient-causality"), 0, None)
       for p in ("GradOff", "MetaDefaultDevice", "Float16DefaultDtype", "Chdir", "WarningsAsErrors", "Threads",
                 "BlocksAlarmAfter", "PushesFunctionMode", "PushesDispatchMode", "RecursionLimit")},
    "dispatch mode zeroes differences": (hostile("DispatchModeNotCausal"), ("--only", "causal-perturbation"), 1, r"."),
    "nested tensor output": (hostile("ReturnsNested"), (), 1, r"forward returned a nested tensor"),
    "DataLoader with a worker process": (hostile("UsesWorkerProcesses"), (), 0, None),
    "adapter's adjust() raises": (f"mha={HOSTILE / 'adapters.py'}:AdjustRaises", (), 1, r"the adapter's adjust\(\) raised RuntimeError"),
    "function mode entered at import": (hostile("MHA", "mode_at_import.py"), (), 1, r"= nan for a finite input"),
    "subclass whose dispatch lies to copies": (hostile("ReturnsTwoFacedSubclass"), (), 1, r"its own __torch_dispatch__"),
    "raises attnspec's Unsupported": (hostile("RaisesUnsupported"), (), 1, r"only an adapter's build\(\) may decline"),
    "Unsupported from the constructor": (hostile("DeclinesInConstructor"), (), 1,
                                         r"raised by the constructor: only an adapter's build\(\) may decline"),
    "raises attnspec's NotApplicable": (hostile("RaisesNotApplicable"), (), 1, r"only an adapter's build\(\) may decline"),
    "resizes its input": (hostile("ResizesInput"), (), 1, r"changed its input's shape or layout in place"),
    "clears the padding mask": (f"gqa={HOSTILE / 'modules.py'}:ClearsPaddingMask", ("--only", "padding-mask"), 1,
                                r"changed the attention_mask it was given in place"),
}


@pytest.mark.parametrize("spec,extra,status,cause", list(CASES.values()), ids=list(CASES))
def test_hostile_module_is_judged(spec, extra, status, cause, tmp_path):
    start = time.monotonic()
    rc, out, err, report, md = run(spec, GOOD, *FAST, *extra, tmp_path=tmp_path)
    assert_judged(rc, out, err, report, md, spec, status, cause)
    assert time.monotonic() - start < 30


def test_guard_restores_process_state_in_process():
    """The pytest plugin's path (no worker): every poison is undone after each call into the module."""
    from attnspec.runner import Options, check_target
    from attnspec.targets import resolve

    sys.path.insert(0, str(HOSTILE))
    from modules import POISONS  # noqa: E402

    def snapshot():
        return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_default_device(), os.getcwd(),
                sys.stdout, sys.stderr, list(warnings.filters), torch.get_num_threads(),
                signal.pthread_sigmask(signal.SIG_BLOCK, ()), signal.getsignal(signal.SIGINT),
                signal.getsignal(signal.SIGTERM), torch._C._len_torch_function_stack())

    options = Options(profile="ci", max_examples=2, only=("output-contract", "gradient-causality"))
    before = snapshot()
    for poison in POISONS:
        rep = check_target(resolve(hostile(poison.__name__)), options)
        assert [r.status for r in rep.results] == ["pass", "pass"], (poison.__name__, rep.results)
        assert snapshot() == before, poison.__name__
    assert [r.status for r in check_target(resolve(GOOD), options).results] == ["pass", "pass"]


def test_total_time_limit_stops_the_run(tmp_path):
    spec = hostile("SwallowsTimeout")
    rc, out, err, report, md = run(spec, *FAST, "--time-limit", "60", "--total-time-limit", "1", tmp_path=tmp_path)
    assert rc == 3 and "Traceback" not in out + err, out + err
    [hung] = results(report, spec)
    assert hung["status"] == "not-applicable" and "--total-time-limit 1 s reached" in hung["reason"], hung
    assert md is not None


# ---------------------------------------------------------------------------------------------
# Command lines: usage errors before anything runs (exit 2, one line, no report).

EXAMPLE = {"d_in": 2, "d_out": 2, "num_heads": 1, "context_length": 2, "num_tokens": 2, "batch": 1, "dropout": 0.0,
           "qkv_bias": False, "dtype": "float32", "scale": 1.0, "seed": 0, "device": "cpu"}
USAGE = {
    "--device mps": (("--device", "mps"), r"--device 'mps'"),
    "--device meta": (("--device", "meta"), r"--device 'meta'"),
    "--device nonsense": (("--device", "gpu7"), r"--device 'gpu7'"),
    "--time-limit inf": (("--time-limit", "inf"), r"--time-limit=inf"),
    "--time-limit nan": (("--time-limit", "nan"), r"--time-limit=nan"),
    "--total-time-limit 0": (("--total-time-limit", "0"), r"--total-time-limit=0"),
    "--example scale string": (("--example", json.dumps({**EXAMPLE, "scale": "x"})), r"field scale=\"x\""),
    "--example seed 2**70": (("--example", json.dumps({**EXAMPLE, "seed": 2 ** 70})), r"field seed="),
    "--example dropout null": (("--example", json.dumps({**EXAMPLE, "dropout": None})), r"field dropout=null"),
    "--example qkv_bias 1": (("--example", json.dumps({**EXAMPLE, "qkv_bias": 1})), r"field qkv_bias=1"),
    "--example outlier string": (("--example", json.dumps({**EXAMPLE, "outlier": "x"})), r"field outlier=\"x\""),
    "--example outlier NaN": (("--example", json.dumps({**EXAMPLE, "outlier": float("nan")})), r"field outlier=NaN"),
    "--example ''": (("--example", ""), r"--example is not a configuration JSON"),
    "--example list": (("--example", "[1]"), r"--example is not a configuration JSON"),
    "--report-json ''": (("--report-json", ""), r"--report-json '': empty path"),
    "--report-json at a directory": (("--report-json", "DIR"), r"--report-json .* is a directory"),
    "--report-md /proc/x": (("--report-md", "/proc/x"), r"--report-md '/proc/x' is not writable"),
    "--report-json /dev/full": (("--report-json", "/dev/full"), r"--report-json '/dev/full' is not a regular file"),
    "--expectations /dev/zero": (("--expectations", "/dev/zero"), r"'/dev/zero' is not a regular file"),
    "--example nested 20000 deep": (("--example", "[" * 20000 + "]" * 20000), r"RecursionError"),
    "one file for two reports": (("--report-json", "DIR/r", "--report-md", "DIR/r"), r"also given to --report-json"),
}


@pytest.mark.parametrize("args,pattern", list(USAGE.values()), ids=list(USAGE))
def test_bad_command_line_is_a_usage_error(args, pattern, tmp_path):
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check", hostile("Exit0Forward"), GOOD, *FAST, *args])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and out.getvalue() == "" and len(lines) == 1, (rc, out.getvalue(), err.getvalue())
    assert lines[0].startswith("attnspec: error: ") and re.search(pattern, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The supervisor's own process: run fresh.

def fresh(*args, env=None, **kwargs):
    argv = [sys.executable, "-m", "attnspec", "check", *args]
    return subprocess.Popen(argv, cwd=ROOT, env={**ENV, **(env or {})}, stderr=subprocess.PIPE, **kwargs)


def test_closed_stdout_still_writes_reports_and_fails(tmp_path):
    """`attnspec check ... | head`: the verdict is the exit status and the reports are written."""
    spec, json_path = hostile("Exit0Forward"), tmp_path / "r.json"
    proc = fresh(spec, GOOD, *FAST, "--report-json", str(json_path), stdout=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err.decode()
    assert b"Traceback" not in err, err.decode()
    report = json.loads(json_path.read_text())
    assert results(report, spec)[0]["status"] == "fail" and results(report, GOOD)[0]["status"] == "pass"


def test_non_utf8_path_under_ascii_output(tmp_path):
    """A target file whose name is not UTF-8, printed under PYTHONIOENCODING=ascii: escaped, no traceback."""
    name = os.fsencode(tmp_path) + b"/attn_\xff\xfe.py"
    with open(name, "w") as f:
        f.write("from attnspec.impl import MultiHeadAttention as MHA\n")
    spec = b"mha=" + name + b":MHA"
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    argv = [sys.executable.encode(), b"-m", b"attnspec", b"check", spec, GOOD.encode(), *map(str.encode, FAST),
            b"--report-json", os.fsencode(json_path), b"--report-md", os.fsencode(md_path)]
    proc = subprocess.run(argv, cwd=ROOT, env={**ENV, "PYTHONIOENCODING": "ascii"}, capture_output=True, timeout=120)
    assert b"Traceback" not in proc.stdout + proc.stderr, proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert all(r["status"] == "pass" for t in json.loads(json_path.read_text())["targets"] for r in t["results"])
    assert "attn_" in html.unescape(md_path.read_text(encoding="utf-8"))


def test_a_report_path_that_is_a_target_file_is_a_usage_error(tmp_path):
    """The report would overwrite the module under test (a copy here: it would be the test's own module)."""
    target = tmp_path / "target.py"
    target.write_bytes((HOSTILE / "correct_module.txt").read_bytes())
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["check", f"mha={target}:MHA", *FAST, "--report-json", str(target)])
    assert rc == 2 and "is the file of target" in err.getvalue(), err.getvalue()
    assert target.read_bytes() == (HOSTILE / "correct_module.txt").read_bytes()


def test_adapter_whose_kind_raises_is_a_usage_error():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check", f"{HOSTILE / 'adapters.py'}:KindRaises", *FAST])
    assert rc == 2 and "reading its 'kind' raised RuntimeError: no kind for you" in err.getvalue(), err.getvalue()
    assert "Traceback" not in out.getvalue() + err.getvalue()


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGABRT"])
def test_a_signal_to_the_supervisor_stops_the_run_with_its_reports(tmp_path, name):
    """SIGUSR1 or SIGABRT from a module to its supervisor (default action: terminate) stops the run like SIGTERM:
    the reports are written and say what was not checked, and the exit status is not 0."""
    spec, json_path = hostile("SignalsSupervisor"), tmp_path / "r.json"
    proc = fresh(spec, *FAST, "--report-json", str(json_path), stdout=subprocess.PIPE, env={"ATTNSPEC_TEST_SIGNAL": name})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and b"Traceback" not in out + err, (out + err).decode()
    [stopped] = results(json.loads(json_path.read_text()), spec)
    assert f"interrupted by {name}" in stopped["reason"], stopped


def test_a_module_that_forks_and_exits_is_judged_and_its_child_killed(tmp_path):
    """A forked child holding the worker's pipes does not hide the worker's exit, and dies with it."""
    pids = tmp_path / "pids"
    spec = hostile("ForksThenExits")
    start = time.monotonic()
    with mock_env(ATTNSPEC_TEST_PIDFILE=str(pids)):
        rc, out, err, report, md = run(spec, GOOD, *FAST, tmp_path=tmp_path)
    assert_judged(rc, out, err, report, md, spec, 1, r"worker process exited with status 0 during forward")
    assert time.monotonic() - start < 15
    time.sleep(0.2)
    for pid in map(int, pids.read_text().split()):  # killed with the worker's process group
        assert not _running(pid), pid


def _running(pid):
    """Whether process ``pid`` exists and is not a zombie (an orphan's exit may wait for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# A supervisor with a second thread takes its workers from a forkserver (supervisor._context): they hold no copy
# of their pipes' other ends, so the supervisor's death reaches them as EOF, where a forked one's watcher sees it.
WITH_A_THREAD = ("import sys, threading, time; threading.Thread(target=time.sleep, args=(600,), daemon=True).start(); "
                 "from attnspec.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("workers", ["forked", "from-forkserver"])
def test_a_supervisor_killed_outright_takes_its_workers_and_their_children(tmp_path, workers):
    """SIGKILL to the supervisor (a CI runner's hard cancel): each worker, busy or idle, notices within a second
    and kills its process group, what the module started included."""
    pids = tmp_path / "pids"
    args = (hostile("SpawnsSleeper"), *FAST, "--max-examples", "1")
    env = {**ENV, "ATTNSPEC_TEST_PIDFILE": str(pids)}
    if workers == "forked":
        proc = fresh(*args, stdout=subprocess.DEVNULL, env=env)
    else:
        proc = subprocess.Popen([sys.executable, "-c", WITH_A_THREAD, "check", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # and not reaped until the end: a zombie supervisor is a dead one
    deadline = time.monotonic() + 20  # (a leaked sleeper lives 300 s; a loaded CI machine may be slow to kill)
    while (alive := [pid for pid in map(int, pids.read_text().split()) if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.communicate(timeout=30)
    assert pids.read_text().split() and not alive, alive


def test_reports_to_the_process_own_streams_are_allowed():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["check", GOOD, *FAST, "--report-md", "/dev/stderr"]) == 0


def test_an_adapter_declining_one_configuration_in_adjust_is_not_structural():
    from attnspec.errors import NotApplicable
    from attnspec.kinds import Config
    from attnspec.runner import Declined, adjusted

    class Declines:
        def adjust(self, cfg):
            raise NotApplicable("not this one", structural=False)

    cfg = Config(d_in=1, d_out=1, num_heads=1, context_length=1, num_tokens=1, batch=1, dropout=0.0, qkv_bias=False,
                 dtype="float32", scale=1.0, seed=0)
    declined = adjusted(Declines(), cfg)
    assert isinstance(declined, Declined) and declined.error.structural is False and "not this one" in str(declined.error)


@contextlib.contextmanager
def mock_env(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_sigterm_reports_what_was_judged(tmp_path):
    """SIGTERM to the supervisor: the reports hold what was judged, the rest is "not checked", exit != 0."""
    spec, json_path = hostile("SwallowsTimeout"), tmp_path / "r.json"
    proc = fresh(GOOD, spec, *FAST, "--time-limit", "60", "--report-json", str(json_path), stdout=subprocess.PIPE)
    err = b""
    while b"[1/2]" not in err:  # GOOD's progress line: it has been judged
        line = proc.stderr.readline()
        assert line, err.decode()
        err += line
    proc.send_signal(signal.SIGTERM)
    out, rest = proc.communicate(timeout=60)
    assert proc.returncode == 3, (out + err + rest).decode()
    assert b"Traceback" not in out + err + rest
    report = json.loads(json_path.read_text())
    assert [r["status"] for r in results(report, GOOD)] == ["pass"]
    [hung] = results(report, spec)
    assert hung["status"] == "not-applicable" and "interrupted by SIGTERM" in hung["reason"], hung


def test_one_target_is_shared_by_two_workers_and_reported_in_catalogue_order():
    """With one target and two cores, a second worker takes half of its invariants once output-contract
    passed; the report keeps the catalogue's order whichever worker finished first."""
    from attnspec.runner import Options
    from attnspec.supervisor import Supervisor

    only = ("output-contract", "finite-output", "eval-deterministic", "qkv-bias", "oracle-float64", "causal-perturbation")
    options = Options(only=only, max_examples=3)
    supervisor = Supervisor(["mha=attnspec.impl:MultiHeadAttention"], options)
    (report,) = supervisor.run()
    assert [r.invariant for r in report.results] == [inv.id for inv in options.selected()]
    assert report.status == 0, [(r.invariant, r.status, r.reason) for r in report.results]
    assert supervisor.jobs[0].attempts == 2  # the first worker, and one beside it


@pytest.mark.parametrize("only", [("output-contract", "finite-output", "eval-deterministic"),
                                  ("finite-output", "eval-deterministic")])
def test_a_worker_dying_while_its_sibling_imports_fails_the_target(tmp_path, monkeypatch, only):
    """A lone target without KIND= has two workers importing it at once; the one that dies there fails the
    target's first invariant, and the rest are not checked, once the other worker has told the kind."""
    from attnspec.runner import Options
    from attnspec.supervisor import Supervisor

    monkeypatch.setenv("FLAKY_IMPORT_LOCK", str(tmp_path / "lock"))
    supervisor = Supervisor([f"{HOSTILE / 'flaky_import.py'}:Target"], Options(only=only, max_examples=2))
    (report,) = supervisor.run()
    first, *rest = report.results
    assert first.status == "fail" and "exited with status 3 while importing" in first.reason, first
    assert rest and all(r.status == "not-applicable" and "not checked" in r.reason for r in rest), rest
    assert report.status == 1


def test_a_broken_contract_stops_the_target_before_its_second_worker_checks_anything(tmp_path):
    from attnspec.runner import Options
    from attnspec.supervisor import Supervisor

    (tmp_path / "wrong_shape.py").write_text(
        "from attnspec.impl import MultiHeadAttention\n\n"
        "class WrongShape(MultiHeadAttention):\n"
        "    def forward(self, x):\n"
        "        return super().forward(x)[..., :1]\n")
    only = ("output-contract", "finite-output", "eval-deterministic", "qkv-bias")
    supervisor = Supervisor([f"mha={tmp_path / 'wrong_shape.py'}:WrongShape"], Options(only=only, max_examples=3))
    (report,) = supervisor.run()
    assert [r.status for r in report.results] == ["fail"] + ["not-applicable"] * 3
    assert all("output-contract fails" in r.reason for r in report.results[1:])  # none was handed out


def test_cuda_workers_come_from_a_forkserver_that_never_ran_a_backward_pass(monkeypatch):
    """A backward pass makes autograd's engine count the CUDA devices, which initializes the driver, and a
    child forked after that fails its first CUDA call: on an H200, every invariant of every target was an
    internal error ("CUDA error: initialization error"). So a CUDA run's forkserver is not warmed
    (``attnspec._warm`` checks an example, backward included); a CPU run's is."""
    from attnspec import supervisor

    preloads = []

    class Context:
        def set_forkserver_preload(self, names):
            preloads.append(names)

    monkeypatch.setattr(supervisor, "_forkserver", None)
    monkeypatch.setattr(supervisor.multiprocessing, "get_context", lambda method: Context())
    supervisor._context("cuda:0")
    assert "attnspec._torch" in preloads[0] and "attnspec._warm" not in preloads[0]
    monkeypatch.setattr(supervisor.threading, "active_count", lambda: 2)  # (a CPU run takes the forkserver then)
    monkeypatch.setattr(supervisor, "_forkserver", None)
    supervisor._context("cpu")
    assert "attnspec._warm" in preloads[1]


def test_a_report_replaced_by_a_fifo_during_the_run_is_not_opened(tmp_path, monkeypatch):
    """A module that turns the report's path into a FIFO at construction: opening it would block for ever. The run
    ends, says the report could not be written, and exits 2 (as for any report it cannot write)."""
    monkeypatch.setenv("ATTNSPEC_TEST_REPORT", str(tmp_path / "report.json"))
    start = time.monotonic()
    rc, out, err, _, md = run(hostile("ReportBecomesFifo"), GOOD, *FAST, tmp_path=tmp_path)
    assert rc == 2 and "no longer a regular file (replaced during the run)" in err, (rc, err[-2000:])
    assert time.monotonic() - start < 30

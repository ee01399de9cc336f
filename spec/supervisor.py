"""Process isolation for `attnspec check`: the supervisor owns the verdict, the timer and the reports
and never imports the module under test (attnspec's own adapter modules are imported once, ``_preload``, so
that workers fork with the library they wrap); each target is resolved and checked in its own worker.

Workers are forked from a process that has imported torch and attnspec (``_context``: ~20 ms a
worker, not the ~3 s of a fresh interpreter), so every target gets a fresh process: nothing a
module does to its process (global state, threads, signal handlers, atexit hooks, os._exit, a
segfault) reaches the supervisor or another target. Two workers check at a time (``JOBS``).

The unit of work is one invariant of one target. A worker holds one imported target and is handed
its invariants one at a time, output-contract first and the longest next (``LONGEST_FIRST``); when a
slot is free and no other target waits, a second worker is started for a target with invariants left
(once its output-contract passed; a run of one target starts it beside the first, so that both import
at once), so one target uses both cores and the last target of a run does not leave a core idle.

Protocol: JSON over two one-way pipes, never pickled objects. Supervisor -> worker:
``{"op": "resolve", ...}`` then, once every target resolved, ``{"op": "check", ...}`` per invariant.
Worker -> supervisor: ``resolved``/``usage`` (the one-line usage error), then per check one
``result`` (``dataclasses.asdict(Result)``) and ``done``. Around every call into the module (spec/case.py's
monitor) the worker writes what it calls, the configuration and the time onto a small shared-memory
board (no system call: thousands of calls a second cost nothing), which the supervisor reads for
its deadlines and, after a death, for the reason and the counterexample.

The supervisor kills a worker whose call outlives the per-call limit by ``grace`` (a module that
blocks, ignores or swallows SIGALRM, or one long C++ op), whose import outlives ``IMPORT_LIMITS``
per-call limits, or that stays ``SILENCE_S`` in attnspec's own code without a call. A worker that dies, exits (any status) or is killed fails the invariant it was in,
with the reason and, if it was in a call, the configuration; the target's remaining invariants go to
a fresh worker, at most ``RETRIES`` deaths a target (then, or after output-contract, they are "not checked").
A worker that dies or hangs while importing fails its target (the other targets are still judged);
an import that raises is a usage error (exit 2), as before.
"""

import dataclasses
import faulthandler
import gc
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from attnspec.case import CALL_TIME_LIMIT_S, change_dir, clean_text, describe
from attnspec.errors import UsageError
from attnspec.kinds import KINDS
from attnspec.runner import Options, Result, TargetReport, prepare_simplest, warm_up
from attnspec.targets import Target, parse

# The kind of a target given without KIND= until its worker imports it (the adapter declares it).
UNRESOLVED = dataclasses.replace(next(iter(KINDS.values())), name="unresolved",
                                 summary="a target whose adapter declares its kind, not imported yet")

JOBS = 2  # targets checked at a time (the CI machine has 2 cores)
BOARD_BYTES = 4096  # the worker's board: 4-byte length, then JSON [what or null, cfg json, monotonic time]
IMPORT_LIMITS = 3  # importing a target may take this many per-call limits
SILENCE_S = 60.0  # the longest a worker may go without a message outside calls (harness code only)
RETRIES = 2  # fresh workers for a target's remaining invariants after its worker died
POLL_S = 0.25  # how often the supervisor looks at its signal flag


# ---------------------------------------------------------------------------------------------
# The worker side (forked from the supervisor or the forkserver; imports the module under test).

# Signals that end a process by default: in `attnspec check` each stops the run with what was judged reported
# (exit non-zero), so that neither a CI runner's cancel nor a module signalling its supervisor
# (os.kill(os.getppid(), ...)) ends it without a report; a worker gets the default back. SIGKILL and SIGSTOP
# cannot be caught (README, threat model).
STOPPING_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGXCPU",
    "SIGXFSZ", "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGABRT", "SIGSYS", "SIGTRAP") if hasattr(signal, name))
# Not caught: SIGSEGV, SIGBUS, SIGFPE and SIGILL (a handler that returns from a real fault re-runs the faulting
# instruction forever), and SIGTSTP (Ctrl-Z must still suspend a run).


def _worker_main(commands, events, board, supervisor_pid):
    """Resolve one target, wait for the go, check it, stream results; always ends with os._exit, so a
    module's non-daemon threads and atexit hooks cannot keep the process alive or change anything."""
    gc.freeze()  # what the fork copied is never collected here: collections neither scan it nor copy its pages
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # nothing a module writes reaches the terminal or the supervisor's stdout
        os.dup2(devnull, fd)
    faulthandler.disable()  # (pytest's, inherited: it holds its own copy of stderr)
    try:  # a session of its own: whatever the module starts (a forked child, a pool) is killed with the worker
        os.setsid()
    except OSError:
        pass
    multiprocessing.current_process().daemon = False  # a module may start a Pool or DataLoader workers
    for s in STOPPING_SIGNALS:  # (a forked worker inherits the supervisor's handlers)
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's: a KeyboardInterrupt here is the module's
    threading.Thread(target=_watch_supervisor, args=(supervisor_pid,), daemon=True).start()

    def send(**message):
        try:
            events.send_bytes(json.dumps(message).encode())
        except OSError:  # the supervisor is gone (a forkserver's worker holds no copy of the pipe's other end)
            _end_session()

    def receive():
        try:
            return json.loads(commands.recv_bytes())
        except EOFError:  # the supervisor is gone: its end closed with it (a forkserver's worker holds no copy)
            _end_session()

    try:
        job = receive()
        change_dir(job["cwd"])  # (or its nearest ancestor, if a module deleted it)
        os.environ.clear()
        os.environ.update(job["env"])
        sys.path[:] = job["path"]
        _run(job, receive, send, board)
    except BaseException as e:  # attnspec's own code failed (the module's exceptions are caught in guard)
        try:
            where = traceback.extract_tb(e.__traceback__)[-1]
            send(ev="crash", error=f"({where.filename}:{where.lineno}): {describe(e)}")
        except BaseException:
            pass
    finally:
        os._exit(0)


def _run(job, receive, send, board):
    import torch

    from attnspec import case
    from attnspec.kinds import Config
    from attnspec.runner import check_target
    from attnspec.targets import resolve

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    try:
        with case.restored_state():  # what the import changed process-wide (a mode entered, grad disabled) is undone
            target = resolve(job["target"], tuple(job["variants"]))
    except UsageError as e:
        return send(ev="usage", message=str(e))
    send(ev="resolved", adapter=type(target.adapter).__name__, kind=target.kind.name, variants=list(target.variants),
         features=list(target.kind.features()))
    case.set_monitor(_Board(board).post)
    while True:  # one invariant per command, until the supervisor kills this worker
        job = receive()
        options = Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["options"].items()})
        example = Config.from_json(job["example"]) if job["example"] else None
        check_target(target, options, progress=lambda r: send(ev="result", result=dataclasses.asdict(r)), example=example)
        send(ev="done")


class _Board:
    """The worker's side of the board: (what, cfg) before a call, (None, None) after it."""

    def __init__(self, board):
        self.board, self.cfg, self.cfg_json = board, None, None

    def post(self, what, cfg):
        if cfg is not None and cfg is not self.cfg:
            self.cfg, self.cfg_json = cfg, cfg.to_json()
        data = json.dumps([what, self.cfg_json if what else None, time.monotonic()]).encode()
        if len(data) <= BOARD_BYTES - 4:
            self.board[4:4 + len(data)] = data
            self.board[0:4] = len(data).to_bytes(4, "little")


def _read_board(board):
    """(what, cfg json, since) in a call, (None, None, since) after one, or None (empty or mid-write)."""
    try:
        n = int.from_bytes(board[0:4], "little")
        what, cfg, since = json.loads(board[4:4 + n]) if 0 < n <= BOARD_BYTES - 4 else (None, None, None)
        return (clean_text(str(what)) if what is not None else None, cfg, float(since)) if since is not None else None
    except (ValueError, TypeError):
        return None


def _watch_supervisor(pid):
    """A worker outlives no supervisor (one killed with SIGKILL leaves no orphan spinning): within a second of its
    death (a zombie not yet reaped counts as dead), the worker ends its session."""
    while True:
        time.sleep(1.0)
        if not _alive(pid):
            _end_session()


def _alive(pid):
    """Whether process ``pid`` exists and has not exited (a zombie waits for its parent's wait(), which may never come)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # (no /proc: macOS)


def _end_session():
    """Kill this worker's process group (``os.setsid`` made it the leader), what the module started included, and
    the worker with it. For a supervisor that is gone: nobody else will."""
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


# ---------------------------------------------------------------------------------------------
# The supervisor side.

_forkserver = None
_warm = False


def _context(device):
    """Where workers come from. A single-threaded supervisor (the `attnspec check` process) checking
    on the CPU forks itself: torch is imported, no thread holds a lock and no tensor op has started
    an OpenMP pool, so a worker starts in ~20 ms. With other threads (e.g. cli.main inside
    pytest-xdist), or CUDA (which a forked child cannot re-initialize), workers come from a
    forkserver that imports torch and attnspec once (~3 s, then ~20 ms a worker). Either parent is
    warmed once before its first fork (``runner.warm_up``; ``attnspec._warm`` in the forkserver), except
    for CUDA: warming runs a backward pass, autograd's engine then counts the CUDA devices, which
    initializes the driver, and a child forked after that fails its first CUDA call ("initialization error")."""
    global _forkserver, _warm
    if threading.active_count() == 1 and device == "cpu":
        if not _warm:
            _warm = True
            warm_up()
        return multiprocessing.get_context("fork")
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(["attnspec._torch", "attnspec.runner", "attnspec.invariants", "attnspec.impl",
                                            *(["attnspec._warm"] if device == "cpu" else [])])
    return _forkserver


def _exit_reason(code):
    if code is None:
        return "stopped answering"
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class _Worker:
    def __init__(self, job, device):
        ctx = _context(device)
        commands_r, self.commands = ctx.Pipe(duplex=False)
        self.events, events_w = ctx.Pipe(duplex=False)
        self.board = ctx.RawArray("c", BOARD_BYTES)
        self.process = ctx.Process(target=_worker_main, args=(commands_r, events_w, self.board, os.getpid()), daemon=True,
                                   name=f"attnspec worker {job.index}")
        self.process.start()
        commands_r.close()
        events_w.close()
        self.job, self.state = job, "resolving"
        self.inflight = None  # the invariant it is checking
        self.started = self.heard = time.monotonic()
        self.posted = None  # the board as last read

    @property
    def call(self):
        """(what, cfg json, since) while the module runs, else None."""
        posted = _read_board(self.board)
        self.posted = posted or self.posted
        return self.posted if self.posted and self.posted[0] is not None else None

    @property
    def quiet_since(self):
        """Since when the worker has been in attnspec's own code (the last call returned, or the go)."""
        return max(self.heard, self.posted[2]) if self.posted else self.heard

    def send(self, **message):
        try:
            self.commands.send_bytes(json.dumps(message).encode())
        except OSError:  # it died: its sentinel says so
            pass

    def kill(self):
        if self.process.is_alive():
            self.process.kill()
        try:  # its process group (``os.setsid`` in _worker_main): the children it left, which outlive it
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.join(5)
        self.events.close()
        self.commands.close()


@dataclasses.dataclass
class _Job:
    """One target as the supervisor sees it: its invariants in order, the results received so far, the
    invariants not yet handed to a worker, and its workers (one, or two near the end of a run)."""

    index: int
    spec: str
    target: Target
    expected: list
    results: dict = dataclasses.field(default_factory=dict)  # invariant id -> Result
    queue: list = None  # invariants not yet handed out (None until the target resolved)
    workers: list = dataclasses.field(default_factory=list)
    attempts: int = 0  # workers started
    deaths: int = 0
    resolved: bool = False  # a worker has imported it once
    import_death: tuple = None  # (status, reason) of a worker that died importing it while its sibling imported
    done: bool = False

    @property
    def ordered(self):
        return [self.results[i] for i in self.expected if i in self.results]

    @property
    def complete(self):
        return all(i in self.results for i in self.expected)

    @property
    def contract_judged(self):
        """Whether the target's other invariants may run beside each other (output-contract first)."""
        return "output-contract" not in self.expected or "output-contract" in self.results


class Supervisor:
    """Check ``specs`` (KIND=TARGET texts) in worker processes; ``run()`` returns TargetReports in the
    order given. ``stop(reason)`` (from a signal handler) ends the run early: what was judged is kept,
    the rest is "not checked"."""

    def __init__(self, specs, options, example=None, threads=None, total_time_limit=None, on_resolved=None,
                 on_report=None, variants=()):
        self.options, self.example, self.threads = options, example, threads
        self.limit = options.time_limit or CALL_TIME_LIMIT_S
        self.grace = max(2.0, 0.5 * self.limit)
        self.deadline = None if total_time_limit is None else time.monotonic() + total_time_limit
        self.total_time_limit = total_time_limit
        self.on_resolved, self.on_report = on_resolved, on_report
        self.stopped = None
        self.cwd = os.getcwd()  # once: a module may delete the directory (workers start in it)
        self.jobs = []
        self.selected, self.variants = options.selected(), tuple(variants)
        for i, spec in enumerate(specs):
            kind, ref, _, _ = parse(spec)
            # A target without KIND= (an adapter declaring its kind) gets its invariants once its worker
            # has imported it; until then it stands for a target of unknown kind, whose import is checked.
            target = Target(kind or UNRESOLVED, ref, None)
            self.jobs.append(_Job(i, spec, target, self._invariants(kind) if kind else ["output-contract"]))

    def _invariants(self, kind):
        return [inv.id for inv in self.selected if inv.applies_to(kind)]

    def stop(self, reason):
        self.stopped = self.stopped or reason

    @property
    def workers(self):
        return [w for job in self.jobs for w in job.workers]

    # -- the run

    def _preload(self):
        """attnspec's own adapter modules that the targets name (``attnspec.adapters.transformers:...``),
        imported here once so that forked workers start with them and the library they wrap (transformers:
        ~3 s a worker otherwise). Never a user's module: those are imported in workers only. A failure
        here is left for the worker to report."""
        for job in self.jobs:
            module = parse(job.spec)[2]
            if module.startswith("attnspec.adapters.") and module not in sys.modules:
                try:
                    importlib.import_module(module)
                except Exception:
                    pass

    def run(self):
        try:
            self._preload()
            self._resolve_all()
            if self.on_resolved:
                self.on_resolved([job.target for job in self.jobs])
            if self.stopped is None:
                self._check_all()
        finally:
            for job in self.jobs:
                for worker in job.workers:
                    worker.kill()
                job.workers = []
                if not job.done:
                    self._not_checked(job, f"not checked: {self.stopped or 'the run ended early'}")
        return self.reports()

    def reports(self):
        return [TargetReport(job.target, job.ordered) for job in self.jobs]

    def _start(self, job):
        job.attempts += 1
        worker = _Worker(job, self.options.device)
        job.workers.append(worker)
        worker.send(op="resolve", target=job.spec, variants=list(self.variants), cwd=self.cwd, env=dict(os.environ),
                    path=list(sys.path), threads=self.threads)

    def _resolve_all(self):
        """Every target imported before anything is checked: a usage error stops the run (exit 2). A run
        of fewer targets than JOBS starts each target's second worker now, so that its import overlaps
        the first worker's (it takes work once output-contract holds). While the first workers import, a
        forking supervisor finds the simplest configurations (``prepare_simplest``), which later workers inherit."""
        pending = list(self.jobs) + self.jobs[:max(0, JOBS - len(self.jobs))]
        prepared = _context(self.options.device).get_start_method() != "fork"  # (a forkserver's workers would not inherit)
        while self.stopped is None:
            resolving = [w for w in self.workers if w.state == "resolving"]
            while pending and len(resolving) < JOBS:
                self._start(pending[0])
                resolving.append(pending.pop(0).workers[-1])
            if not prepared:  # while the first workers import: every worker forked later starts with them
                prepared = True
                for kind in {job.target.kind for job in self.jobs if job.target.kind is not UNRESOLVED}:
                    prepare_simplest(kind, self.options)
            if not pending and not resolving:
                return
            self._step()

    def _check_all(self):
        """Hand out invariants while fewer than JOBS workers are busy, until every target is done."""
        while self.stopped is None:
            busy = sum(w.state != "idle" for w in self.workers)
            while busy < JOBS and self._next_work():
                busy += 1
            if all(job.done for job in self.jobs):
                return
            self._step()

    def _next_work(self):
        """Start one piece of work, in this order: the next invariant of a target whose worker is idle; a
        fresh worker for a target that has none (after a death); a second worker for a target with
        invariants left. False if there is nothing to start."""
        open_jobs = [job for job in self.jobs if not job.done and job.queue]
        for job in open_jobs:
            idle = next((w for w in job.workers if w.state == "idle"), None)
            if idle is not None and (job.contract_judged or all(w.state != "checking" for w in job.workers)):
                return self._assign(idle, job.queue.pop(0)) or True
        for job in open_jobs:
            if not job.workers:
                return self._start(job) or True
        for job in open_jobs:
            if len(job.workers) < JOBS and len(job.queue) >= 2 and job.contract_judged:
                return self._start(job) or True
        return False

    def _assign(self, worker, inv):
        options = dataclasses.replace(self.options, only=(inv,), skip=())
        worker.state, worker.inflight, worker.heard = "checking", inv, time.monotonic()
        worker.send(op="check", options=dataclasses.asdict(options),
                    example=self.example.to_json() if self.example else None)

    def _step(self):
        """Wait for messages, deaths or deadlines (at most POLL_S) and handle them."""
        workers = self.workers
        now = time.monotonic()
        deadlines = [d for d in (self._deadline(w) for w in workers) if d is not None]
        if self.deadline is not None:
            deadlines.append(self.deadline)
        timeout = max(0.0, min([POLL_S] + [d - now for d in deadlines]))
        ready = multiprocessing.connection.wait([w.events for w in workers] + [w.process.sentinel for w in workers],
                                                timeout)
        for worker in workers:  # (a process it forked holds its sentinel open: is_alive asks the kernel)
            if worker.events in ready or worker.process.sentinel in ready or not worker.process.is_alive():
                self._read(worker)
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            self.stop(f"--total-time-limit {self.total_time_limit:g} s reached")
        for worker in self.workers:
            deadline = self._deadline(worker)
            if deadline is not None and now >= deadline:
                self._lost(worker, self._timeout_reason(worker, now), killed=True)

    def _deadline(self, worker):
        if worker.state == "resolving":
            return worker.started + IMPORT_LIMITS * self.limit
        if worker.state == "checking":
            call = worker.call
            return call[2] + self.limit + self.grace if call else worker.quiet_since + SILENCE_S
        return None  # idle: waiting for the go

    def _timeout_reason(self, worker, now):
        if worker.state == "resolving":
            return f"importing the target did not finish within {IMPORT_LIMITS * self.limit:g} s (worker killed)"
        call = worker.call
        if call:
            return (f"{call[0]} did not return within {self.limit:g} s (the in-process timer was defeated; "
                    f"worker killed after {now - call[2]:.0f} s)")
        return f"the worker stopped answering for {SILENCE_S:g} s outside any call into the module (worker killed)"

    def _read(self, worker):
        """Handle every message the worker has sent; a closed pipe or a dead process is its end."""
        job = worker.job
        try:
            while worker.events.poll():
                message = json.loads(worker.events.recv_bytes())
                worker.heard = time.monotonic()
                self._handle(worker, message)
                if worker not in job.workers:  # finished, or lost
                    return
        except (EOFError, OSError, ValueError, TypeError, KeyError) as e:
            reason = None if isinstance(e, (EOFError, OSError)) else f"sent a malformed message ({type(e).__name__})"
            self._lost(worker, reason)
            return
        if not worker.process.is_alive():
            self._lost(worker, None)

    def _handle(self, worker, message):
        job, ev = worker.job, message["ev"]
        if ev == "result":
            result = _rebuild(message["result"])
            if result.invariant != worker.inflight or result.invariant in job.results:
                raise ValueError(result.invariant)
            job.results[result.invariant] = result
            if result.invariant == "output-contract" and result.status == "fail":
                self._not_checked(job, "not checked: output-contract fails; fix it first")
        elif ev == "resolved":
            kind = KINDS[str(message["kind"])]
            kind = kind.narrowed(tuple(str(f) for f in message.get("features", kind.features())))  # an adapter's
            if not job.resolved:
                if job.target.kind is UNRESOLVED or job.target.kind != kind:  # not given, or narrowed
                    job.expected = self._invariants(kind)
                job.queue = sorted((i for i in job.expected if i not in job.results), key=_hand_out_order)
                job.target = Target(kind, job.target.name, type(str(message["adapter"]), (), {})(),
                                    variants=tuple(str(v) for v in message["variants"]))
                job.resolved = True
                if job.import_death:  # a sibling died importing it: its first invariant fails, none is checked
                    (status, reason), inv = job.import_death, job.queue.pop(0) if job.queue else None
                    if inv is not None:
                        job.results[inv] = Result(inv, status, reason=reason)
                    self._not_checked(job, f"not checked: the target's worker died in {inv}")
            worker.state = "idle"
            self._finish_if_complete(job)
        elif ev == "usage":
            if not job.resolved:
                raise UsageError(clean_text(str(message["message"])))
            # a later worker that no longer imports: the module's doing
            self._retire(worker)
            self._not_checked(job, f"not checked: importing the target again failed: {clean_text(str(message['message']))}")
            self._finish_if_complete(job)
        elif ev == "done":
            if worker.inflight not in job.results:  # (nothing, normally)
                job.results[worker.inflight] = Result(worker.inflight, "not-applicable",
                                                      reason="not checked: the worker ended early")
            worker.state, worker.inflight = "idle", None
            self._finish_if_complete(job)
        elif ev == "crash":
            self._lost(worker, None, crash=clean_text(str(message["error"])))
        else:
            raise ValueError(ev)

    def _retire(self, worker):
        worker.kill()
        if worker in worker.job.workers:
            worker.job.workers.remove(worker)

    def _finish_if_complete(self, job):
        """A target with every invariant judged: its workers go, its report is out."""
        if job.complete and not job.done and all(w.state == "idle" for w in job.workers):
            for worker in list(job.workers):
                self._retire(worker)
            job.done = True
            if self.on_report:
                self.on_report(job.index, TargetReport(job.target, job.ordered))

    def _lost(self, worker, reason, killed=False, crash=None):
        """The worker ended without finishing its work: fail the invariant it was in (or, while
        importing, the target's first unjudged one), with why."""
        job, call, state, inv = worker.job, worker.call, worker.state, worker.inflight
        if not killed:
            worker.process.join(1.0)
        self._retire(worker)
        if self.stopped is not None:  # the run is being interrupted: that is no verdict on the module
            return
        job.deaths += 1
        if crash is not None:
            status, reason = "internal-error", f"internal error in attnspec {crash}"
        else:
            reason = reason or f"the worker process {_exit_reason(worker.process.exitcode)}"
            where = {"resolving": "while importing the target", "idle": "after importing the target"}.get(state)
            if where is None:
                where = f"during {call[0]}" if call else "outside any call into the module"
            status, reason = "fail", f"{reason} {where}" if not killed else reason
        if state == "resolving" and not job.resolved and any(w.state == "resolving" for w in job.workers):
            # Its sibling is still importing the target, whose invariants (its kind) are known once that one
            # resolves: the death is judged then (``_handle``), or now if the sibling dies as well.
            job.import_death = (status, reason)
            return
        if inv is None:  # importing, or idle: the target's next invariant carries the failure
            inv = next((i for i in (job.queue or job.expected) if i not in job.results), None)
            if job.queue and inv in job.queue:
                job.queue.remove(inv)
        if inv is not None:
            cfg = json.loads(call[1]) if call and status == "fail" else None
            repro = (f"attnspec check {shlex.quote(job.spec)} --only {inv} --example {shlex.quote(call[1])}"
                     if cfg else "")
            job.results[inv] = Result(inv, status, reason=reason, counterexample=cfg, repro=repro)
        if state in ("resolving", "idle") or inv == "output-contract" or job.deaths > RETRIES:
            self._not_checked(job, f"not checked: the target's worker {'died' if status == 'fail' else 'failed'} "
                                   f"in {inv}")
        self._finish_if_complete(job)
        # otherwise: a fresh worker takes the remaining invariants (_next_work starts it)

    def _not_checked(self, job, reason):
        """Every invariant of ``job`` not judged and not being checked is "not checked" (``reason``)."""
        inflight = {w.inflight for w in job.workers}
        for inv in job.expected:
            if inv not in job.results and inv not in inflight:
                job.results[inv] = Result(inv, "not-applicable", reason=reason)
        job.queue = []


# The invariants that take longest (benchmarks/bench.py's per-invariant table), handed out right after
# output-contract: the two workers of a target then end together, not one waiting on a long last one.
LONGEST_FIRST = ("dropout-unbiased", "kv-cache-decoding", "gradient-finite-differences", "history-independent",
                 "parameter-update-respected", "gradient-oracle", "rotary-embedding", "prefix-consistency")


def _hand_out_order(inv):
    """Sort key of a target's queue: output-contract, then LONGEST_FIRST, then the catalogue's order."""
    if inv == "output-contract":
        return -1
    return LONGEST_FIRST.index(inv) if inv in LONGEST_FIRST else len(LONGEST_FIRST)


def _rebuild(fields):
    """A Result from the worker's dict; its text cleaned (lone surrogates, length) once, here."""
    names = {f.name for f in dataclasses.fields(Result)}
    fields = {k: (clean_text(v) if isinstance(v, str) else v) for k, v in fields.items() if k in names}
    return Result(**fields)

"""The command line: `attnspec list` prints the spec; `attnspec check KIND=TARGET ...` gates modules.

Exit status of check (``runner.EXIT``; when several apply, the first of 2, 1, 4, 3, 0):
0 every applicable invariant was checked and holds on every target; 1 at least one is violated (a
module that raises, hangs, exits or kills its worker included); 2 usage error (unknown kind, malformed
or unimportable target, bad option or report path, a selection that leaves nothing to check), before
anything runs; 3 not fully checked: some invariant is n/a and the user did not accept it (--accept-na,
--expectations), or the run was stopped early (SIGTERM/SIGINT, --total-time-limit); 4 internal error in
attnspec itself (nothing failed). The targets run in worker processes (spec/supervisor.py); this process
owns the verdict and the reports, which are written whatever happens, before anything is printed."""

import argparse
import atexit
import json
import math
import os
import signal
import sys
import threading

from attnspec import _torch  # noqa: F401  (first: torch without its NumPy warning)

import torch  # noqa: E402

from attnspec import __version__, expectations, profiles, report
from attnspec.errors import UsageError
from attnspec.invariants import CATALOGUE, OBSERVES
from attnspec.kinds import DEFAULT_DTYPES, DTYPES, KINDS, Config
from attnspec.runner import EXIT, Options, exit_status
from attnspec.supervisor import STOPPING_SIGNALS, Supervisor
from attnspec.targets import BUNDLED, looks_like_file, parse
from attnspec.variants import VARIANTS, check_names

GPT2_SIZES = {"d_in": 768, "d_out": 768, "num_heads": 12, "context_length": 1024}


def _parser():
    parser = argparse.ArgumentParser(
        prog="attnspec", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status of check: " + "; ".join(f"{code} {EXIT[code]}" for code in sorted(EXIT)))
    parser.add_argument("--version", action="version", version=f"attnspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="print the catalogue of invariants")
    lst.add_argument("--markdown", action="store_true", help="print SPEC.md")
    lst.add_argument("--kinds", action="store_true", help="print the kinds and their constructor signatures")
    lst.add_argument("--variants", action="store_true", help="print the contract variants (--variant NAME)")
    chk = sub.add_parser("check", help="check targets against the spec (no targets: the bundled impl modules)",
                         epilog="exit status: " + "; ".join(f"{code} {EXIT[code]}" for code in sorted(EXIT)))
    chk.add_argument("targets", nargs="*", metavar="KIND=TARGET",
                     help=f"KIND one of {', '.join(KINDS)}; TARGET package.module:Attr or path/to/file.py:Attr "
                          f"(KIND= may be left out for an adapter that declares its kind)")
    chk.add_argument("--profile", choices=profiles.CHOICES, default=None,
                     help="attnspec's Hypothesis profile (ci = attnspec-ci, ...; default: $ATTNSPEC_PROFILE, "
                          "else ci when $CI is set, else dev)")
    chk.add_argument("--max-examples", type=int, help="examples per invariant and target (overrides the profile)")
    chk.add_argument("--seed", type=int, help="Hypothesis seed: another fixed sequence of examples (default under ci: one per invariant and target)")
    chk.add_argument("--only", action="append", default=[], metavar="ID", help="check only these invariant ids")
    chk.add_argument("--skip", action="append", default=[], metavar="ID", help="skip these invariant ids")
    chk.add_argument("--variant", action="append", default=[], metavar="NAME",
                     help=f"check against a contract variant (repeatable): {', '.join(VARIANTS)}")
    chk.add_argument("--dtype", action="append", choices=sorted(DTYPES), help=f"dtypes to draw (default {', '.join(DEFAULT_DTYPES)})")
    chk.add_argument("--device", default="cpu", help="torch device for modules and inputs (e.g. cuda)")
    chk.add_argument("--size", choices=("small", "gpt2"), default="small",
                     help="small: drawn sizes up to 130 tokens, head_dim 128, 16 heads, batch 8 (for some invariants "
                          "520 tokens, head_dim 256, 32 heads, batch 16) (default); gpt2: emb 768, 12 heads, context 1024")
    chk.add_argument("--time-limit", type=float, default=None, help="seconds allowed per constructor/forward call")
    chk.add_argument("--total-time-limit", type=float, default=None, metavar="S",
                     help="stop after S seconds: what was judged is reported, the rest is not checked (exit 3 if nothing failed)")
    chk.add_argument("--example", help="run one configuration, given as the JSON a report prints, instead of searching")
    chk.add_argument("--accept-na", action="append", default=[], metavar="ID[,ID]",
                     help="accept these invariants (globs allowed) being n/a on every target (else n/a exits 3)")
    chk.add_argument("--expectations", metavar="PATH",
                     help="accepted n/a's per target: lines `TARGET-glob INVARIANT-glob  # reason` (.txt), or .toml/.json")
    chk.add_argument("--junit-xml", metavar="PATH", help="write JUnit XML here: one testcase per (target, invariant)")
    chk.add_argument("--report-json", metavar="PATH", help="write the JSON report here")
    chk.add_argument("--report-md", metavar="PATH", help="write the Markdown report here (e.g. $GITHUB_STEP_SUMMARY)")
    chk.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def _split_ids(values):
    return tuple(i for v in values for i in v.split(",") if i)


DEVICE_TYPES = ("cpu", "cuda")  # where modules and inputs can live (meta has no data; mps is untested)
MAX_SECONDS = 1e6  # a time limit beyond this is a typo (and overflows the timer)


def _check_device(device):
    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"--device {device!r} is not a torch device: {str(e).splitlines()[0]}") from None
    if torch_device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {device!r}: attnspec runs modules on {' or '.join(DEVICE_TYPES)}")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: this torch build has no CUDA device available")
    if torch_device.type == "cuda" and (torch_device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA devices")


def _check_seconds(flag, value):
    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise UsageError(f"{flag}={value} must be a number of seconds in (0, {MAX_SECONDS:g}]")


def _report_path(flag, path):
    """The absolute path of a report (a module that chdirs cannot move it), checked writable now: a bad
    path is a usage error before anything runs, not a crash after the whole run."""
    if path is None:
        return None
    if not path:
        raise UsageError(f"{flag} '': empty path")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory")
    if os.path.exists(path) and not os.path.isfile(path) and not _stream(path):  # a FIFO blocks, /dev/full fails
        raise UsageError(f"{flag} {path!r} is not a regular file")
    if not os.path.isdir(os.path.dirname(path)):
        raise UsageError(f"{flag} {path!r}: directory {os.path.dirname(path)!r} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path!r} is not writable: {e.strerror}") from None
    if not existed:
        os.remove(path)
    return path


def _stream(path):
    """/dev/null, the process's own stdout/stderr or an open descriptor (process substitution): writable as is."""
    return path in (os.devnull, "/dev/stdout", "/dev/stderr") or path.startswith(("/dev/fd/", "/proc/self/fd/"))


def _check_report_paths(paths, specs, expectations_path=None):
    """Each report to a file of its own, none of them a target's or the expectations file (it would be overwritten)."""
    taken = {os.path.realpath(expectations_path): "the --expectations file"} if expectations_path else {}
    for spec in specs:
        module_part = parse(spec)[2]
        if looks_like_file(module_part):
            taken[os.path.realpath(module_part)] = f"the file of target {spec!r}"
    for flag, path in paths.items():
        if path is None or _stream(path):
            continue
        real = os.path.realpath(path)
        if real in taken:
            raise UsageError(f"{flag} {path!r} is {taken[real]}")
        taken[real] = f"also given to {flag}"


def _int(lo, hi):
    return ((int,), lambda v: lo <= v <= hi, f"an integer in [{lo}, {hi}]")


# --example fields: (types, valid(value), what a valid value is). bool is not an int here.
EXAMPLE_FIELDS = {
    **{f: _int(1, 1 << 16) for f in ("d_in", "d_out", "num_heads", "context_length", "num_tokens", "batch")},
    "seed": _int(0, (1 << 63) - (1 << 20)),  # torch.manual_seed(seed + salt) must not overflow
    "dropout": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "qkv_bias": ((bool,), lambda v: True, "true or false"),
    "dtype": ((str,), lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "scale": ((int, float), lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "offset": ((int, float), lambda v: math.isfinite(v), "a finite number"),
    "outlier": ((int, float), lambda v: math.isfinite(v), "a finite number"),
    "device": ((str,), lambda v: True, "a device"),
}


def _parse_example(text, kinds, device):
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        example = Config(**fields)
    except (ValueError, TypeError, RecursionError) as e:
        raise UsageError(f"--example is not a configuration JSON: {type(e).__name__}: {e}") from None
    for name, (types, valid, what) in EXAMPLE_FIELDS.items():
        value = getattr(example, name)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types) or not valid(value):
            raise UsageError(f"--example field {name}={json.dumps(value)} must be {what}")
    if example.device != device:
        raise UsageError(f"--example device {example.device!r} differs from --device {device!r}")
    for kind in kinds:
        reason = kind.invalid_reason(example)
        if reason:
            raise UsageError(f"--example is not a valid {kind.name} configuration: {reason}")
    return example


def cmd_list(args):
    if args.markdown:
        print(report.catalogue_markdown(CATALOGUE, OBSERVES), end="")
    elif args.variants:
        for v in VARIANTS.values():
            print(f"{v.name:<18} {v.summary}\n{'':<18} changes: {', '.join(v.invariants)}")
    elif args.kinds:
        for kind in KINDS.values():
            print(f"{kind.name:<18} {kind.signature}\n{'':<18} {kind.summary}")
    else:
        width = max(len(inv.id) for inv in CATALOGUE)
        for inv in CATALOGUE:
            print(f"{inv.id:<{width}}  [{inv.observes}] {inv.statement}\n{'':<{width}}  kinds: {', '.join(inv.kinds)}")
    return 0


def cmd_check(args):
    try:
        profile = profiles.default_profile(args.profile)
    except ValueError as e:
        raise UsageError(f"{e} (from $ATTNSPEC_PROFILE)") from None
    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError(f"--max-examples={args.max_examples} must be at least 1")
    options = Options(profile=profile, max_examples=args.max_examples, seed=args.seed,
                      dtypes=tuple(args.dtype or DEFAULT_DTYPES), device=args.device,
                      sizes=GPT2_SIZES if args.size == "gpt2" else None, time_limit=args.time_limit,
                      only=_split_ids(args.only), skip=_split_ids(args.skip))
    options.selected()  # validates the ids
    _check_seconds("--time-limit", args.time_limit)
    _check_seconds("--total-time-limit", args.total_time_limit)
    _check_device(args.device)
    accepted = expectations.from_ids(args.accept_na)
    if args.expectations:
        accepted += expectations.load(args.expectations)
    json_path, md_path, junit_path = (_report_path(flag, path) for flag, path in
                                      (("--report-json", args.report_json), ("--report-md", args.report_md),
                                       ("--junit-xml", args.junit_xml)))
    variants = check_names(_split_ids(args.variant))
    specs = args.targets or BUNDLED
    kinds = [parse(spec)[0] for spec in specs]  # malformed targets and unknown kinds: before any worker starts
    _check_report_paths({"--report-json": json_path, "--report-md": md_path, "--junit-xml": junit_path}, specs,
                        args.expectations)
    known = [k for k in kinds if k is not None]  # a target without KIND= declares its kind at import: judged then
    if len(known) == len(kinds):
        options.check_selection(known)
    example = _parse_example(args.example, known, args.device) if args.example is not None else None
    threads = 1 if args.size == "small" and options.device == "cpu" else None  # tiny tensors: threads only contend
    if not args.targets:
        _emit(f"attnspec: no targets given: checking the {len(BUNDLED)} bundled modules of attnspec.impl "
              f"(give KIND=TARGET to check yours)", sys.stderr)

    def resolved(targets):
        """Every target imported (kinds declared by adapters now known): the selection, the example and the
        expectations are judged against them before anything is checked."""
        options.check_selection([t.kind for t in targets])
        if example is not None:
            _parse_example(args.example, [t.kind for t in targets], args.device)
        pairs = [(t.spec, inv.id) for t in targets for inv in options.selected() if inv.applies_to(t.kind)]
        for entry in expectations.unmatched(accepted, pairs):
            _emit(report.visible(expectations.warning(entry)), sys.stderr)
        _emit(report.header(profile, options, targets), sys.stderr)

    supervisor = Supervisor(specs, options, example, threads, args.total_time_limit, on_resolved=resolved,
                            on_report=None if args.quiet else _progress(len(specs)), variants=variants)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # SIGTERM/SIGINT: report what was judged, exit non-zero
        previous = {s: signal.signal(s, lambda signum, frame: supervisor.stop(f"interrupted by {signal.Signals(signum).name}"))
                    for s in STOPPING_SIGNALS}
    try:
        reports = expectations.apply(accepted, supervisor.run())  # resolves every target first: a usage error raises before anything is checked
    except UsageError:
        raise
    except BaseException:  # attnspec's own failure: what was judged is still reported
        _write_reports(expectations.apply(accepted, supervisor.reports()), json_path, md_path, junit_path, profile, options)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    unwritten = _write_reports(reports, json_path, md_path, junit_path, profile, options)  # before stdout, which may be closed
    _emit(report.matrix(reports))
    text = report.details(reports)
    if text:
        _emit("\n" + text)
    _emit("\n" + report.verdict(reports))
    if supervisor.stopped:
        _emit(f"attnspec: stopped early: {supervisor.stopped}", sys.stderr)
    for flag, path, reason in unwritten:
        _emit(f"attnspec: error: {flag} {path!r} could not be written: {reason}", sys.stderr)
    status = exit_status(reports)
    if unwritten and status == 0:  # the verdict stands; a pass whose report is missing is not a pass
        return 2
    return 3 if supervisor.stopped and status == 0 else status  # stopped early: never "checked"


PROGRESS = {"pass": ".", "fail": "F", "not-applicable": "-", "internal-error": "E"}


def _progress(total):
    def show(index, rep):
        marks = "".join(PROGRESS.get(r.status, "?") for r in rep.results)
        seconds = sum(r.seconds for r in rep.results)
        _emit(f"[{index + 1}/{total}] {report.visible(rep.target.spec)} {marks} {report.VERDICT[rep.status]} "
              f"({seconds:.1f} s)", sys.stderr)
    return show


def _write_reports(reports, json_path, md_path, junit_path, profile, options):
    """Write each report asked for; the ones that could not be written (a full disk), as (flag, path, reason)."""
    def markdown(path):
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(report.to_markdown(reports, profile))

    failed = []
    for flag, path, write in (("--report-json", json_path, lambda p: report.write_json(p, reports, profile, options)),
                              ("--report-md", md_path, markdown),
                              ("--junit-xml", junit_path, lambda p: report.write_junit(p, reports, profile))):
        if path:
            if os.path.exists(path) and not os.path.isfile(path) and not _stream(path):  # (a module can replace it:
                failed.append((flag, path, "no longer a regular file (replaced during the run)"))  # a FIFO would block)
                continue
            try:
                write(path)
            except OSError as e:
                failed.append((flag, path, e.strerror or str(e)))
    return failed


def _emit(text, stream=None):
    """print() that survives a closed stdout (`attnspec check | head`): the verdict is the exit status."""
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, ValueError):
        _silence(stream)


def _silence(stream):
    """Point a closed stream's descriptor at /dev/null, so the interpreter's final flush cannot fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # PYTHONIOENCODING=ascii, a non-UTF-8 path: escaped, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    try:
        return cmd_list(args) if args.command == "list" else cmd_check(args)
    except UsageError as e:
        _emit(f"attnspec: error: {e}", sys.stderr)
        return 2
    except BrokenPipeError:  # `attnspec list | head`; check's output survives a closed stdout in _emit
        _silence(sys.stdout)
        return 0 if args.command == "list" else 4
    except Exception as e:  # a bug in attnspec itself: one line, exit 4 (ATTNSPEC_DEBUG=1: the traceback)
        if os.environ.get("ATTNSPEC_DEBUG"):
            raise
        _emit(f"attnspec: internal error: {type(e).__name__}: {e}", sys.stderr)
        return 4


def console(argv=None):
    """The `attnspec` command and `python -m attnspec`: ``main``, then a quick exit. The exit handlers run
    (atexit: coverage's, multiprocessing's) and the streams are flushed, then the process ends without
    the interpreter's module-by-module teardown of torch (~0.5 s of a run). This process never imports a
    module under test (the workers do), so no handler of theirs is skipped."""
    code = main(argv)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (a closed stdout: the verdict is the exit status)
            pass
    os._exit(code)


if __name__ == "__main__":
    console()

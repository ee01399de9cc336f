"""The command line: `attnspec list` prints the spec; `attnspec check KIND=TARGET ...` gates modules.

Exit status of check: 0 every applicable invariant holds for every target; 1 at least one is
violated; 2 usage error (unknown kind, malformed or unimportable target, bad option)."""

import argparse
import os
import sys
import time

import torch

from attnspec import profiles, report
from attnspec.errors import UsageError
from attnspec.invariants import CATALOGUE, OBSERVES
from attnspec.kinds import DEFAULT_DTYPES, DTYPES, KINDS, Config
from attnspec.runner import Options, check_target
from attnspec.targets import BUNDLED, resolve

GPT2_SIZES = {"d_in": 768, "d_out": 768, "num_heads": 12, "context_length": 1024}


def _parser():
    parser = argparse.ArgumentParser(prog="attnspec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="print the catalogue of invariants")
    lst.add_argument("--markdown", action="store_true", help="print SPEC.md")
    lst.add_argument("--kinds", action="store_true", help="print the kinds and their constructor signatures")
    chk = sub.add_parser("check", help="check targets against the spec (no targets: the bundled impl modules)")
    chk.add_argument("targets", nargs="*", metavar="KIND=TARGET",
                     help=f"KIND one of {', '.join(KINDS)}; TARGET package.module:Attr or path/to/file.py:Attr")
    chk.add_argument("--profile", choices=profiles.PROFILES, default=None,
                     help="Hypothesis profile (default: ci when $CI is set, else dev)")
    chk.add_argument("--max-examples", type=int, help="examples per invariant and target (overrides the profile)")
    chk.add_argument("--seed", type=int, help="Hypothesis seed (turns off derandomization)")
    chk.add_argument("--only", action="append", default=[], metavar="ID", help="check only these invariant ids")
    chk.add_argument("--skip", action="append", default=[], metavar="ID", help="skip these invariant ids")
    chk.add_argument("--dtype", action="append", choices=sorted(DTYPES), help=f"dtypes to draw (default {', '.join(DEFAULT_DTYPES)})")
    chk.add_argument("--device", default="cpu", help="torch device for modules and inputs (e.g. cuda)")
    chk.add_argument("--size", choices=("small", "gpt2"), default="small",
                     help="small: drawn sizes up to 130 tokens, head_dim 64, 8 heads, batch 8 (default); "
                          "gpt2: emb 768, 12 heads, context 1024")
    chk.add_argument("--time-limit", type=float, default=None, help="seconds allowed per constructor/forward call")
    chk.add_argument("--example", help="run one configuration, given as the JSON a report prints, instead of searching")
    chk.add_argument("--report-json", metavar="PATH", help="write the JSON report here")
    chk.add_argument("--report-md", metavar="PATH", help="write the Markdown report here (e.g. $GITHUB_STEP_SUMMARY)")
    chk.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def _split_ids(values):
    return tuple(i for v in values for i in v.split(",") if i)


def _check_device(device):
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a torch device: {str(e).splitlines()[0]}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: this torch build has no CUDA device available")


def _parse_example(text, targets, device):
    try:
        example = Config.from_json(text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--example is not a configuration JSON: {e}") from None
    ints = ("d_in", "d_out", "num_heads", "context_length", "num_tokens", "batch", "seed")
    bad = [f for f in ints if not isinstance(getattr(example, f), int) or getattr(example, f) < (0 if f == "seed" else 1)]
    if bad:
        raise UsageError(f"--example fields {', '.join(bad)} must be positive integers")
    if example.device != device:
        raise UsageError(f"--example device {example.device!r} differs from --device {device!r}")
    if example.dtype not in DTYPES:
        raise UsageError(f"--example dtype {example.dtype!r} is not one of {', '.join(DTYPES)}")
    for target in targets:
        reason = target.kind.invalid_reason(example)
        if reason:
            raise UsageError(f"--example is not a valid {target.kind.name} configuration: {reason}")
    return example


def cmd_list(args):
    if args.markdown:
        print(report.catalogue_markdown(CATALOGUE, OBSERVES), end="")
    elif args.kinds:
        for kind in KINDS.values():
            print(f"{kind.name:<18} {kind.signature}\n{'':<18} {kind.summary}")
    else:
        width = max(len(inv.id) for inv in CATALOGUE)
        for inv in CATALOGUE:
            print(f"{inv.id:<{width}}  [{inv.observes}] {inv.statement}\n{'':<{width}}  kinds: {', '.join(inv.kinds)}")
    return 0


def cmd_check(args):
    profile = args.profile or profiles.default_profile()
    if profile not in profiles.PROFILES:
        raise UsageError(f"profile {profile!r} (from $HYPOTHESIS_PROFILE) is not one of {', '.join(profiles.PROFILES)}")
    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError(f"--max-examples={args.max_examples} must be at least 1")
    options = Options(profile=profile, max_examples=args.max_examples, seed=args.seed,
                      dtypes=tuple(args.dtype or DEFAULT_DTYPES), device=args.device,
                      sizes=GPT2_SIZES if args.size == "gpt2" else None, time_limit=args.time_limit,
                      only=_split_ids(args.only), skip=_split_ids(args.skip))
    options.selected()  # validates the ids
    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"--time-limit={args.time_limit} must be a positive number of seconds")
    _check_device(args.device)
    for flag, path in (("--report-json", args.report_json), ("--report-md", args.report_md)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{flag} {path!r}: directory {os.path.dirname(os.path.abspath(path))!r} does not exist")
    if args.size == "small" and options.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronization (~8 ms per op when contended)
    targets = [resolve(t) for t in (args.targets or BUNDLED)]
    example = _parse_example(args.example, targets, args.device) if args.example else None
    err = sys.stderr
    print(report.header(profile, options, targets), file=err)
    reports = []
    for i, target in enumerate(targets, 1):
        start = time.perf_counter()
        if not args.quiet:
            print(f"[{i}/{len(targets)}] {target.spec} ", end="", file=err, flush=True)

        def progress(result):
            if not args.quiet:
                print({"pass": ".", "fail": "F", "not-applicable": "-"}[result.status], end="", file=err, flush=True)

        rep = check_target(target, options, progress=None if args.quiet else progress, example=example)
        reports.append(rep)
        if not args.quiet:
            print(f" {'FAIL' if rep.failed else 'ok'} ({time.perf_counter() - start:.1f} s)", file=err, flush=True)
    print(report.matrix(reports))
    text = report.details(reports)
    if text:
        print("\n" + text)
    if args.report_json:
        report.write_json(args.report_json, reports, profile, options)
    if args.report_md:
        with open(args.report_md, "a") as f:
            f.write(report.to_markdown(reports, profile))
    return 1 if any(rep.failed for rep in reports) else 0


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return cmd_list(args) if args.command == "list" else cmd_check(args)
    except UsageError as e:
        print(f"attnspec: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `attnspec list | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

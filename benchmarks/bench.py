"""Speed of attnspec under a profile (default ci): time to a verdict per bundled target, time per
invariant, and time to reject each planted bug of tests/planted.py (search and shrinking included).

    python benchmarks/bench.py [--profile ci] [--repeat 3] [--bugs] [--modern] [--json PATH]

Prints Markdown tables (medians over --repeat runs) of wall-clock seconds and CPU seconds of this
process (``time.process_time``: on a shared machine the wall clock also counts other processes'
turns; the load average is printed with the figures). Budget (issue 9) on the 2-core CI machine:
median verdict per bundled target <= 3 s, <= 6 s per planted bug. A verdict is timed as `attnspec check
TARGET` runs it (spec/supervisor.py: two worker processes on two cores)."""

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from attnspec import profiles  # noqa: E402,F401  (registers the profiles)
from attnspec.runner import Options, check_target  # noqa: E402
from attnspec.supervisor import Supervisor  # noqa: E402
from attnspec.targets import BUNDLED, resolve  # noqa: E402


def _cpu():
    """CPU seconds of this process and of its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """(wall seconds, CPU seconds of this process and its workers, fn())."""
    start, cpu = time.perf_counter(), _cpu()
    value = fn()
    return time.perf_counter() - start, _cpu() - cpu, value


def verdict(spec):
    """The TargetReport of `attnspec check SPEC` as the CLI runs it (its supervisor and worker processes,
    one torch thread each), after the interpreter has started."""
    (rep,) = Supervisor([spec], Options(), threads=1).run()
    return rep


def bench_bundled(repeat):
    rows, per_invariant = [], {}
    for spec in BUNDLED:
        times, cpus, single = [], [], []
        for _ in range(repeat):
            seconds, cpu, rep = timed(lambda: verdict(spec))
            times.append(seconds)
            cpus.append(cpu)
            assert rep.status == 0, f"{spec}: {[(r.invariant, r.status, r.reason) for r in rep.results if r.status != 'pass']}"
            for r in rep.results:
                per_invariant.setdefault(r.invariant, {}).setdefault(spec, []).append(r.seconds)
            target = resolve(spec)  # the same work in this process, one invariant after another
            single.append(timed(lambda: check_target(target, Options()))[0])
        rows.append({"target": spec, "median_s": round(statistics.median(times), 2), "max_s": round(max(times), 2),
                     "median_cpu_s": round(statistics.median(cpus), 2),
                     "median_one_process_s": round(statistics.median(single), 2)})
    table = {inv: {spec: round(statistics.median(v), 3) for spec, v in by_target.items()}
             for inv, by_target in per_invariant.items()}
    return rows, table


def bench_bugs():
    sys.path.insert(0, str(ROOT / "tests"))
    from planted import CORPUS

    rows = []
    for bug in CORPUS:
        seconds, cpu, rep = timed(lambda: verdict(f"{bug.kind}=tests/planted.py:{bug.name}"))
        failed = [r for r in rep.results if r.status == "fail"]
        first = min((r.seconds for r in failed), default=None)
        rows.append({"bug": bug.name, "kind": bug.kind, "verdict_s": round(seconds, 2), "verdict_cpu_s": round(cpu, 2),
                     "fastest_rejecting_invariant_s": first, "rejected_by": len(failed), "rejected": bool(failed)})
    return rows


# Issue 13's modern targets: their verdict time is compared with the bundled mha's (budget: at most 2x).
MODERN = ("gqa=attnspec.impl:GroupedQueryAttention", "attnspec.adapters.torch:SDPA",
          "attnspec.adapters.transformers:LlamaAttention", "attnspec.adapters.transformers:MistralAttention",
          "attnspec.adapters.transformers:Qwen2Attention")


def bench_modern(repeat, mha_s):
    """Verdict times of MODERN and their ratio to mha's median (``mha_s``). The first verdict of an adapter
    also imports the library it wraps (once per run, in the supervisor): reported apart, as "first"."""
    rows = []
    for spec in MODERN:
        times = [timed(lambda: verdict(spec))[0] for _ in range(repeat)]
        rows.append({"target": spec, "median_s": round(statistics.median(times), 2), "first_s": round(times[0], 2),
                     "ratio_to_mha": round(statistics.median(times) / mha_s, 2)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", choices=profiles.CHOICES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bugs", action="store_true", help="also time the rejection of every planted bug")
    parser.add_argument("--modern", action="store_true", help="also time issue 13's modern targets against mha")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    settings.load_profile(profiles.resolve(args.profile))  # attnspec-ci, not Hypothesis's own "ci"
    warnings.simplefilter("ignore")  # torch's UserWarnings from modules under test are not figures
    torch.set_num_threads(1)  # as `attnspec check` does for small sizes
    load = os.getloadavg()[0]
    rows, table = bench_bundled(args.repeat)
    print(f"## Time to a verdict, bundled targets ({args.profile} profile, median of {args.repeat})\n")
    print(f"Load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n")
    print("`attnspec check TARGET` (two worker processes), after the interpreter started; CPU s of all its "
          "processes; and the same invariants one after another in one process.\n")
    print("| target | median s | max s | median CPU s | one process s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['target']}` | {r['median_s']} | {r['max_s']} | {r['median_cpu_s']} | {r['median_one_process_s']} |")
    seconds, cpu, reports = timed(lambda: Supervisor(BUNDLED, Options(), threads=1).run())
    assert all(rep.status == 0 for rep in reports)
    figures_all = {"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2),
                   "invariants": sum(len(rep.results) for rep in reports)}
    print(f"\n`attnspec check` (all {len(BUNDLED)} bundled targets, {figures_all['invariants']} invariants): "
          f"{figures_all['wall_s']} s wall, {figures_all['cpu_s']} CPU s.")
    print("\n## Time per invariant (median s)\n")
    short = [s.split(":")[-1] for s in BUNDLED]
    print("| invariant | " + " | ".join(short) + " |\n|---|" + "---|" * len(short))
    for inv, by_target in table.items():
        print(f"| `{inv}` | " + " | ".join(str(by_target.get(s, "·")) for s in BUNDLED) + " |")
    figures = {"profile": args.profile, "bundled": rows, "all_bundled": figures_all, "per_invariant": table}
    if args.modern:
        mha = next(r["median_s"] for r in rows if r["target"] == "mha=attnspec.impl:MultiHeadAttention")
        figures["modern"] = modern = bench_modern(args.repeat, mha)
        print(f"\n## Modern targets against mha ({mha} s)\n")
        print("| target | median s | first s (with the library's import) | / mha |\n|---|---|---|---|")
        for r in modern:
            print(f"| `{r['target']}` | {r['median_s']} | {r['first_s']} | {r['ratio_to_mha']} |")
    if args.bugs:
        bugs = bench_bugs()
        figures["bugs"] = bugs
        times, cpus = [b["verdict_s"] for b in bugs], [b["verdict_cpu_s"] for b in bugs]
        print(f"\n## Planted bugs: time to a verdict (all invariants; search and shrinking included)\n")
        print(f"{sum(b['rejected'] for b in bugs)}/{len(bugs)} rejected; verdict median {statistics.median(times):.2f} s "
              f"(CPU {statistics.median(cpus):.2f} s), max {max(times):.2f} s (CPU {max(cpus):.2f} s); "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print("| bug | kind | verdict s | verdict CPU s | fastest rejecting invariant s | invariants failing |\n"
              "|---|---|---|---|---|---|")
        for b in bugs:
            print(f"| `{b['bug']}` | {b['kind']} | {b['verdict_s']} | {b['verdict_cpu_s']} | "
                  f"{b['fastest_rejecting_invariant_s']} | {b['rejected_by']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

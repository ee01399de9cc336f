"""How many examples the search needs to reject a wrong module: for each target, every invariant is run under
the ci profile without shrinking, and the index of the first example that failed is recorded. A target is
rejected at budget B when some invariant fails within its first B examples (the explicit simplest
configuration counts as the first).

    python benchmarks/detection.py [--targets FILE] [--max-examples 25] [--json PATH]

Targets: one KIND=TARGET a line in FILE (default: every planted bug of tests/planted.py). With --max-examples N
(every invariant N examples), prints per budget how many of the rejected targets a search of that many examples
would have missed: the data ``profiles.CI_EXAMPLES`` is fitted to. Without it, each invariant gets its ci budget
(``profiles.CI_EXAMPLES``), and the targets it rejects are counted: the check of that table."""

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

from attnspec import profiles, runner  # noqa: E402,F401  (profiles: registers attnspec-ci)
from attnspec.errors import Violation  # noqa: E402
from attnspec.targets import resolve  # noqa: E402

BUDGETS = (3, 5, 8, 10, 12, 15, 18, 20, 25)


def first_failures(spec, max_examples):
    """{invariant id: index of its first failing example} for the invariants that fail on ``spec``."""
    count, first = collections.Counter(), {}
    original = runner.run_example

    def counted(inv, *args, **kwargs):
        count[inv.id] += 1
        try:
            return original(inv, *args, **kwargs)
        except Violation:
            first.setdefault(inv.id, count[inv.id])
            raise

    runner.run_example = counted
    try:
        report = runner.check_target(resolve(spec), runner.Options(max_examples=max_examples))  # (None: ci budgets)
    finally:
        runner.run_example = original
    failed = {r.invariant for r in report.results if r.status == "fail"}
    return {i: n for i, n in first.items() if i in failed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", help="a file of KIND=TARGET lines (default: the planted bugs)")
    parser.add_argument("--max-examples", type=int, help="examples per invariant (default: the ci profile's budgets)")
    parser.add_argument("--json", help="write {target: {invariant: first failing example}} here")
    args = parser.parse_args()
    base = settings.get_profile("attnspec-ci")  # no shrinking: only where the search first meets the bug counts
    settings.register_profile("attnspec-detection", settings(base, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                                                             print_blob=False))
    settings.load_profile("attnspec-detection")
    profiles.PER_INVARIANT_BUDGETS["attnspec-detection"] = profiles.PER_INVARIANT_BUDGETS["attnspec-ci"]  # ci's budgets
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if args.targets:
        specs = [line.strip() for line in Path(args.targets).read_text().splitlines() if line.strip()]
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from planted import CORPUS

        specs = [f"{bug.kind}=tests/planted.py:{bug.name}" for bug in CORPUS]
    found = {spec: first_failures(spec, args.max_examples) for spec in specs}
    rejected = {spec: min(f.values()) for spec, f in found.items() if f}
    within = f"{args.max_examples} examples" if args.max_examples else "the ci budgets (profiles.CI_EXAMPLES)"
    print(f"{len(rejected)} of {len(specs)} targets rejected within {within}\n")
    if not args.max_examples:
        print("\n".join(f"- not rejected: {spec}" for spec in specs if spec not in rejected))
        if args.json:
            Path(args.json).write_text(json.dumps(found, indent=1))
        return
    print("| examples per invariant | " + " | ".join(map(str, BUDGETS)) + " |\n|---|" + "---|" * len(BUDGETS))
    print("| rejected targets missed | " + " | ".join(str(sum(n > b for n in rejected.values())) for b in BUDGETS) + " |")
    for spec, n in sorted(rejected.items(), key=lambda kv: -kv[1])[:10]:
        print(f"- {spec}: first failure at example {n}")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()

"""attnspec on a CUDA device (issue 9): the catalogue on every bundled target in bfloat16, float16 and
float32, the same at ``--size gpt2`` in bfloat16 and float16, the correct modules of
tests/correct_elsewhere.py and the shipped adapters (false alarms), and the planted bugs of
tests/planted.py (rejections) -- each target through ``attnspec check --device cuda`` as a user runs it.

    python benchmarks/on_cuda.py --out DIR [--parallel 6] [--deadline 420] [--groups bundled,gpt2,correct,planted]
                                 [--gpt2-examples N]

`attnspec check` processes run ``--parallel`` at a time (each with its two workers), each with
``--total-time-limit 120`` (at --size gpt2: 90). No new process starts after ``--deadline`` seconds; those not run are listed as such.
Writes DIR/cuda.json (every target's verdict, its process's wall seconds, failing invariants, n/a's) and prints a
Markdown summary."""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from attnspec.targets import BUNDLED  # noqa: E402

ADAPTERS = [
    *(f"attnspec.adapters.torch:{n}" for n in ("MultiheadAttention", "MultiheadAttentionOneBias", "SDPA", "SDPAMHA",
                                                "TransformerEncoderLayer")),
    *(f"attnspec.adapters.transformers:{n}" for n in ("GPT2Attention", "GPT2AttentionSDPA", "GPT2Block",
                                                       "GPT2BlockSDPA", "LlamaAttention", "LlamaAttentionSDPA")),
]


def jobs(groups, batch=6, gpt2_examples=None):
    """(group, label, argv) for each `attnspec check` to run: one bundled target a process (its time is
    the verdict's), the correct targets ``batch`` a process (as a user checks several), each planted bug alone with the
    invariants its record names (``--only``). ``gpt2_examples``: every invariant at --size gpt2 with that many
    examples (within 240 s), instead of the ci search cut at 90 s."""
    import correct_elsewhere
    import planted

    def batched(group, targets, *args):
        return [(group, " ".join(targets[i:i + batch]), [*targets[i:i + batch], *args])
                for i in range(0, len(targets), batch)]

    out = []
    if "gpt2" in groups:  # the slowest: start them first
        budget = ["--total-time-limit", "90"] if gpt2_examples is None else \
            ["--max-examples", str(gpt2_examples), "--total-time-limit", "240"]
        out += [("gpt2", f"{t} {dt}", [t, "--size", "gpt2", "--dtype", dt, *budget])
                for dt in ("bfloat16", "float16") for t in BUNDLED]
    if "bundled" in groups:
        out += [("bundled", f"{t} {dt}", [t, "--dtype", dt]) for dt in ("bfloat16", "float16", "float32")
                for t in BUNDLED]
    if "correct" in groups:
        correct = [f"{k}=tests/correct_elsewhere.py:{n}" for k, n in correct_elsewhere.MODULES] + ADAPTERS
        for dt in ("bfloat16", "float16"):
            out += batched(f"correct-{dt}", correct, "--dtype", dt)
    if "planted" in groups:  # one process a bug, checking the invariants its record says reject it (as test_planted)
        out += [("planted", f"{p.kind}=tests/planted.py:{p.name}",
                 [f"{p.kind}=tests/planted.py:{p.name}", *(a for i in p.catches for a in ("--only", i))])
                for p in planted.CORPUS]
    return out


DEVICE = "cuda"


def run_one(job, out_dir, index):
    """One `attnspec check` process: a row per target it checked (verdict, failing invariants, n/a's)."""
    group, label, argv = job
    report = out_dir / f"{group}-{index}.json"
    cmd = [sys.executable, "-m", "attnspec", "check", "-q", "--profile", "ci", "--device", DEVICE,
           "--total-time-limit", "120", "--report-json", str(report), *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = round(time.perf_counter() - start, 1)
    try:
        targets = json.loads(report.read_text())["targets"]
    except (OSError, ValueError, KeyError) as e:
        return [dict(group=group, label=label, exit=proc.returncode, seconds=seconds, na=[],
                     failed={"(no report)": repr(e)}, stderr=proc.stderr[-3000:])]
    rows = []
    for t in targets:
        rows.append(dict(group=group, label=f"{t['kind']}={t['target']}", exit=t.get("exit_status"), seconds=seconds,
                         failed={r["invariant"]: f"{r['status']}: {r['reason'][:300]} {r.get('repro', '')}"
                                 for r in t["results"] if r["status"] in ("fail", "internal-error")},
                         na=[r["invariant"] for r in t["results"] if r["status"] == "not-applicable"]))
        if proc.returncode == 4:
            rows[-1]["stderr"] = proc.stderr[-2000:]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--deadline", type=float, default=420)
    ap.add_argument("--groups", default="bundled,gpt2,correct,planted")
    ap.add_argument("--device", default="cuda", help="cpu: try this script without a GPU")
    ap.add_argument("--gpt2-examples", type=int, help="examples per invariant at --size gpt2 (default: the ci "
                    "search, cut after 90 s)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs", flush=True)
    todo, rows, start = jobs(args.groups.split(","), gpt2_examples=args.gpt2_examples), [], time.perf_counter()

    def guarded(i, job):
        if time.perf_counter() - start > args.deadline:
            return [dict(group=job[0], label=job[1], exit=None, seconds=0, failed={}, na=[])]
        out = run_one(job, out_dir, i)
        for row in out:
            print(f"{row['group']:16} {row['label'][:70]:70} exit {row['exit']} {row['seconds']:6.1f} s "
                  f"{' '.join(row['failed'])[:300]}", flush=True)
        return out

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        rows = [row for out in pool.map(lambda a: guarded(*a), enumerate(todo)) for row in out]
    (out_dir / "cuda.json").write_text(json.dumps(rows, indent=1))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group]
        ran = [r for r in mine if r["exit"] is not None]
        exits = {e: sum(r["exit"] == e for r in ran) for e in sorted({r["exit"] for r in ran})}
        secs = sorted(r["seconds"] for r in ran)
        median = secs[len(secs) // 2] if secs else 0
        print(f"## {group}: {len(ran)}/{len(mine)} checked, exits {exits}, median process {median} s")
        for r in ran:
            if (group == "planted") != (r["exit"] == 1) or (r["failed"] and group != "planted"):
                print(f"- {r['label']}: exit {r['exit']} {json.dumps(r['failed'])[:1500]} n/a={r['na']}")
                if r.get("stderr"):
                    print("  stderr: " + r["stderr"][-1200:].replace("\n", "\n  "))


if __name__ == "__main__":
    main()

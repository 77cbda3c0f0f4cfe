#!/usr/bin/env python3
"""Run the limiter benchmarks several times and report tollgate/governor time ratios.

On a shared or noisy machine absolute nanoseconds drift from run to run; the ratio of two
functions measured in the same run is what is comparable. Each run is a full
`cargo bench -p tollgate --bench limiter`; the median of each function's criterion
estimate is read from target/criterion, and the median ratio over the runs is reported.

Usage: scripts/bench_ratios.py [RUNS]   (default 5)
"""
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRITERION = ROOT / "target" / "criterion"

# (label, numerator, denominator, target)
RATIOS = [
    ("single_key: tollgate / governor", "single_key/tollgate", "single_key/governor", 1.0),
    ("keyed: tollgate / governor", "keyed/tollgate", "keyed/governor", 1.2),
    ("two_dimensions: tollgate / governor single_key", "two_dimensions/tollgate", "single_key/governor", 2.0),
    ("contended: tollgate / governor", "contended/tollgate", "contended/governor", None),
    ("keyed: tollgate / governor with foldhash", "keyed/tollgate", "keyed/governor_foldhash", None),
]


def median_ns(bench: str) -> float:
    path = CRITERION / bench / "new" / "estimates.json"
    return json.loads(path.read_text())["median"]["point_estimate"]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    names = sorted({n for _, a, b, _ in RATIOS for n in (a, b)})
    times = {n: [] for n in names}
    for run in range(runs):
        subprocess.run(
            ["cargo", "bench", "-p", "tollgate", "--bench", "limiter", "--", "--noplot"],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )
        for n in names:
            times[n].append(median_ns(n))
        print(f"run {run + 1}/{runs}: " + ", ".join(f"{n} {times[n][-1]:.1f} ns" for n in names), flush=True)
    print()
    print(f"| ratio (median of {runs} runs) | value | runs | target |")
    print("|---|---|---|---|")
    for label, a, b, target in RATIOS:
        per_run = [x / y for x, y in zip(times[a], times[b])]
        med = statistics.median(per_run)
        verdict = "" if target is None else (f"≤ {target} " + ("met" if med <= target else "NOT met"))
        print(f"| {label} | {med:.2f} | {', '.join(f'{r:.2f}' for r in per_run)} | {verdict} |")
    print()
    print("| function | median ns over runs |")
    print("|---|---|")
    for n in names:
        print(f"| {n} | {statistics.median(times[n]):.1f} |")


if __name__ == "__main__":
    main()

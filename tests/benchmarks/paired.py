"""Compare versions of invoicer in alternating rounds: the method behind the README's "x" figures.

    python tests/benchmarks/paired.py --rounds 6 --workers 1,16 --delays 0 before=../old after=.

Each LABEL=CHECKOUT runs ``invoicer bench`` with CHECKOUT/daemon first on PYTHONPATH. Every round runs
each version once, one right after the other, so that all see the same moment of a machine whose speed
drifts. Printed: each version's median rate per grid point, its median ratio to the processor alone
(measured by the same bench run), and for every version after the first the median of its per-round
ratios to the first version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

Rates = dict[tuple[int, float], float]


def bench_once(checkout: Path, args: argparse.Namespace, output: Path) -> tuple[float, Rates]:
    """Run one ``invoicer bench`` from ``checkout``; return the processor alone and the rate per point."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "daemon")}
    result = subprocess.run([sys.executable, "-m", "invoicer", "bench", "--workers", args.workers,
                             "--delays", args.delays, "--seconds", str(args.seconds), "--warmup", "0.6",
                             "--json", str(output)], env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"invoicer bench from {checkout} failed ({result.returncode}):\n{result.stderr}")
    saved = json.loads(output.read_text())
    return saved["processor_alone"], {(p["workers"], p["delay_ms"]): p["rate"] for p in saved["points"]}


def main() -> int:
    """Parse the command line, run the rounds, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", metavar="LABEL=CHECKOUT")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--workers", default="1,16")
    parser.add_argument("--delays", default="0")
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    versions = [(label, Path(path).resolve()) for label, _, path in (v.partition("=") for v in args.versions)]
    runs: dict[str, list[tuple[float, Rates]]] = {label: [] for label, _ in versions}
    with tempfile.TemporaryDirectory(prefix="invoicer-paired-") as directory:
        for round_number in range(1, args.rounds + 1):
            for label, checkout in versions:
                runs[label].append(bench_once(checkout, args, Path(directory) / "bench.json"))
                alone, measured = runs[label][-1]
                shown = ", ".join(f"{w}@{d:g}ms {rate:,.0f}/s" for (w, d), rate in measured.items())
                print(f"round {round_number} {label}: alone {alone:,.0f}/s; {shown}", file=sys.stderr)
    first = versions[0][0]
    for label, _ in versions:
        for point in runs[label][0][1]:
            rates = [measured[point] for _, measured in runs[label]]
            to_alone = statistics.median([measured[point] / alone for alone, measured in runs[label]])
            line = (f"{label} {point[0]} workers {point[1]:g} ms: median {statistics.median(rates):,.0f}/s, "
                    f"{to_alone:.2f} x alone")
            if label != first:
                ratios = [mine[1][point] / theirs[1][point]
                          for mine, theirs in zip(runs[label], runs[first], strict=True)]
                line += (f"; against {first}: median {statistics.median(ratios):.3f} x "
                         f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

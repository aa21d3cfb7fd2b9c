"""Interleaved ``invoicer run`` rounds of several variants: the decomposition in docs/performance.md.

Usage, from a checkout (on a scratch copy with ``orders-decomposition.patch`` applied for the X* switches)::

    PYTHONPATH=daemon:. .venv/bin/python docs/experiments/orders_ab.py 1 0 6 \
        demo orders orders:XCACHE=1 orders:XCACHE=1,XSHARE=1

Arguments: workers, delay in ms, rounds, then variants: a source, optionally followed by ``:`` and
comma-separated environment settings for the daemon. The first variant is the base of the ratios. Each
round runs every variant for 4 s (after 1 s of warm-up), rotating their order; the orders source runs on a
fresh copy of a backlog of 400,000 demo orders made once in ``$TMPDIR/orders-ab``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

from invoicer.bench import measure, processor_alone
from invoicer.orders import demo_order
from invoicer.storage import submit_orders


def main() -> None:
    """Run the rounds and print each round's rates, then each variant's median and ratio to the first."""
    workdir = Path(tempfile.gettempdir(), "orders-ab")
    workdir.mkdir(exist_ok=True)
    backlog = workdir / "backlog.db"
    if not backlog.exists():
        submit_orders(backlog, [json.dumps(demo_order(n)) for n in range(1, 400_001)])
    workers, delay, rounds = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    variants = sys.argv[4:]
    alone = processor_alone(1.0)
    rates: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_number in range(rounds):
        turn = round_number % len(variants)
        for variant in variants[turn:] + variants[:turn]:
            source, _, settings = variant.partition(":")
            extra = {"INVOICER_SOURCE": source}
            extra |= dict(setting.partition("=")[::2] for setting in settings.split(",") if setting)
            database = None
            if source == "orders":
                database = workdir / "point.db"
                shutil.copyfile(backlog, database)
                if "XDROPIDX" in extra:  # the patch's daemon does not create it again
                    with contextlib.closing(sqlite3.connect(database)) as connection:
                        connection.execute("DROP INDEX invoices_order")
            rates[variant].append(measure(workers, delay, seconds=4.0, warmup=1.0, queue_size=1024,
                                          alone=alone, directory=workdir, extra_env=extra,
                                          database=database).rate)
        print(f"round {round_number}: " + "  ".join(f"{v} {rates[v][-1]:,.0f}" for v in variants), flush=True)
    for variant in variants:
        ratios = [rate / base for rate, base in zip(rates[variant], rates[variants[0]], strict=True)]
        print(f"{variant:40s} median {statistics.median(rates[variant]):9,.0f}/s, against {variants[0]}: "
              f"median {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()

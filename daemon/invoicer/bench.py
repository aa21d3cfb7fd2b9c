"""``invoicer bench``: run the real daemon over a grid of worker counts and delays; find the knee.

Each grid point starts ``invoicer run`` (the very code systemd runs) on a fresh temporary database, with a
notification socket the bench listens on. After a warm-up it reads the daemon's own STATUS= lines for a
measuring window: the rate is the growth of the committed total over that window, the queue fill is the
average reported queue depth over its capacity, the CPU is the process's user+system time over the
window (100 % = one core). Then SIGTERM, and the daemon drains as usual.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from invoicer.processing import sample_invoice

STATUS = re.compile(r"STATUS=\w+: (?:[\d,]+ left, )?(\d+) workers, [\d,]+ invoices/s, ([\d,]+) stored, "
                    r"queue ([\d,]+)")
KNEE_GAIN = 1.10  # a step that adds less than 10 % throughput is where it stops rising


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured grid point."""

    workers: int
    delay_ms: float
    rate: float          # committed invoices per second
    ideal: float         # workers / delay, capped by the processor alone in one thread
    efficiency: float    # rate / ideal
    queue_fill: float    # mean queue depth / capacity
    cpu: float           # process CPU, 1.0 = one core


def processor_alone(seconds: float = 1.0) -> float:
    """Invoices per second the built-in processor builds in one thread, with no delay and no pipeline."""
    count = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for number in range(count + 1, count + 1001):
            sample_invoice(number)
        count += 1000
    return count / elapsed


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _parse(message: str) -> tuple[int, int] | None:
    match = STATUS.search(message)
    if not match:
        return None
    return int(match.group(2).replace(",", "")), int(match.group(3).replace(",", ""))


def measure(workers: int, delay_ms: float, *, seconds: float, warmup: float, queue_size: int,
            alone: float, directory: Path, extra_env: dict[str, str] | None = None,
            database: Path | None = None) -> Point:
    """Run the daemon at one grid point and measure it (on ``database`` if given: it is deleted after)."""
    database = database or directory / f"bench-{workers}-{delay_ms:g}.db"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    socket_path = directory / "notify.sock"
    socket_path.unlink(missing_ok=True)
    listener.bind(str(socket_path))
    env = {**os.environ, "INVOICER_SOURCE": "demo", **(extra_env or {}), "NOTIFY_SOCKET": str(socket_path),
           "INVOICER_DATABASE": str(database), "INVOICER_WORKERS": str(workers),
           "INVOICER_PROCESSING_DELAY_MS": f"{delay_ms:g}", "INVOICER_QUEUE_SIZE": str(queue_size),
           "INVOICER_STATUS_INTERVAL": "0.1", "INVOICER_LOG_LEVEL": "WARNING"}
    env.pop("WATCHDOG_USEC", None)
    with (directory / "daemon.log").open("a") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "invoicer", "run"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        listener.settimeout(30)
        samples: list[tuple[float, int, int, float]] = []  # (time, stored, queue depth, cpu seconds)
        started: float | None = None
        while True:
            message = listener.recv(4096).decode("latin-1")
            now = time.monotonic()
            if started is None:
                if "READY=1" in message.split("\n"):
                    started = now
                continue
            parsed = _parse(message)
            if parsed is None or now - started < warmup:
                continue
            samples.append((now, parsed[0], parsed[1], _cpu_seconds(daemon.pid)))
            if now - samples[0][0] >= seconds:
                break
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        listener.close()
        socket_path.unlink(missing_ok=True)
        for suffix in ("", "-wal", "-shm", ".reload-state.json"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
    (t0, stored0, _, cpu0), (t1, stored1, _, cpu1) = samples[0], samples[-1]
    rate = (stored1 - stored0) / (t1 - t0)
    ideal = min(workers / (delay_ms / 1000), alone) if delay_ms > 0 else alone
    fill = sum(depth for _, _, depth, _ in samples) / len(samples) / queue_size
    return Point(workers, delay_ms, rate, ideal, rate / ideal, fill, (cpu1 - cpu0) / (t1 - t0))


def knee(points: Sequence[Point]) -> int | None:
    """Find the worker count beyond which throughput stops rising (None: it rises to the last count)."""
    ordered = sorted(points, key=lambda p: p.workers)
    for here, there in itertools.pairwise(ordered):
        if there.rate < here.rate * KNEE_GAIN:
            return here.workers
    return None


def table(points: Sequence[Point]) -> str:
    """Format the results as an aligned text table."""
    lines = [f"{'workers':>7} {'delay':>8} {'invoices/s':>11} {'ideal':>9} {'efficiency':>10} "
             f"{'queue fill':>10} {'CPU':>6}"]
    for p in points:
        lines.append(f"{p.workers:>7} {p.delay_ms:>6g}ms {p.rate:>11,.0f} {p.ideal:>9,.0f} "
                     f"{p.efficiency:>9.0%} {p.queue_fill:>10.0%} {p.cpu:>6.0%}")
    return "\n".join(lines)


def chart(points: Sequence[Point], path: Path) -> None:
    """Write the PNG of :func:`chart_figure`."""
    chart_figure(points).savefig(path, dpi=120)


def chart_figure(points: Sequence[Point]) -> Any:
    """Draw throughput against workers: one panel per delay, each with its own scale.

    Rates at different delays differ by orders of magnitude (191/s and 43,091/s on one linear axis left
    the slow curve flat at the bottom), so each delay gets a panel, and its ideal is drawn dotted in the
    measured curve's colour. Needs matplotlib.
    """
    import matplotlib  # noqa: PLC0415  # optional: pip install 'invoicer[bench]'

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    delays = sorted({p.delay_ms for p in points})
    figure, panels = pyplot.subplots(1, len(delays), figsize=(4.2 * len(delays) + 0.8, 4.2), squeeze=False)
    for index, (delay, axes) in enumerate(zip(delays, panels[0], strict=True)):
        colour = f"C{index}"
        series = sorted((p for p in points if p.delay_ms == delay), key=lambda p: p.workers)
        axes.plot([p.workers for p in series], [p.rate for p in series], marker="o", color=colour,
                  label="measured")
        axes.plot([p.workers for p in series], [p.ideal for p in series], linestyle=":", color=colour,
                  label="ideal")
        axes.set_xscale("log", base=2)
        axes.set_ylim(bottom=0)
        axes.set_xlabel("INVOICER_WORKERS")
        axes.set_title(f"processing delay {delay:g} ms")
        axes.grid(True, alpha=0.3)
        axes.legend()
    panels[0][0].set_ylabel("committed invoices/s")
    figure.suptitle("invoicer throughput (one panel per delay)")
    figure.tight_layout()
    return figure


def run_bench(workers: Sequence[int], delays: Sequence[float], *, seconds: float, warmup: float,
              queue_size: int, json_path: Path | None, chart_path: Path | None,
              out: TextIO = sys.stdout, progress: TextIO = sys.stderr) -> int:
    """Measure the grid, print the table and the knees, write JSON/PNG if asked; return the exit code."""
    if chart_path is not None:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            print("invoicer bench: --chart needs matplotlib: pip install 'invoicer[bench]'", file=progress)
            return 1
    alone = processor_alone()
    print(f"processor alone, one thread, no delay: {alone:,.0f} invoices/s", file=out)
    grid = [(w, d) for d in delays for w in workers]
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="invoicer-bench-") as directory:
        for number, (count, delay) in enumerate(grid, 1):
            print(f"[{number:>2}/{len(grid)}] {count} workers, {delay:g} ms ...", end="", flush=True,
                  file=progress)
            point = measure(count, delay, seconds=seconds, warmup=warmup, queue_size=queue_size,
                            alone=alone, directory=Path(directory))
            points.append(point)
            print(f" {point.rate:,.0f} invoices/s", file=progress)
    print(table(points), file=out)
    for delay in delays:
        at = knee([p for p in points if p.delay_ms == delay])
        most = max(workers)
        print(f"delay {delay:g} ms: " + (f"beyond {at} workers throughput stops rising" if at is not None
                                          else f"throughput still rising at {most} workers"), file=out)
    if json_path is not None:
        json_path.write_text(json.dumps({"processor_alone": alone,
                                         "points": [dataclasses.asdict(p) for p in points]}, indent=2))
    if chart_path is not None:
        chart(points, chart_path)
    return 0

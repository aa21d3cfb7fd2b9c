"""invoicer bench: the knee, the table, STATUS parsing, and one real tiny run with JSON and a chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from invoicer.bench import Point, _parse, chart_figure, knee, table
from tests.conftest import daemon_env


def point(workers: int, rate: float) -> Point:
    """A grid point with only what the knee looks at."""
    return Point(workers, 5.0, rate, 1.0, 1.0, 0.5, 0.5)


def test_knee_is_where_the_next_step_adds_under_ten_percent() -> None:
    """Throughput 100, 390, 1500, 1560: it stops rising beyond 16 workers."""
    assert knee([point(1, 100), point(4, 390), point(16, 1500), point(64, 1560)]) == 16


def test_no_knee_while_still_rising() -> None:
    """Every step adds more than 10 %: no knee."""
    assert knee([point(1, 100), point(4, 390), point(16, 1500)]) is None


def test_status_lines_parse() -> None:
    """Stored total and queue depth come out of running and draining STATUS lines."""
    assert _parse("READY=1\nSTATUS=running: 8 workers, 1,234 invoices/s, 56,789 stored, queue 1,024") == (
        56789, 1024)
    assert _parse("STATUS=draining: 12 left, 8 workers, 0 invoices/s, 5 stored, queue 0") == (5, 0)
    assert _parse("WATCHDOG=1") is None


def test_table_has_every_column() -> None:
    """The table names workers, delay, invoices/s, ideal, efficiency, queue fill and CPU."""
    text = table([Point(16, 5.0, 3119.4, 3200.0, 0.9748, 1.0, 0.28)])
    assert text.splitlines()[0].split() == ["workers", "delay", "invoices/s", "ideal", "efficiency",
                                            "queue", "fill", "CPU"]
    assert text.splitlines()[1].split() == ["16", "5ms", "3,119", "3,200", "97%", "100%", "28%"]


def test_a_tiny_real_run(tmp_path: Path) -> None:
    """Two short grid points against the real daemon: a table, the knee line, JSON and a PNG."""
    results, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run([sys.executable, "-m", "invoicer", "bench", "--workers", "1,2", "--delays", "1",
                          "--seconds", "0.5", "--warmup", "0.2", "--json", str(results), "--chart",
                          str(chart)], env=daemon_env(tmp_path / "unused.db"), capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "[ 2/2] 2 workers, 1 ms ..." in run.stderr
    assert "delay 1 ms: " in run.stdout
    saved = json.loads(results.read_text())
    assert saved["processor_alone"] > 0
    assert [p["workers"] for p in saved["points"]] == [1, 2]
    assert all(0 < p["rate"] <= p["workers"] / 0.001 * 1.05 for p in saved["points"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_has_a_panel_per_delay_with_each_ideal_in_its_curves_colour() -> None:
    """191/s and 43,091/s on one linear axis hid the slow curve: each delay gets a panel of its own."""
    points = [Point(workers, delay, rate, ideal, rate / ideal, 0.5, 1.0)
              for delay, rates in ((0.0, (43091, 40000, 39000)), (5.0, (191, 3000, 12000)))
              for workers, rate, ideal in zip((1, 16, 64), rates, (45000, 45000, 45000) if delay == 0
                                              else (200, 3200, 12800), strict=True)]
    figure = chart_figure(points)
    panels = figure.get_axes()
    assert [panel.get_title() for panel in panels] == ["processing delay 0 ms", "processing delay 5 ms"]
    for panel in panels:
        measured, ideal = panel.get_lines()
        assert measured.get_color() == ideal.get_color()
        assert ideal.get_linestyle() == ":"
        assert panel.get_xscale() == "log"
    assert panels[0].get_lines()[0].get_color() != panels[1].get_lines()[0].get_color()
    assert max(panels[1].get_lines()[0].get_ydata()) == 12000  # the slow curve fills its own panel

"""Command line: ``invoicer run`` (the unit's ExecStart), ``submit``, the operator commands, ``bench``."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from invoicer import __version__, control, processing
from invoicer.config import (
    KNOWN_VARIABLES,
    LOG_LEVELS,
    ConfigError,
    database_path,
    load_config,
    load_processor,
    operator_environment,
    unknown_variables,
)
from invoicer.daemon import EX_SOFTWARE, Daemon, end_process
from invoicer.logs import configure_logging
from invoicer.storage import StorageError, is_postgresql

WHICH_DATABASE = ("The database: INVOICER_DATABASE, else the one /etc/default/invoicer (or "
                  "INVOICER_ENVIRONMENT_FILE) names, else the service's /var/lib/invoicer/invoices.db where "
                  "that file exists, else ./invoices.db; the configuration is read the same way.")
EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus=78 keeps systemd from retrying


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoicer",
        description="A systemd-native daemon that numbers, processes and stores invoices without gaps.",
        epilog=f"Configuration comes from the environment ({', '.join(KNOWN_VARIABLES)}); see "
               "invoicer(8) and the README. The operator commands (submit, rejected, failed, retry) also "
               "read /etc/default/invoicer, and use the service's database unless INVOICER_DATABASE "
               "names another.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the daemon in the foreground until SIGTERM or SIGINT",
                        description="Run the daemon in the foreground; SIGTERM/SIGINT drain and stop it.")
    reload = commands.add_parser(
        "reload", help="make a running daemon re-read its environment file; return once it has",
        description="Send SIGHUP to PID and wait until it has applied (or refused) the reload. "
                    "The unit's ExecReload.")
    reload.add_argument("pid", type=int, help="the daemon's process id ($MAINPID under systemd)")
    reload.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    submit = commands.add_parser(
        "submit", help="submit orders from a JSON-lines file (- for standard input)",
        description="Check every line of FILE (one JSON order per line; blank lines are skipped) and "
                    "insert them into the orders table in one transaction; safe while the daemon runs. "
                    "A bad line is reported with its number and nothing is inserted (exit 65). "
                    + WHICH_DATABASE)
    submit.add_argument("file", metavar="FILE", nargs="?", default="-",
                        help="JSON lines to submit (default -: standard input)")
    rejected = commands.add_parser(
        "rejected", help="list orders rejected before numbering (id, submitted at, reason)",
        description="List the submitted orders the daemon refused before giving them a number; safe "
                    "while the daemon runs. " + WHICH_DATABASE)
    rejected.add_argument("--json", action="store_true", help="one JSON object per line")
    failed = commands.add_parser(
        "failed", help="list invoices stored as failed (number, attempts, last error)",
        description="List the invoices stored as failed; safe while the daemon runs. " + WHICH_DATABASE)
    failed.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = commands.add_parser(
        "retry", help="process failed invoices again (SQLite: the daemon must be stopped)",
        description="Process failed invoices again with the configured processor; exit 0 if every one "
                    "is now stored ok, 1 if some still fail. " + WHICH_DATABASE)
    retry.add_argument("ids", type=int, nargs="*", metavar="ID", help="only these (default: all failed)")
    bench = commands.add_parser(
        "bench", help="measure throughput over a grid of worker counts and delays",
        description="Run the real daemon (invoicer run) on temporary databases over a grid of "
                    "INVOICER_WORKERS and INVOICER_PROCESSING_DELAY_MS; print invoices/s, ideal, "
                    "efficiency, queue fill and CPU per point, and where throughput stops rising.")
    bench.add_argument("--workers", type=_int_list, default=[1, 4, 16, 64, 128],
                       help="comma-separated worker counts (default 1,4,16,64,128)")
    bench.add_argument("--delays", type=_float_list, default=[0.0, 5.0],
                       help="comma-separated processing delays in ms (default 0,5)")
    bench.add_argument("--seconds", type=float, default=2.0, help="measuring window per point (default 2)")
    bench.add_argument("--warmup", type=float, default=0.5, help="warm-up per point (default 0.5)")
    bench.add_argument("--queue-size", type=int, default=1024, help="INVOICER_QUEUE_SIZE (default 1024)")
    bench.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    bench.add_argument("--chart", type=Path, help="also draw a PNG chart (needs invoicer[bench])")
    return parser


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,4,16")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("expected numbers >= 0, e.g. 0,5")
    return values


def reload(pid: int, timeout: float) -> int:
    """Ask ``pid`` to reload and wait; print the outcome; 0 if applied, 1 otherwise."""
    # Only the path of the reload record is needed here: the daemon itself judges the new values (a bad
    # one is refused there, and reported back through the record).
    try:
        shared = is_postgresql(os.environ.get("INVOICER_DATABASE", "").strip())
        path = control.state_path(os.environ, database_path(os.environ), pid if shared else None)
        record = control.request_reload(pid, path, timeout)
    except (ConfigError, control.ReloadError) as exc:
        print(f"invoicer reload: {exc}", file=sys.stderr)
        return 1
    print(f"invoicer reload: {record.message}")
    return 0


def run() -> int:
    """Validate the configuration, then run the daemon; return the exit code."""
    requested = os.environ.get("INVOICER_LOG_LEVEL", "").strip().upper()
    log = configure_logging(requested if requested in LOG_LEVELS else "INFO")
    for warning in unknown_variables(os.environ):  # before the values are judged: a typo may explain them
        log.warning("%s", warning)
    try:
        config = load_config()
    except ConfigError as exc:
        log.error("configuration error: %s", exc, extra={"exit_code": EX_CONFIG})
        return EX_CONFIG
    processor = load_processor(config.processor)
    processing.set_delay_ms(config.processing_delay_ms)
    tune_gc()
    try:
        code = Daemon(config, processor).run()
    except BaseException as exc:  # whatever escapes the main thread ends the process, loudly
        log.critical("the main thread failed: %s", exc, exc_info=exc, extra={"exit_code": EX_SOFTWARE})
        code = EX_SOFTWARE
    end_process(code)
    return code  # not reached


GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect the young generation every 50,000 net allocations instead of 700; freeze start-up objects.

    Rows wait for their commit in the results queue, so allocations outrun frees and the default
    threshold ran a collection every 700 of them, each walking the rows in flight (docs/performance.md,
    "Figures behind the constants"). Garbage in reference cycles is still collected, in larger steps.
    """
    gc.freeze()  # modules, classes, configuration: never garbage, no need to walk them again
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def maintain(args: argparse.Namespace) -> int:  # noqa: PLR0911  # one return per outcome
    """Run ``submit``, ``failed``, ``rejected`` or ``retry`` with the daemon's configuration.

    Errors are one line on stderr.
    """
    from invoicer import maintenance  # noqa: PLC0415  # only these commands need it

    try:
        env, source = operator_environment(os.environ)
        for warning in unknown_variables(env):
            print(f"invoicer {args.command}: warning: {warning}", file=sys.stderr)
        config = load_config(env)
        configure_logging(config.log_level, stream=sys.stderr)  # stdout carries the command's output
        if args.command == "failed":
            return maintenance.list_failed(config, as_json=args.json)
        if args.command == "rejected":
            return maintenance.list_rejected(config, as_json=args.json)
        if args.command == "submit":
            return maintenance.submit(config, args.file)
        return maintenance.retry_failed(config, args.ids)
    except maintenance.SubmitError as exc:
        print(f"invoicer {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"invoicer {args.command}: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StorageError as exc:
        print(f"invoicer {args.command}: {exc} (the database from {source}; set INVOICER_DATABASE to a file "
              "or a postgresql:// URI to use another)", file=sys.stderr)
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:  # one return per command
    """Entry point of the ``invoicer`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return run()
    if args.command == "reload":
        return reload(args.pid, args.timeout)
    if args.command in ("failed", "retry", "submit", "rejected"):
        return maintain(args)
    if args.command == "bench":
        from invoicer.bench import run_bench  # noqa: PLC0415  # only the bench needs it

        return run_bench(args.workers, args.delays, seconds=args.seconds, warmup=args.warmup,
                         queue_size=args.queue_size, json_path=args.json, chart_path=args.chart)
    parser.print_help(sys.stderr)
    return 2

"""Configuration: one frozen dataclass, built once from the environment and validated in one place.

Every bad value raises :class:`ConfigError` whose message names the variable and what it accepts; the
daemon turns that into one log line and exit code 78 (EX_CONFIG) before it touches the database.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import itertools
import os
import re
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

MAX_WORKERS = 1024
MAX_QUEUE_SIZE = 1_000_000
MAX_PROCESSING_DELAY_MS = 60_000
MAX_STATUS_INTERVAL = 3600.0
MAX_INVOICE_TIMEOUT = 86_400.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SOURCES = ("orders", "demo")
MIN_ORDER_BYTES = 1024
MAX_ORDER_BYTES = 256 * 1024 * 1024
MIN_INFLIGHT_BYTES = 64 * 1024
# A claim reads its payloads in one SQLite value, and SQLite's values end at 1,000,000,000 bytes: the
# budget plus one order of the largest size must stay below that.
MAX_INFLIGHT_BYTES = 512 * 1024 * 1024
BYTE_UNITS = {"": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
              "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}
MIN_LEASE_TIMEOUT = 2.0      # a renewal every third of it must fit a commit's round trips
MAX_LEASE_TIMEOUT = 3600.0
DEFAULT_PROCESSOR = "invoicer.processing:process"
DATABASE_FILENAME = "invoices.db"


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the variable and what it accepts."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The daemon's settings, as read from the environment (see DESIGN §4)."""

    workers: int = 64
    queue_size: int = 1024
    database: Path = Path(DATABASE_FILENAME)
    processor: str = DEFAULT_PROCESSOR
    processing_delay_ms: float = 5.0
    status_interval: float = 1.0
    log_level: str = "INFO"
    consumer_cpu: str = "none"  # "none", "auto" or a CPU number; see resolve_consumer_cpu()
    # Seconds one processor call may run before it is given up. A minute outlasts a slow external call
    # (a tax authority API, a PDF renderer) yet bounds how long a hung one holds an invoice.
    invoice_timeout: float = 60.0
    # Where work comes from: submitted orders, or synthetic demo orders (invoicer.intake).
    source: str = "orders"
    # A submitted order larger than this is rejected before it takes a number.
    order_max_bytes: int = 4 * 1024 * 1024
    # Payload bytes of the orders between claim and commit, at most (one larger order goes alone).
    inflight_bytes: int = 8 * 1024 * 1024
    # A libpq URI when INVOICER_DATABASE names a PostgreSQL database ("" for SQLite, at ``database``).
    postgresql: str = ""
    # Seconds an instance's blocks of numbers stay its own without a renewal (PostgreSQL): after that
    # the other instances take over what it left unstored.
    lease_timeout: float = 10.0
    # Where to write the node exporter's textfile metrics each status tick (None: nowhere).
    metrics_file: Path | None = None

    def summary(self) -> dict[str, Any]:
        """Return the settings as a JSON-friendly dict for the start-up log record."""
        summary = {f.name: str(value) if isinstance(value := getattr(self, f.name), Path) else value
                   for f in dataclasses.fields(self)}
        if self.postgresql:
            summary["database"] = summary["postgresql"] = redact_uri(self.postgresql)
        return summary

    @property
    def database_name(self) -> str:
        """The database as logs may show it: the file, or the URI without its password."""
        return redact_uri(self.postgresql) if self.postgresql else str(self.database)


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; expected {low}..{high}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is out of range; expected {low}..{high}")
    return value


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float,
            *, low_inclusive: bool) -> float:
    raw = env.get(name, "").strip()
    accepted = f"a number {'>=' if low_inclusive else '>'} {low:g} and <= {high:g}"
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; expected {accepted}") from None
    in_range = (value >= low if low_inclusive else value > low) and value <= high
    if not in_range:  # also rejects nan; inf fails the upper bound
        raise ConfigError(f"{name}={raw!r} is out of range; expected {accepted}")
    return value


def _bytes(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    accepted = f"a size from {low:,} to {high:,} bytes, e.g. 4194304 or 4MiB"
    if not raw:
        return default
    digits = raw.rstrip("KMGIBkmgib ")
    unit = raw[len(digits):].strip().upper()
    try:
        value = int(digits, 10) * BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"{name}={raw!r} is not a size; expected {accepted}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is out of range; expected {accepted}")
    return value


def _source(env: Mapping[str, str]) -> str:
    raw = env.get("INVOICER_SOURCE", "").strip()
    if not raw:
        return Config.source
    if raw.lower() not in SOURCES:
        raise ConfigError(f"INVOICER_SOURCE={raw!r} is not a source; expected one of {', '.join(SOURCES)}")
    return raw.lower()


def _log_level(env: Mapping[str, str]) -> str:
    raw = env.get("INVOICER_LOG_LEVEL", "").strip()
    if not raw:
        return "INFO"
    if raw.upper() not in LOG_LEVELS:
        raise ConfigError(f"INVOICER_LOG_LEVEL={raw!r} is not a log level; expected one of "
                          f"{', '.join(LOG_LEVELS)}")
    return raw.upper()


def cpu_list(cpus: Collection[int]) -> str:
    """Write CPU numbers as the kernel does (0-3,8)."""
    spans = []
    # Consecutive CPUs share the difference between the CPU and its position in the sorted list.
    for _, run in itertools.groupby(enumerate(sorted(cpus)), lambda pair: pair[1] - pair[0]):
        numbers = [cpu for _, cpu in run]
        spans.append(str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}")
    return ",".join(spans)


def _consumer_cpu(env: Mapping[str, str], allowed: Collection[int]) -> str:
    raw = env.get("INVOICER_CONSUMER_CPU", "").strip()
    if raw.lower() in ("", "auto", "none"):
        return raw.lower() or "none"
    accepted = f"none, auto, or a CPU this process may use ({cpu_list(allowed)})"
    try:
        cpu = int(raw, 10)
    except ValueError:
        raise ConfigError(f"INVOICER_CONSUMER_CPU={raw!r} is not a CPU number; expected {accepted}") from None
    if cpu not in allowed:
        raise ConfigError(f"INVOICER_CONSUMER_CPU={raw!r} is not a CPU this process may use; "
                          f"expected {accepted}")
    return str(cpu)


def resolve_consumer_cpu(setting: str, allowed: Collection[int]) -> int | None:
    """Return the CPU to pin consumer threads to (None: leave them to the scheduler).

    ``auto`` takes the lowest CPU of ``allowed`` (the process's affinity, which systemd's CPUAffinity=
    sets), or None if that is the only one; ``none`` is None; a number is that CPU.
    """
    if setting == "none":
        return None
    if setting == "auto":
        return min(allowed) if len(allowed) > 1 else None
    return int(setting)


SECRET_KEYS = ("password", "sslpassword")
MIN_SCRUBBED = 4  # shorter secrets are redacted where the URI holds them, not searched for in any text


def uri_secrets(uri: str) -> set[str]:
    """Return the secrets a libpq URI holds (password, sslpassword): as written, decoded and encoded.

    Found generously (the user part up to the first "@", or the last; the query's values; libpq's own
    parse when it parses): redacting too much garbles a line, too little leaks the password.
    """
    found: set[str] = set()
    _, sep, rest = uri.partition("://")
    if sep:
        authority = rest.split("/", 1)[0]
        for userinfo in (authority.partition("@")[0] if "@" in authority else "",
                         rest.rpartition("@")[0]):
            if ":" in userinfo:
                found.add(userinfo.partition(":")[2])
    for piece in re.split(r"[?&]", uri):
        key, equals, value = piece.partition("=")
        if equals and urllib.parse.unquote(key).strip().lower() in SECRET_KEYS:
            found.add(value)
    try:
        from psycopg import conninfo  # noqa: PLC0415  # an optional dependency
        parsed = conninfo.conninfo_to_dict(uri)
    except Exception:  # not parseable (or no psycopg): what was found above is all there is
        parsed = {}
    found.update(str(parsed[key]) for key in SECRET_KEYS if parsed.get(key))
    for secret in list(found):
        decoded = urllib.parse.unquote(secret)
        found.update((decoded, urllib.parse.quote(decoded, safe="")))
    return {secret for secret in found if secret}


def scrub(text: str, uri: str) -> str:
    """Return ``text`` with every secret of ``uri`` in it replaced by ``***``.

    Secrets shorter than MIN_SCRUBBED characters are left: replacing a one-letter password wherever
    that letter occurs would show what it is.
    """
    for secret in sorted(uri_secrets(uri), key=len, reverse=True):
        if len(secret) >= MIN_SCRUBBED:
            text = text.replace(secret, "***")
    return text


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password, wherever the URI holds one, replaced by ``***``."""
    scheme, sep, rest = uri.partition("://")
    if sep:
        authority, slash, tail = rest.partition("/")  # a "/" in a password: scrub() below finds it
        userinfo, at, host = authority.rpartition("@")
        if at and ":" in userinfo:
            authority = f"{userinfo.partition(':')[0]}:***@{host}"
        uri = f"{scheme}{sep}{authority}{slash}{tail}"
    uri = re.sub(r"([?&])([^=&]*)=([^&]*)",
                 lambda m: f"{m[1]}{m[2]}=***" if urllib.parse.unquote(m[2]).strip().lower() in SECRET_KEYS
                 else m[0], uri)
    return scrub(uri, uri)


def postgresql_uri(env: Mapping[str, str]) -> str:
    """Return INVOICER_DATABASE if it is a libpq URI (checked by libpq itself), else ""."""
    from invoicer.storage import is_postgresql  # noqa: PLC0415  # storage imports the backends

    raw = env.get("INVOICER_DATABASE", "").strip()
    if not is_postgresql(raw):
        return ""
    try:
        from psycopg import conninfo  # noqa: PLC0415  # an optional dependency
    except ImportError:
        raise ConfigError("INVOICER_DATABASE names a PostgreSQL database, but psycopg 3 is not installed "
                          "(pip install 'invoicer[postgresql]', or apt install python3-psycopg)") from None
    authority, _, path = raw.partition("://")[2].partition("/")
    if authority.count("@") > 1 or "@" in path.partition("?")[0]:
        # libpq ends the user part at the first "@" and the host at the first "/": a password holding
        # either would be read, in part, as the host or the database name (and shown in its errors).
        raise ConfigError("INVOICER_DATABASE: the URI holds an '@' after the user part (in a password, or "
                          "the database name); expected postgresql://USER:PASSWORD@HOST:PORT/DBNAME with "
                          "'@', '/', ':' and '?' in a password percent-encoded (%40, %2F, %3A, %3F)")
    try:
        parsed = conninfo.conninfo_to_dict(raw)
    except Exception as exc:  # libpq's parser names the problem
        reason = scrub(" ".join(str(exc).split()), raw)
        raise ConfigError(f"INVOICER_DATABASE={redact_uri(raw)!r} is not a valid libpq URI ({reason}); "
                          "expected postgresql://USER@HOST:PORT/DBNAME") from None
    for port in filter(None, str(parsed.get("port") or "").split(",")):
        if not port.isdigit() or not 0 < int(port) < 65536:
            # The value is not quoted: a "/" in a password makes libpq read part of it as the port.
            raise ConfigError(f"INVOICER_DATABASE={redact_uri(raw)!r}: the port is not a TCP port; "
                              "expected 1..65535")
    return raw


def database_path(env: Mapping[str, str]) -> Path:
    """Return the database path the environment names (INVOICER_DATABASE, else the default)."""
    raw = env.get("INVOICER_DATABASE", "")
    if raw.strip() and not raw.strip().startswith(("postgresql://", "postgres://")):
        if "\0" in raw:
            raise ConfigError("INVOICER_DATABASE contains a NUL byte; expected a file path")
        return Path(raw)
    # systemd may pass several colon-separated directories (systemd.exec(5), "RuntimeDirectory=").
    state_directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return Path(state_directory) / DATABASE_FILENAME
    return Path(DATABASE_FILENAME)


def load_processor(spec: str) -> Callable[..., Any]:
    """Import ``module:callable`` and return the callable; raise ConfigError naming what is wrong."""
    accepted = "'module:callable', e.g. invoicer.processing:process"
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"INVOICER_PROCESSOR={spec!r} is malformed; expected {accepted}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of a plugin is a configuration error
        raise ConfigError(f"INVOICER_PROCESSOR={spec!r}: module {module_name!r} does not import "
                          f"({type(exc).__name__}: {exc}); expected {accepted}") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"INVOICER_PROCESSOR={spec!r}: {module_name!r} has no attribute "
                              f"{attribute!r}; expected {accepted}") from None
    if not callable(target):
        raise ConfigError(f"INVOICER_PROCESSOR={spec!r} is not callable; expected {accepted}")
    return target  # type: ignore[no-any-return]


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build and validate the configuration from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    processor = env.get("INVOICER_PROCESSOR", "").strip() or DEFAULT_PROCESSOR
    load_processor(processor)
    return Config(
        workers=_integer(env, "INVOICER_WORKERS", Config.workers, 1, MAX_WORKERS),
        queue_size=_integer(env, "INVOICER_QUEUE_SIZE", Config.queue_size, 1, MAX_QUEUE_SIZE),
        database=database_path(env),
        processor=processor,
        processing_delay_ms=_number(env, "INVOICER_PROCESSING_DELAY_MS", Config.processing_delay_ms,
                                    0, MAX_PROCESSING_DELAY_MS, low_inclusive=True),
        status_interval=_number(env, "INVOICER_STATUS_INTERVAL", Config.status_interval,
                                0, MAX_STATUS_INTERVAL, low_inclusive=False),
        log_level=_log_level(env),
        consumer_cpu=_consumer_cpu(env, os.sched_getaffinity(0)),
        invoice_timeout=_number(env, "INVOICER_INVOICE_TIMEOUT", Config.invoice_timeout, 0,
                                MAX_INVOICE_TIMEOUT, low_inclusive=False),
        source=_source(env),
        order_max_bytes=_bytes(env, "INVOICER_ORDER_MAX_BYTES", Config.order_max_bytes, MIN_ORDER_BYTES,
                               MAX_ORDER_BYTES),
        inflight_bytes=_bytes(env, "INVOICER_INFLIGHT_BYTES", Config.inflight_bytes, MIN_INFLIGHT_BYTES,
                              MAX_INFLIGHT_BYTES),
        postgresql=postgresql_uri(env),
        lease_timeout=_number(env, "INVOICER_LEASE_TIMEOUT", Config.lease_timeout, MIN_LEASE_TIMEOUT,
                              MAX_LEASE_TIMEOUT, low_inclusive=True),
        metrics_file=_metrics_file(env),
    )


def _metrics_file(env: Mapping[str, str]) -> Path | None:
    raw = env.get("INVOICER_METRICS_FILE", "").strip()
    if not raw:
        return None
    path = Path(raw)
    if "\0" in raw or not path.name.endswith(".prom"):
        raise ConfigError(f"INVOICER_METRICS_FILE={raw!r}: expected a file name ending in .prom (the node "
                          "exporter's textfile collector reads only those)")
    if not path.parent.is_dir():
        raise ConfigError(f"INVOICER_METRICS_FILE={raw!r}: directory {path.parent} does not exist; expected "
                          "a file in the node exporter's textfile directory")
    return path


ENVIRONMENT_FILE = Path("/etc/default/invoicer")
# Every variable invoicer reads (the example HTTP processor's two included), for the unknown-name warning.
KNOWN_VARIABLES = (
    "INVOICER_WORKERS", "INVOICER_QUEUE_SIZE", "INVOICER_DATABASE", "INVOICER_PROCESSOR",
    "INVOICER_PROCESSING_DELAY_MS", "INVOICER_STATUS_INTERVAL", "INVOICER_LOG_LEVEL",
    "INVOICER_INVOICE_TIMEOUT", "INVOICER_CONSUMER_CPU", "INVOICER_SOURCE", "INVOICER_ORDER_MAX_BYTES",
    "INVOICER_INFLIGHT_BYTES", "INVOICER_LEASE_TIMEOUT", "INVOICER_ENVIRONMENT_FILE", "INVOICER_HTTP_URL",
    "INVOICER_HTTP_TIMEOUT", "INVOICER_METRICS_FILE",
)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """Say, for each INVOICER_* variable in ``env`` that invoicer does not read, what it may have meant."""
    warnings = []
    for name in sorted(key for key in env if key.startswith("INVOICER_") and key not in KNOWN_VARIABLES):
        if name.startswith("INVOICER_TEST_") or name in TEST_VARIABLES:
            continue
        suffixes = {known.removeprefix("INVOICER_"): known for known in KNOWN_VARIABLES}
        close = difflib.get_close_matches(name.removeprefix("INVOICER_"), list(suffixes), n=1, cutoff=0.75)
        hint = f"; did you mean {suffixes[close[0]]}?" if close else "; see invoicer(8) for the variables"
        warnings.append(f"{name} is not a variable invoicer knows, so it is ignored{hint}")
    return warnings


TEST_VARIABLES = ("INVOICER_FAULT_CYCLES", "INVOICER_BENCH_INVOICES", "INVOICER_POWER_FIGURES")  # tests
RELOADABLE = ("workers", "log_level")


def environment_files(env: Mapping[str, str]) -> list[Path]:
    """Name the files ``reload`` and the operator commands read, in order (a later one wins).

    ``$INVOICER_ENVIRONMENT_FILE``, several separated by ":" (invoicer@.service names the shared file
    and its instance's), or /etc/default/invoicer.
    """
    raw = env.get("INVOICER_ENVIRONMENT_FILE", "").strip()
    return [Path(part) for part in raw.split(":") if part] if raw else [ENVIRONMENT_FILE]


def read_environment_files(paths: Sequence[Path]) -> dict[str, str]:
    """Read each file in order (a missing one is empty); a later file's value wins."""
    values: dict[str, str] = {}
    for path in paths:
        values.update(read_environment_file(path))
    return values


def read_environment_file(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines as systemd's EnvironmentFile= does (comments, quotes); {} if it is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"environment file {path} cannot be read ({exc})") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"environment file {path}, line {number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def changed_settings(old: Config, new: Config) -> list[str]:
    """Names of the settings that differ between two configurations."""
    return [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)]



SERVICE_DATABASE = Path("/var/lib/invoicer") / DATABASE_FILENAME  # StateDirectory=invoicer's


def operator_environment(env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """Return the environment an operator command runs with, and where its database came from.

    The service's environment file (``/etc/default/invoicer``) under the caller's own variables, which
    win; where that file exists (an installed system) and names no database, the service's own
    (``/var/lib/invoicer/invoices.db``): ``invoicer failed`` run by an operator then looks where the
    service writes, not in the current directory.
    """
    paths = environment_files(env)
    names = " and ".join(map(str, paths))
    values = read_environment_files(paths)  # one it cannot read is an error, not silently nothing
    # An empty variable is no setting (as in the unit's EnvironmentFile=): it must not hide the file's.
    merged = {**values, **{k: v for k, v in env.items() if v.strip() or k not in values}}
    if env.get("INVOICER_DATABASE", "").strip():
        return merged, "INVOICER_DATABASE"
    from_file = values.get("INVOICER_DATABASE", "").strip()
    if from_file:
        if not from_file.startswith(("postgresql://", "postgres://")) and not Path(from_file).is_absolute():
            raise ConfigError(f"INVOICER_DATABASE={from_file!r} in {names} is relative: the service resolves "
                              "it against /, this command against its directory; expected an absolute path")
        return merged, f"INVOICER_DATABASE in {names}"
    if any(path.exists() for path in paths):
        merged["INVOICER_DATABASE"] = str(SERVICE_DATABASE)
        return merged, f"the service's state directory, as {names} names no INVOICER_DATABASE"
    return merged, f"the current directory, as neither INVOICER_DATABASE nor {names} names one"

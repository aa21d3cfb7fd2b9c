"""Configuration from the environment: defaults, valid values, and every bad value -> exit 78."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from invoicer.config import (
    DEFAULT_PROCESSOR,
    MAX_WORKERS,
    Config,
    ConfigError,
    cpu_list,
    load_config,
    operator_environment,
    redact_uri,
    resolve_consumer_cpu,
    scrub,
    unknown_variables,
)
from tests.conftest import daemon_env

BAD_VALUES = [
    ("INVOICER_WORKERS", "zero", "0"),
    ("INVOICER_WORKERS", "negative", "-3"),
    ("INVOICER_WORKERS", "not-a-number", "many"),
    ("INVOICER_WORKERS", "float", "2.5"),
    ("INVOICER_WORKERS", "too-many", str(MAX_WORKERS + 1)),
    ("INVOICER_QUEUE_SIZE", "zero", "0"),
    ("INVOICER_QUEUE_SIZE", "not-a-number", "big"),
    ("INVOICER_QUEUE_SIZE", "huge", "10000000000"),
    ("INVOICER_PROCESSING_DELAY_MS", "negative", "-1"),
    ("INVOICER_PROCESSING_DELAY_MS", "not-a-number", "fast"),
    ("INVOICER_PROCESSING_DELAY_MS", "nan", "nan"),
    ("INVOICER_PROCESSING_DELAY_MS", "inf", "inf"),
    ("INVOICER_STATUS_INTERVAL", "zero", "0"),
    ("INVOICER_STATUS_INTERVAL", "negative", "-1"),
    ("INVOICER_STATUS_INTERVAL", "not-a-number", "often"),
    ("INVOICER_LOG_LEVEL", "unknown", "LOUD"),
    ("INVOICER_LOG_LEVEL", "number", "10"),
    ("INVOICER_PROCESSOR", "no-colon", "invoicer.processing.process"),
    ("INVOICER_PROCESSOR", "empty-callable", "invoicer.processing:"),
    ("INVOICER_PROCESSOR", "missing-module", "no_such_module_xyz:process"),
    ("INVOICER_PROCESSOR", "missing-attribute", "invoicer.processing:nothing_here"),
    ("INVOICER_PROCESSOR", "not-callable", "invoicer.processing:CENT"),
    ("INVOICER_PROCESSOR", "import-raises", "tests.plugins.broken_import:process"),
    ("INVOICER_INVOICE_TIMEOUT", "zero", "0"),
    ("INVOICER_INVOICE_TIMEOUT", "negative", "-5"),
    ("INVOICER_INVOICE_TIMEOUT", "not-a-number", "a minute"),
    ("INVOICER_INVOICE_TIMEOUT", "too-long", "86401"),
    ("INVOICER_CONSUMER_CPU", "not-a-number", "first"),
    ("INVOICER_CONSUMER_CPU", "negative", "-1"),
    ("INVOICER_CONSUMER_CPU", "not-allowed", str(max(os.sched_getaffinity(0)) + 1)),
    ("INVOICER_SOURCE", "unknown", "kafka"),
    ("INVOICER_ORDER_MAX_BYTES", "not-a-size", "big"),
    ("INVOICER_ORDER_MAX_BYTES", "unknown-unit", "4TB"),
    ("INVOICER_ORDER_MAX_BYTES", "too-small", "1000"),
    ("INVOICER_ORDER_MAX_BYTES", "too-large", "257MiB"),
    ("INVOICER_INFLIGHT_BYTES", "negative", "-1"),
    ("INVOICER_INFLIGHT_BYTES", "too-small", "63K"),
    ("INVOICER_INFLIGHT_BYTES", "too-large", "65G"),
    ("INVOICER_LEASE_TIMEOUT", "too-short", "1.5"),
    ("INVOICER_LEASE_TIMEOUT", "too-long", "3601"),
    ("INVOICER_LEASE_TIMEOUT", "not-a-number", "ten"),
    ("INVOICER_DATABASE", "bad-uri-option", "postgresql://u@h/db?bogus=1"),
    ("INVOICER_DATABASE", "bad-uri-port", "postgresql://u@h:99999/db"),
]


def test_defaults_work_on_a_fresh_machine() -> None:
    """With no variables set, every setting has its documented default."""
    config = load_config({})
    assert config == Config()
    assert config.database == Path("invoices.db")
    assert config.processor == DEFAULT_PROCESSOR


def test_valid_values_are_taken() -> None:
    """Valid values for every variable end up in the Config, normalised."""
    config = load_config({
        "INVOICER_WORKERS": "8", "INVOICER_QUEUE_SIZE": "100", "INVOICER_DATABASE": "/srv/x.db",
        "INVOICER_PROCESSOR": "tests.plugins.processors:echo", "INVOICER_PROCESSING_DELAY_MS": "0",
        "INVOICER_STATUS_INTERVAL": "0.5", "INVOICER_LOG_LEVEL": "debug",
        "INVOICER_CONSUMER_CPU": f" {max(os.sched_getaffinity(0))} ", "INVOICER_INVOICE_TIMEOUT": "2.5",
        "INVOICER_SOURCE": " Demo ", "INVOICER_ORDER_MAX_BYTES": "8MiB", "INVOICER_INFLIGHT_BYTES": "65536"})
    assert config == Config(workers=8, queue_size=100, database=Path("/srv/x.db"),
                            processor="tests.plugins.processors:echo", processing_delay_ms=0.0,
                            status_interval=0.5, log_level="DEBUG",
                            consumer_cpu=str(max(os.sched_getaffinity(0))), invoice_timeout=2.5,
                            source="demo", order_max_bytes=8 * 1024 * 1024, inflight_bytes=65536)


@pytest.mark.parametrize(("value", "size"), [
    ("4194304", 4 * 1024**2), ("4MiB", 4 * 1024**2), ("4 mb", 4 * 1024**2), ("64k", 64 * 1024),
    ("512M", 512 * 1024**2), ("", 8 * 1024**2)], ids=["bytes", "MiB", "spaced-lower", "k", "M", "empty"])
def test_sizes_take_binary_units(value: str, size: int) -> None:
    """Sizes are bytes or K, M, G (KB, KiB, ...: all powers of 1024) in any case; empty is the default."""
    assert load_config({"INVOICER_INFLIGHT_BYTES": value}).inflight_bytes == size


def test_a_postgresql_uri_is_kept_as_given_and_shown_without_its_password() -> None:
    """A libpq URI selects PostgreSQL, unchanged (the socket form too); summaries redact the password."""
    pytest.importorskip("psycopg")
    socket_form = "postgresql:///invoices?host=/run/postgresql&port=5433"
    assert load_config({"INVOICER_DATABASE": socket_form}).postgresql == socket_form
    config = load_config({"INVOICER_DATABASE": "postgresql://inv:p%40ss:w0rd@db.example:5432/invoices"
                                               "?sslmode=require", "INVOICER_LEASE_TIMEOUT": "2"})
    assert config.postgresql.startswith("postgresql://inv:p%40ss:w0rd@")
    assert config.lease_timeout == 2.0
    assert config.summary()["database"] == "postgresql://inv:***@db.example:5432/invoices?sslmode=require"
    assert "w0rd" not in json.dumps(config.summary())
    assert redact_uri("postgresql://u@h/db?password=secret&x=1") == "postgresql://u@h/db?password=***&x=1"


@pytest.mark.parametrize("uri", [
    "postgresql://inv:Top?Secret42@db.example/invoices",  # libpq: a "?" before the "@" is in the password
    "postgresql://inv:Top%3FSecret42@db.example/invoices",  # the same, percent-encoded
    "postgresql://inv@db.example/invoices?password=Top%3FSecret42&sslmode=require",
    "postgresql://inv@db.example/invoices?sslpassword=Top?Secret42",
    "postgresql://inv@db.example/invoices?pass%77ord=Top?Secret42",
])
def test_a_password_is_redacted_however_the_uri_carries_it(uri: str) -> None:
    """Every spelling of the password: in the user part, in the query, percent-encoded or not."""
    for text in (redact_uri(uri), scrub(f"could not connect with {uri} (password Top?Secret42)", uri)):
        assert "Secret42" not in text
    assert redact_uri(uri).startswith("postgresql://inv")


def test_an_unknown_variable_is_named_with_the_closest_known_one() -> None:
    """A misspelt INVOICER_ variable is not silently ignored: the warning names what it may have meant."""
    warnings = unknown_variables({"INVOICER_WORKER": "8", "INVOICER_WORKERS": "4", "INVOICER_QUEUESIZE": "9",
                                  "INVOICER_COLOUR": "blue", "PATH": "/bin", "INVOICER_FAULT_CYCLES": "3"})
    ignored = "is not a variable invoicer knows, so it is ignored;"
    assert warnings == [f"INVOICER_COLOUR {ignored} see invoicer(8) for the variables",
                        f"INVOICER_QUEUESIZE {ignored} did you mean INVOICER_QUEUE_SIZE?",
                        f"INVOICER_WORKER {ignored} did you mean INVOICER_WORKERS?"]


def test_the_daemon_warns_of_an_unknown_variable_at_start(tmp_path: Path) -> None:
    env = daemon_env(tmp_path / "x.db", INVOICER_WORKER="8", INVOICER_WORKERS="oops")
    result = subprocess.run([sys.executable, "-m", "invoicer", "run"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 78  # the bad value still ends it, after the warning
    assert "INVOICER_WORKER is not a variable invoicer knows" in result.stdout + result.stderr
    assert "did you mean INVOICER_WORKERS?" in result.stdout + result.stderr


def test_operator_commands_look_where_the_installed_service_writes(tmp_path: Path) -> None:
    """The service's environment file under the caller's variables; its state directory by default."""
    environment = tmp_path / "invoicer"
    base = {"INVOICER_ENVIRONMENT_FILE": str(environment)}
    assert operator_environment(base)[0].get("INVOICER_DATABASE") is None  # no file: the current directory
    environment.write_text("INVOICER_WORKERS=3\n")
    merged, source = operator_environment(base)
    assert merged["INVOICER_DATABASE"] == "/var/lib/invoicer/invoices.db"
    assert source == f"the service's state directory, as {environment} names no INVOICER_DATABASE"
    environment.write_text("INVOICER_DATABASE=/srv/billing.db\nINVOICER_PROCESSOR=tests.plugins.processors:echo\n")
    merged, source = operator_environment(base)
    assert (merged["INVOICER_DATABASE"], source) == ("/srv/billing.db", f"INVOICER_DATABASE in {environment}")
    assert load_config(merged).processor == "tests.plugins.processors:echo"  # submit checks as the service
    merged, source = operator_environment({**base, "INVOICER_DATABASE": "/tmp/mine.db"})
    assert (merged["INVOICER_DATABASE"], source) == ("/tmp/mine.db", "INVOICER_DATABASE")


def test_the_operator_environment_refuses_what_would_mislead(tmp_path: Path) -> None:
    """An unreadable file, a relative database path in it, an empty variable hiding the file's value."""
    environment = tmp_path / "invoicer"
    base = {"INVOICER_ENVIRONMENT_FILE": str(environment)}
    environment.write_text("export INVOICER_WORKERS=4\n")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        operator_environment(base)
    environment.write_text("INVOICER_DATABASE=billing.db\n")
    with pytest.raises(ConfigError, match="is relative: the service resolves it against /"):
        operator_environment(base)
    environment.write_text("INVOICER_DATABASE=/srv/billing.db\n")
    merged, _ = operator_environment({**base, "INVOICER_DATABASE": ""})
    assert merged["INVOICER_DATABASE"] == "/srv/billing.db"


def test_several_environment_files_are_read_in_order(tmp_path: Path) -> None:
    """invoicer@.service: the shared file, then the instance's, which wins."""
    shared, instance = tmp_path / "invoicer", tmp_path / "invoicer-2"
    shared.write_text("INVOICER_WORKERS=4\nINVOICER_DATABASE=/srv/billing.db\n")
    instance.write_text("INVOICER_WORKERS=9\n")
    merged, source = operator_environment({"INVOICER_ENVIRONMENT_FILE": f"{shared}:{instance}"})
    assert (merged["INVOICER_WORKERS"], merged["INVOICER_DATABASE"]) == ("9", "/srv/billing.db")
    assert source == f"INVOICER_DATABASE in {shared} and {instance}"


def test_a_missing_database_says_where_it_looked_and_how_to_point_elsewhere(tmp_path: Path) -> None:
    environment = tmp_path / "invoicer"
    environment.write_text(f"INVOICER_DATABASE={tmp_path / 'gone.db'}\n")
    env = {k: v for k, v in daemon_env(tmp_path / "unused.db").items() if k != "INVOICER_DATABASE"}
    env["INVOICER_ENVIRONMENT_FILE"] = str(environment)
    result = subprocess.run([sys.executable, "-m", "invoicer", "failed"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 74
    assert result.stderr.strip() == (
        f"invoicer failed: database {tmp_path / 'gone.db'} does not exist (the database from "
        f"INVOICER_DATABASE in {environment}; set INVOICER_DATABASE to a file or a postgresql:// URI to use "
        "another)")


def test_a_size_in_g_is_read_and_judged_by_its_range() -> None:
    """1G is a size (1,073,741,824 bytes), above what a claim can read in one SQLite value."""
    with pytest.raises(ConfigError, match="INVOICER_INFLIGHT_BYTES='1G' is out of range"):
        load_config({"INVOICER_INFLIGHT_BYTES": "1G"})


def test_a_processor_that_is_not_callable_is_named_so() -> None:
    """An attribute that exists but cannot be called is refused as such, not as a missing one."""
    with pytest.raises(ConfigError, match=r"^INVOICER_PROCESSOR='invoicer.processing:CENT' is not callable"):
        load_config({"INVOICER_PROCESSOR": "invoicer.processing:CENT"})


@pytest.mark.parametrize(("value", "setting"), [("AUTO", "auto"), ("None", "none"), ("", "none")])
def test_consumer_cpu_words_are_normalised(value: str, setting: str) -> None:
    """INVOICER_CONSUMER_CPU takes auto and none in any case; empty means none (no pinning)."""
    assert load_config({"INVOICER_CONSUMER_CPU": value}).consumer_cpu == setting


@pytest.mark.parametrize(("setting", "allowed", "cpu"), [
    ("auto", {2, 3, 5}, 2), ("auto", {7}, None), ("none", {0, 1}, None), ("3", {1, 3}, 3)])
def test_consumer_cpu_resolves_against_the_allowed_cpus(setting: str, allowed: set[int],
                                                        cpu: int | None) -> None:
    """Setting auto pins to the lowest allowed CPU unless it is the only one; none never pins."""
    assert resolve_consumer_cpu(setting, allowed) == cpu


def test_a_cpu_outside_the_affinity_names_the_allowed_ones() -> None:
    """The refusal lists the CPUs the process may use, as the kernel writes them."""
    allowed = os.sched_getaffinity(0)
    with pytest.raises(ConfigError, match="is not a CPU this process may use") as caught:
        load_config({"INVOICER_CONSUMER_CPU": str(max(allowed) + 1)})
    assert f"({cpu_list(allowed)})" in str(caught.value)


@pytest.mark.parametrize(("cpus", "text"), [({5}, "5"), ({0, 1, 2, 3, 8}, "0-3,8"), ({4, 0, 2}, "0,2,4"),
                                            ({1, 2, 6, 7}, "1-2,6-7")])
def test_cpu_lists_are_written_as_the_kernel_writes_them(cpus: set[int], text: str) -> None:
    """CPU sets read like /sys/devices/system/cpu/online: ranges joined by commas."""
    assert cpu_list(cpus) == text


def test_state_directory_holds_the_default_database() -> None:
    """Under systemd the default database is $STATE_DIRECTORY/invoices.db (first of several dirs)."""
    config = load_config({"STATE_DIRECTORY": "/var/lib/invoicer:/var/lib/other"})
    assert config.database == Path("/var/lib/invoicer/invoices.db")


@pytest.mark.parametrize(("variable", "value"), [(v, x) for v, _, x in BAD_VALUES],
                         ids=[f"{v}-{case}" for v, case, _ in BAD_VALUES])
def test_bad_value_is_refused_naming_the_variable(variable: str, value: str) -> None:
    """Each bad value raises ConfigError whose message names the variable and what it accepts."""
    with pytest.raises(ConfigError) as caught:
        load_config({variable: value})
    message = str(caught.value)
    assert message.startswith(variable)
    assert "expected" in message
    assert "\n" not in message


@pytest.mark.parametrize(("variable", "value"), [(v, x) for v, _, x in BAD_VALUES],
                         ids=[f"{v}-{case}" for v, case, _ in BAD_VALUES])
def test_daemon_exits_78_without_creating_a_database(tmp_path: Path, variable: str, value: str) -> None:
    """``invoicer run`` with a bad value prints one JSON error line naming it, exits 78, creates no file."""
    database = tmp_path / "invoices.db"
    env = daemon_env(database, **{variable: value})
    result = subprocess.run([sys.executable, "-m", "invoicer", "run"], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 78
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "ERROR"
    assert variable in record["message"]
    assert list(tmp_path.iterdir()) == []

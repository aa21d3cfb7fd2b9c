"""The example HTTP processor against a real HTTP service on 127.0.0.1, and under a real ``invoicer run``."""

from __future__ import annotations

import email.utils
import importlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from invoicer.orders import check_order
from invoicer.processing import (
    InvoiceRequest,
    ServiceUnavailableError,
    demo_request,
    order_checker,
    sample_invoice,
)
from tests.conftest import DAEMON_SRC, Daemon, assert_gap_free, require
from tests.http_service import CLOSE, HOLD, Answer, InvoiceService, keys

if TYPE_CHECKING:
    from invoicer.examples.http import HttpSettings, InvoicePoster

MODULE = "invoicer.examples.http"
PROCESSOR = f"{MODULE}:process"
ERROR_PREFIX = "POST http://127.0.0.1:"


@pytest.fixture
def service() -> Iterator[InvoiceService]:
    """A running HTTP service on 127.0.0.1 that records requests; stopped afterwards."""
    server = InvoiceService().start()
    yield server
    server.stop()


@pytest.fixture
def example(service: InvoiceService, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The module, imported afresh with INVOICER_HTTP_URL naming the service (it reads it at import)."""
    monkeypatch.setenv("INVOICER_HTTP_URL", service.url)
    monkeypatch.setenv("INVOICER_HTTP_TIMEOUT", "0.2")
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return importlib.import_module(MODULE)


@pytest.fixture
def waits() -> list[float]:
    """The waits a poster asked for, in seconds (it is given ``waits.append`` as its sleep)."""
    return []


@pytest.fixture
def poster(example: ModuleType, service: InvoiceService, waits: list[float]) -> InvoicePoster:
    """A poster for the service with a 0.2 s timeout that records its waits instead of sleeping."""
    settings: HttpSettings = example.HttpSettings(service.url, 0.2)
    made: InvoicePoster = example.InvoicePoster(settings, sleep=waits.append, jitter=lambda: 1.0)
    return made


def test_success_posts_the_document_with_its_headers(example: ModuleType, service: InvoiceService) -> None:
    """A 2xx answer returns the invoice as built; the request carried its document, JSON type and key."""
    invoice = example.process(demo_request(42))
    assert invoice == sample_invoice(42)
    [request] = service.recorded()
    assert request.path == "/invoices"
    assert request.headers["Content-Type"] == "application/json"
    assert request.key == "42"
    assert request.body == invoice.document.encode()


def test_posts_the_invoice_of_the_order_it_receives(example: ModuleType, service: InvoiceService) -> None:
    """The invoice posted and returned is the request's order's, under the request's number."""
    order = check_order('{"customer": "Initech Ltd", "currency": "USD", "lines": [{"description": "Audit",'
                        ' "quantity": 1, "unit_price": "1450.00", "tax_rate": "0.07"}]}', max_bytes=4096)
    invoice = example.process(InvoiceRequest(43, 12, order))
    assert (invoice.id, invoice.customer, invoice.currency, str(invoice.total)) == (
        43, "Initech Ltd", "USD", "1551.50")
    [request] = service.recorded()
    assert (request.key, request.body) == ("43", invoice.document.encode())


def test_takes_the_built_in_order_format(example: ModuleType) -> None:
    """Orders for the example are checked as the built-in processor's: invoicer.orders.check_order."""
    assert order_checker(example.process) is check_order


RETRIED = {
    "503": [Answer(503)],
    "502": [Answer(502)],
    "504": [Answer(504)],
    "408": [Answer(408)],
    "429-without-retry-after": [Answer(429)],
    "timeout": [HOLD],
    "closed-without-answer": [CLOSE],
    "503-then-timeout": [Answer(503), HOLD],
}


@pytest.mark.parametrize("failures", RETRIED.values(), ids=RETRIED.keys())
def test_retries_what_is_safe_with_the_same_key(poster: InvoicePoster, service: InvoiceService,
                                                waits: list[float], failures: list[Answer]) -> None:
    """Transient failures are retried after a doubling backoff, every time with the same key and document."""
    service.script(*failures)
    poster.post(sample_invoice(7))
    requests = service.recorded()
    assert keys(requests) == ["7"] * (len(failures) + 1)
    assert {request.body for request in requests} == {sample_invoice(7).document.encode()}
    assert waits == [0.25, 0.5][:len(failures)]


def http_date(seconds_from_now: float) -> str:
    """An HTTP date (IMF-fixdate) ``seconds_from_now`` seconds ahead."""
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


RETRY_AFTER: dict[str, tuple[Callable[[], str], float]] = {
    "seconds": (lambda: "2", 2.0),
    "zero": (lambda: "0", 0.0),
    "capped": (lambda: "3600", 5.0),
    "http-date": (lambda: http_date(3), 3.0),
    "date-in-the-past": (lambda: http_date(-60), 0.0),
    "unreadable-falls-back-to-backoff": (lambda: "soon", 0.25),
}


@pytest.mark.parametrize(("retry_after", "expected"), RETRY_AFTER.values(), ids=RETRY_AFTER.keys())
def test_429_waits_as_retry_after_asks(poster: InvoicePoster, service: InvoiceService, waits: list[float],
                                       retry_after: Callable[[], str], expected: float) -> None:
    """A 429 is retried after its Retry-After (seconds or a date), at most RETRY_AFTER_CAP_S."""
    service.script(Answer(429, headers=(("Retry-After", retry_after()),)))
    poster.post(sample_invoice(3))
    assert keys(service.recorded()) == ["3", "3"]
    assert waits == [pytest.approx(expected, abs=1.0)]  # an HTTP date has whole seconds


REFUSED = {
    "400": Answer(400, body='{"error": "customer\\nmissing"}'),
    "401": Answer(401, body="unauthorized"),
    "404": Answer(404, body="no such path"),
    "409": Answer(409, body="conflict"),
    "422": Answer(422, body="x" * 1000),
    "500": Answer(500, body="boom"),
    "301": Answer(301, body="moved", headers=(("Location", "/elsewhere"),)),
}


@pytest.mark.parametrize("answer", REFUSED.values(), ids=REFUSED.keys())
def test_other_answers_raise_at_once_naming_the_status(example: ModuleType, poster: InvoicePoster,
                                                       service: InvoiceService, waits: list[float],
                                                       answer: Answer) -> None:
    """Other non-2xx answers raise at once, one line naming the status and the start of the body."""
    service.script(answer)
    with pytest.raises(example.HTTPStatusError) as raised:
        poster.post(sample_invoice(5))
    message = str(raised.value)
    assert message.startswith(f"POST {service.url}: HTTP {answer.status} ")
    assert "\n" not in message
    assert answer.body.split("\\n")[0][:50] in message
    assert len(message) < 400  # the body is cut short
    assert len(service.recorded()) == 1
    assert waits == []


def test_a_status_still_failing_after_the_retries_raises(example: ModuleType, poster: InvoicePoster,
                                                         service: InvoiceService, waits: list[float]) -> None:
    """Three 503s in a row: three requests with one key, two waits, then ServiceUnavailableError."""
    service.script(Answer(503, body="down"), Answer(503, body="down"), Answer(503, body="still down"))
    with pytest.raises(ServiceUnavailableError, match=r": HTTP 503 Service Unavailable: 'still down'$"):
        poster.post(sample_invoice(9))
    assert keys(service.recorded()) == ["9", "9", "9"]
    assert waits == [0.25, 0.5]


def test_connection_refused_is_retried_then_raised(example: ModuleType, service: InvoiceService,
                                                   waits: list[float]) -> None:
    """With nothing listening, the call tries three times and raises ConnectionError, one line."""
    service.stop()
    poster = example.InvoicePoster(example.HttpSettings(service.url, 0.2), sleep=waits.append,
                                   jitter=lambda: 0.0)
    with pytest.raises(ConnectionError) as raised:
        poster.post(sample_invoice(1))
    assert type(raised.value) is ConnectionError
    assert str(raised.value) == f"POST {service.url}: [Errno 111] Connection refused"
    assert waits == [0.125, 0.25]  # the backoff with the least jitter: half of 0.25 s, then of 0.5 s


def test_a_service_that_never_answers_times_out(example: ModuleType, poster: InvoicePoster,
                                                service: InvoiceService, waits: list[float]) -> None:
    """Requests that are read but never answered time out after INVOICER_HTTP_TIMEOUT, are retried, raise."""
    service.script(HOLD, HOLD, HOLD)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        poster.post(sample_invoice(11))
    elapsed = time.monotonic() - started
    assert str(raised.value) == f"POST {service.url}: no answer within 0.2 s (INVOICER_HTTP_TIMEOUT)"
    assert keys(service.recorded()) == ["11", "11", "11"]
    assert 0.6 <= elapsed < 2.0  # three timeouts of 0.2 s, no real backoff
    assert waits == [0.25, 0.5]


def test_a_connect_that_times_out_names_ip_address_allow(example: ModuleType, waits: list[float]) -> None:
    """A connect that times out (as IPAddressDeny= makes it) is retried, then names IPAddressAllow=."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # one pending connection fills the backlog; the kernel drops further SYNs
        filler.connect(listener.getsockname())
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/invoices"
        poster = example.InvoicePoster(example.HttpSettings(url, 0.2), sleep=waits.append)
        with pytest.raises(TimeoutError) as raised:
            poster.post(sample_invoice(4))
    assert str(raised.value) == (
        f"POST {url}: could not connect within 0.2 s (INVOICER_HTTP_TIMEOUT); the service is down or "
        "unreachable, or IPAddressAllow= in this service's network drop-in does not list its address, "
        "see README")
    assert len(waits) == 2


def test_many_threads_post_at_once(example: ModuleType, service: InvoiceService) -> None:
    """Sixteen threads calling process() together: each invoice arrives once, with its own key."""
    results: dict[int, object] = {}

    def work(first: int) -> None:
        for number in range(first, first + 4):
            results[number] = example.process(demo_request(number))

    threads = [threading.Thread(target=work, args=(1 + 4 * i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {number: sample_invoice(number) for number in range(1, 65)}
    assert sorted(keys(service.recorded()), key=lambda key: int(key or 0)) == [str(n) for n in range(1, 65)]


def test_a_closed_network_names_the_drop_in() -> None:
    """In a network namespace with no route (PrivateNetwork=), the error says so and names the drop-in."""
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "unshare --net needs root")
    script = (f"import {MODULE} as m\nfrom invoicer.processing import demo_request\n"
              "try:\n    m.process(demo_request(1))\n"
              "except Exception as e:\n    print(f'{type(e).__name__}: {e}')\n")
    env = {**os.environ, "PYTHONPATH": str(DAEMON_SRC), "INVOICER_HTTP_URL": "http://192.0.2.1:8080/invoices"}
    result = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout == (
        "NetworkClosedError: POST http://192.0.2.1:8080/invoices: [Errno 101] Network is unreachable: "
        "the network is closed to this service (PrivateNetwork=); install "
        "/usr/share/doc/invoicer/examples/network.conf as a drop-in, with the service's address in "
        "IPAddressAllow=, see README\n")


def unused_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SETTINGS = {
    "default-timeout": ({"INVOICER_HTTP_URL": "http://tax.example/api"}, 10.0),
    "https-with-port-and-query": ({"INVOICER_HTTP_URL": "https://tax.example:8443/v1/invoices?x=1",
                                   "INVOICER_HTTP_TIMEOUT": "2.5"}, 2.5),
    "padded": ({"INVOICER_HTTP_URL": " http://10.0.0.5/ ", "INVOICER_HTTP_TIMEOUT": " 600 "}, 600.0),
}


@pytest.mark.parametrize(("env", "timeout"), SETTINGS.values(), ids=SETTINGS.keys())
def test_settings_accepted(example: ModuleType, env: dict[str, str], timeout: float) -> None:
    """Good values are read as given, and the timeout defaults to 10 s."""
    settings = example.settings_from_env(env)
    assert settings.url == env["INVOICER_HTTP_URL"].strip()
    assert settings.timeout == timeout


BAD_SETTINGS = {
    "missing": ({}, "INVOICER_HTTP_URL is not set"),
    "empty": ({"INVOICER_HTTP_URL": "  "}, "INVOICER_HTTP_URL is not set"),
    "ftp": ({"INVOICER_HTTP_URL": "ftp://tax.example/"}, "INVOICER_HTTP_URL='ftp://tax.example/'"),
    "no-scheme": ({"INVOICER_HTTP_URL": "tax.example/api"}, "INVOICER_HTTP_URL='tax.example/api'"),
    "no-host": ({"INVOICER_HTTP_URL": "http:///invoices"}, "INVOICER_HTTP_URL='http:///invoices'"),
    "bad-port": ({"INVOICER_HTTP_URL": "http://tax.example:99999/"}, "is not a URL"),
    "credentials": ({"INVOICER_HTTP_URL": "https://me:secret@tax.example/"}, "carries credentials"),
    "timeout-word": ({"INVOICER_HTTP_URL": "http://h/", "INVOICER_HTTP_TIMEOUT": "soon"},
                     "INVOICER_HTTP_TIMEOUT='soon' is not a number"),
    "timeout-zero": ({"INVOICER_HTTP_URL": "http://h/", "INVOICER_HTTP_TIMEOUT": "0"},
                     "INVOICER_HTTP_TIMEOUT='0' is out of range"),
    "timeout-nan": ({"INVOICER_HTTP_URL": "http://h/", "INVOICER_HTTP_TIMEOUT": "nan"},
                    "INVOICER_HTTP_TIMEOUT='nan' is out of range"),
    "timeout-too-long": ({"INVOICER_HTTP_URL": "http://h/", "INVOICER_HTTP_TIMEOUT": "601"},
                         "INVOICER_HTTP_TIMEOUT='601' is out of range"),
}


@pytest.mark.parametrize(("env", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_settings_raise_value_error_naming_the_variable(example: ModuleType, env: dict[str, str],
                                                            message: str) -> None:
    """A missing or unusable URL or timeout raises ValueError naming the variable and what it accepts."""
    with pytest.raises(ValueError, match="INVOICER_HTTP_") as raised:
        example.settings_from_env(env)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


DAEMON_BAD_SETTINGS = {
    "url-missing": ({}, "INVOICER_HTTP_URL is not set"),
    "url-not-http": ({"INVOICER_HTTP_URL": "ftp://tax.example/"}, "INVOICER_HTTP_URL='ftp://tax.example/'"),
    "timeout-bad": ({"INVOICER_HTTP_URL": "http://127.0.0.1:9/", "INVOICER_HTTP_TIMEOUT": "-1"},
                    "INVOICER_HTTP_TIMEOUT='-1' is out of range"),
}


@pytest.mark.parametrize(("env", "message"), DAEMON_BAD_SETTINGS.values(), ids=DAEMON_BAD_SETTINGS.keys())
def test_daemon_with_bad_settings_exits_78(start_daemon: Callable[..., Daemon], tmp_path: Path,
                                           env: dict[str, str], message: str) -> None:
    """A real ``invoicer run`` with a bad INVOICER_HTTP_* exits 78 with one JSON line naming the variable."""
    daemon = start_daemon(tmp_path / "invoices.db", INVOICER_PROCESSOR=PROCESSOR, **env)
    code, output = daemon.wait(30)
    assert code == 78
    [line] = output.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["message"].startswith("configuration error: INVOICER_PROCESSOR=")
    assert message in record["message"]
    assert not (tmp_path / "invoices.db").exists()


def test_daemon_posts_every_invoice_with_its_key(start_daemon: Callable[..., Daemon], tmp_path: Path,
                                                 service: InvoiceService) -> None:
    """A real ``invoicer run`` with the processor stores gap-free, and every number was POSTed as its key."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_PROCESSOR=PROCESSOR, INVOICER_HTTP_URL=service.url,
                          INVOICER_HTTP_TIMEOUT="2", INVOICER_WORKERS="8", INVOICER_QUEUE_SIZE="64")
    daemon.wait_ready()
    daemon.wait_stored(200)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait(30)
    assert code == 0, output
    facts = assert_gap_free(database)
    assert facts.failed == 0
    with sqlite3.connect(database) as connection:
        stored = dict(connection.execute("SELECT id, document FROM invoices"))
    connection.close()
    posted = {int(request.key or 0): request.body.decode() for request in service.recorded()}
    assert len(service.recorded()) == len(posted)  # no number posted twice
    assert posted == stored


def test_unused_port_is_refused(example: ModuleType, waits: list[float]) -> None:
    """A URL whose port nobody listens on gives the operator's one-line ConnectionError."""
    url = f"http://127.0.0.1:{unused_port()}/invoices"
    poster = example.InvoicePoster(example.HttpSettings(url, 0.2), sleep=waits.append)
    with pytest.raises(ConnectionError, match=r"^POST http://127\.0\.0\.1:\d+/invoices: \[Errno 111\] "
                                              r"Connection refused$"):
        poster.post(sample_invoice(2))
    assert len(waits) == 2

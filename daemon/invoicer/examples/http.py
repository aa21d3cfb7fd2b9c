"""An example processor that posts each invoice to an HTTP service (a tax authority API, an ERP).

``INVOICER_PROCESSOR=invoicer.examples.http:process`` builds the invoice of the order it receives as the
built-in processor does (:func:`invoicer.processing.build_invoice`), POSTs its JSON document to
``INVOICER_HTTP_URL`` and returns the invoice once the service answered 2xx. Settings, read once when
the module is imported (a bad value raises ``ValueError`` naming the variable, which the daemon
reports as a configuration error, exit 78):

- ``INVOICER_HTTP_URL``: ``http://`` or ``https://`` URL with a host, required;
- ``INVOICER_HTTP_TIMEOUT``: seconds a request may wait to connect, and then for each read of the
  answer (default 10).

**A processor must be idempotent on the invoice number.** The daemon may call it again for a number it
already called it for: after a processor error (the pool retries), after a crash or a kill (recovery
processes every number that was not committed, including ones whose POST had arrived), and on
``invoicer retry``. This module also repeats a request itself after a timeout, where the first one may
well have been received. Every request for invoice N therefore carries ``Idempotency-Key: N`` and the same
document (it is built deterministically from N and its order), so a service that honours the header
(draft-ietf-httpapi-idempotency-key-header) records the invoice once and answers repeats with the first
result. Against a service that ignores the header, a repeat can register an invoice twice.

What is retried within one call, ATTEMPTS requests in all: connection refused or reset, a timeout, and the
answers 408, 429, 502, 503 and 504, after a backoff of BACKOFF_S doubling (with jitter, so many workers do
not come back at once) or the answer's ``Retry-After`` (at most RETRY_AFTER_CAP_S). Anything else raises
at once: other 4xx and 5xx answers (:class:`HTTPStatusError`, naming the status and the start of the body)
and a network closed to the service (:class:`NetworkClosedError`: the unit forbids the network unless its
drop-in is installed; with the drop-in, an address missing from its ``IPAddressAllow=`` shows as a
connect timeout). Every error is one line that starts with ``POST <url>:``. A call takes at most
about ATTEMPTS x 2 x the timeout plus the waits between them (a service that answers, but byte by byte,
can hold it longer); keep that well below half of ``WatchdogSec=``.

Calls from many worker threads at once are safe: each call opens, uses and closes its own connection,
and the module's only shared state is the immutable settings and the TLS context (thread-safe).
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import http.client
import logging
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping

from invoicer import __version__
from invoicer.orders import check_order
from invoicer.processing import Invoice, InvoiceRequest, ServiceUnavailableError, build_invoice

log = logging.getLogger("invoicer.examples.http")

ATTEMPTS = 3
BACKOFF_S = 0.25               # before the second attempt; doubled before each later one
RETRY_AFTER_CAP_S = 5.0        # a longer Retry-After is cut to this: the call must stay short
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 600.0
RETRIED_STATUSES = frozenset({408, 429, 502, 503, 504})
EXCERPT_CHARS = 200
MAX_BODY_BYTES = 64 * 1024     # read at most this much of an answer
# What socket() or connect() fail with when the unit closes the network, and the setting that does it:
# ENETUNREACH comes from a namespace with only a loopback device, EPERM from the cgroup's packet filter
# where it fails a send outright (a TCP connect it blocks times out instead, see CONNECT_HINT).
CLOSED_NETWORK = {
    errno.EAFNOSUPPORT: "RestrictAddressFamilies=",
    errno.EPERM: "IPAddressDeny=",
    errno.ENETUNREACH: "PrivateNetwork=",
}
DROP_IN_HINT = ("the network is closed to this service ({setting}); install "
                "/usr/share/doc/invoicer/examples/network.conf as a drop-in, with the service's address "
                "in IPAddressAllow=, see README")

# IPAddressDeny= drops a TCP connection's packets rather than failing connect(): it times out.
CONNECT_HINT = ("the service is down or unreachable, or IPAddressAllow= in this service's network drop-in "
                "does not list its address, see README")


class HTTPStatusError(RuntimeError):
    """The service answered with a status that is not 2xx (and not, or no longer, worth retrying)."""


class NetworkClosedError(ConnectionError):
    """The service's sandbox forbids the connection: the unit's network drop-in is not installed."""


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """Where and how to post invoices, validated (see :func:`settings_from_env`)."""

    url: str
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def parts(self) -> urllib.parse.SplitResult:
        """The URL's parts."""
        return urllib.parse.urlsplit(self.url)


def settings_from_env(env: Mapping[str, str]) -> HttpSettings:
    """Read INVOICER_HTTP_URL and INVOICER_HTTP_TIMEOUT; ValueError naming the variable if one is bad."""
    accepted = "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080/invoices"
    url = env.get("INVOICER_HTTP_URL", "").strip()
    if not url:
        raise ValueError(f"INVOICER_HTTP_URL is not set; expected {accepted}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"INVOICER_HTTP_URL={url!r} is not a URL ({exc}); expected {accepted}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"INVOICER_HTTP_URL={url!r} is not usable; expected {accepted}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"INVOICER_HTTP_URL={url!r} carries credentials, which would land in the logs; "
                         f"expected {accepted}")
    raw = env.get("INVOICER_HTTP_TIMEOUT", "").strip()
    if not raw:
        return HttpSettings(url)
    expected = f"expected seconds, a number > 0 and <= {MAX_TIMEOUT_S:g}"
    try:
        timeout = float(raw)
    except ValueError:
        raise ValueError(f"INVOICER_HTTP_TIMEOUT={raw!r} is not a number; {expected}") from None
    if not 0 < timeout <= MAX_TIMEOUT_S:  # also rejects nan
        raise ValueError(f"INVOICER_HTTP_TIMEOUT={raw!r} is out of range; {expected}")
    return HttpSettings(url, timeout)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delay-seconds or an HTTP date), None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - now)


class _RetryableError(Exception):
    """One attempt failed in a way that is safe and worth retrying; ``wait`` is the server's wish."""

    def __init__(self, error: Exception, wait: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait


class InvoicePoster:
    """Posts invoice documents to one URL, retrying what is safe to retry; shareable between threads.

    ``sleep`` and ``jitter`` are parameters so tests need not wait; both must be thread-safe.
    """

    def __init__(self, settings: HttpSettings, *, sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self._sleep = sleep
        self._jitter = jitter
        parts = settings.parts
        self._host = parts.hostname or ""
        self._port = parts.port
        self._target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        # One context for every call: creating one loads the CA store, and SSLContext is thread-safe.
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None

    def post(self, invoice: Invoice) -> None:
        """POST ``invoice.document`` with ``Idempotency-Key: <number>``; return on 2xx, else raise."""
        body = invoice.document.encode("utf-8")
        headers = {"Content-Type": "application/json", "Idempotency-Key": str(invoice.id),
                   "User-Agent": f"invoicer/{__version__}"}
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._attempt(body, headers)
                return
            except _RetryableError as retry:
                if attempt == ATTEMPTS:
                    raise retry.error from None
                wait = self._backoff(attempt, retry.wait)
                log.warning("invoice %d: %s; retrying in %.2f s", invoice.id, retry.error, wait,
                            extra={"invoice": invoice.id, "attempt": attempt, "retry_in": round(wait, 3)})
                self._sleep(wait)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_S)
        return BACKOFF_S * 2.0 ** (attempt - 1) * (0.5 + self._jitter() / 2)

    def _connection(self) -> http.client.HTTPConnection:
        timeout = self.settings.timeout
        if self._tls is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _attempt(self, body: bytes, headers: dict[str, str]) -> None:
        """One request on its own connection: return on 2xx; raise _RetryableError or the final error."""
        where = f"POST {self.settings.url}"
        connection = self._connection()
        connected = False
        try:
            connection.connect()  # on its own: a connect that times out has a likely cause of its own
            connected = True
            connection.request("POST", self._target, body=body, headers=headers)
            response = connection.getresponse()
            excerpt = response.read(MAX_BODY_BYTES).decode("utf-8", "replace")
        except TimeoutError:
            timeout = f"within {self.settings.timeout:g} s (INVOICER_HTTP_TIMEOUT)"
            if connected:
                raise _RetryableError(TimeoutError(f"{where}: no answer {timeout}")) from None
            unreachable = TimeoutError(f"{where}: could not connect {timeout}; {CONNECT_HINT}")
            raise _RetryableError(unreachable) from None
        except ConnectionError as exc:
            # Refused, reset, or closed without an answer (RemoteDisconnected is a ConnectionResetError).
            raise _RetryableError(ConnectionError(f"{where}: {exc}")) from None
        except http.client.HTTPException as exc:  # an answer cut short or garbled: worth another try
            raise _RetryableError(ConnectionError(f"{where}: {type(exc).__name__}: {exc}")) from None
        except OSError as exc:
            if exc.errno in CLOSED_NETWORK:
                hint = DROP_IN_HINT.format(setting=CLOSED_NETWORK[exc.errno])
                raise NetworkClosedError(f"{where}: {exc}: {hint}") from None
            raise ConnectionError(f"{where}: {exc}") from None  # e.g. the name does not resolve
        finally:
            connection.close()
        if 200 <= response.status < 300:
            return
        error = HTTPStatusError(f"{where}: HTTP {response.status} {response.reason}: "
                                f"{_one_line(excerpt)!r}")
        if response.status in RETRIED_STATUSES:  # "not now": after the retries, a sign of an outage
            unavailable = ServiceUnavailableError(str(error))
            raise _RetryableError(unavailable, retry_after_seconds(response.getheader("Retry-After"),
                                                                   time.time()))
        raise error


def _one_line(text: str) -> str:
    """Return the start of a response body on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[:EXCERPT_CHARS] + "..."


_poster = InvoicePoster(settings_from_env(os.environ))


def process(request: InvoiceRequest) -> Invoice:
    """Build the invoice for the request's order and post it to INVOICER_HTTP_URL; return it once accepted."""
    invoice_id = request.number
    invoice = build_invoice(invoice_id, request.order)
    _poster.post(invoice)
    return invoice


process.check_order = check_order  # type: ignore[attr-defined]  # it takes the built-in order format

"""A real HTTP service on 127.0.0.1 for the example HTTP processor: scripted answers, recorded requests."""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from collections import deque
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the service does with one request: a status with headers and body, or HOLD or CLOSE."""

    status: int = 200
    body: str = '{"accepted": true}'
    headers: tuple[tuple[str, str], ...] = ()
    hold: bool = False   # read the request, then never answer (until the service stops)
    close: bool = False  # read the request, then close the connection without an answer


OK = Answer()
HOLD = Answer(hold=True)
CLOSE = Answer(close=True)


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as the service received it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival

    @property
    def key(self) -> str | None:
        """The Idempotency-Key header."""
        return self.headers.get("Idempotency-Key")


class InvoiceService:
    """``ThreadingHTTPServer`` on 127.0.0.1, an ephemeral port, in a thread.

    Answers POSTs from a script (``script()``; OK once it runs out) and records every request.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        # _lock guards requests and _script; the handler threads and the test thread take it.
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._script: deque[Answer] = deque()
        self._released = threading.Event()  # ends every HOLD at stop()
        self.requests: list[Request] = []
        self._server = http.server.ThreadingHTTPServer((host, 0), self._handler_class())
        # A short poll interval: shutdown() waits up to one of them.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        name="invoice-service", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The URL to post invoices to."""
        return f"http://127.0.0.1:{self.port}/invoices"

    def start(self) -> InvoiceService:
        """Start serving."""
        self._thread.start()
        return self

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with ``answers``, in order."""
        with self._lock:
            self._script.extend(answers)

    def recorded(self) -> list[Request]:
        """A copy of the requests received so far."""
        with self._lock:
            return list(self.requests)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[Request]:
        """Block until at least ``count`` requests arrived; return them."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} requests arrived within {timeout}s, not {count}")
            return list(self.requests)

    def stop(self) -> None:
        """Stop serving and close the listening socket (safe to call twice)."""
        self._released.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    def _record(self, request: Request) -> Answer:
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()
            return self._script.popleft() if self._script else OK

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                answer = service._record(Request(self.path, dict(self.headers.items()), body,
                                                 time.monotonic()))
                if answer.hold:
                    service._released.wait()
                if answer.hold or answer.close:
                    self.close_connection = True
                    return
                data = answer.body.encode()
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Keep the test output quiet."""

        return Handler


def keys(requests: Iterable[Request]) -> list[str | None]:
    """The Idempotency-Key of each request, in order."""
    return [request.key for request in requests]

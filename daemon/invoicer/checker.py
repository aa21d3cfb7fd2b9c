"""The built-in order check in a process of its own, off the interpreter lock the consumers need.

Parsing and checking a claim's orders costs about as much as computing their invoices, and in the
daemon's process both wait for the one interpreter lock. So the claimer sends each claim's payloads to
``python -m invoicer.checker`` and waits for the answers on a pipe, while the consumers go on. Each
answer is the checked order as ``marshal`` bytes, which the consumer turns into the order right before
the processor call (:class:`PackedRequests`): an order made a whole claimed block ahead cost three times
as much as one made just in time (docs/performance.md, "The orders source").

Only the built-in check runs here: a plugin's ``check_order`` may rely on its module's state, so it runs
in the daemon, as always. If the check process cannot be started or ends, the daemon says so once and
checks in its own process from then on: slower, never different.

Frames on both pipes are an 8-byte length and a ``marshal`` dump: ``(max_bytes, [payload, ...])`` in,
``[(True, order_bytes) | (False, reason, traceback), ...]`` out (``traceback``: empty, unless the check
raised something other than InvalidOrder).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from invoicer.processing import InvoiceRequest

log = logging.getLogger("invoicer")

_LENGTH = struct.Struct("<Q")
PIPE_BYTES = 1 << 20  # the default /proc/sys/fs/pipe-max-size
CLOSE_TIMEOUT_S = 5.0  # a check process that does not end at EOF within this is killed
ANSWER_S = 5.0  # ... nor takes or answers a claim within this, and a second per 4 MiB of its orders
MAX_FRAME = 2 << 30  # a longer length is a garbled frame (claims are capped at 512 MiB of payloads)
PR_SET_PDEATHSIG = 1  # prctl(2)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # a stop or reload is the daemon's to act on

# One answer: (True, marshal bytes of the order) or (False, reason, traceback of a broken check or '').
Verdict = tuple[Any, ...]


def _read_within(fd: int, deadline: float | None) -> Any:
    """Read one frame from ``fd`` by ``deadline`` (TimeoutError; None: no limit), off the interpreter lock."""
    (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, deadline))
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size:,} bytes")
    return marshal.loads(_read_exactly(fd, size, deadline))  # noqa: S302  # from the process we started


def _wait(fd: int, event: int, deadline: float | None) -> None:
    """Wait until ``fd`` is ready for ``event`` (select.POLLIN/POLLOUT); TimeoutError at ``deadline``."""
    if deadline is None:  # the check process: it blocks in the read or write itself
        return
    poller = select.poll()
    poller.register(fd, event)
    wait = deadline - time.monotonic()
    if wait <= 0 or not poller.poll(wait * 1000):
        raise TimeoutError


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    parts = []
    left = size
    while left:
        _wait(fd, select.POLLIN, deadline)
        part = os.read(fd, min(left, PIPE_BYTES))
        if not part:
            raise EOFError("the pipe closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _write_within(fd: int, value: Any, deadline: float | None) -> None:
    """Write one frame to ``fd`` by ``deadline`` (TimeoutError; None: no limit), whatever the reader does.

    The daemon's end is non-blocking, so that a reader that takes nothing cannot hold it past the deadline.
    """
    data = marshal.dumps(value)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    done = 0
    while done < len(view):
        _wait(fd, select.POLLOUT, deadline)
        with contextlib.suppress(BlockingIOError):
            done += os.write(fd, view[done:done + PIPE_BYTES])


def _limit(size: int) -> float:
    """Seconds the check process has to take, or to answer, a claim of ``size`` bytes."""
    return ANSWER_S + size / (4 << 20)


class PackedRequests(Sequence[InvoiceRequest]):
    """A chunk's requests with each order kept as ``marshal`` bytes until the consumer asks for it.

    Indexing makes the :class:`InvoiceRequest` (a new order each time), slicing another PackedRequests.
    """

    __slots__ = ("numbers", "order_ids", "packed")

    def __init__(self, numbers: range, order_ids: Sequence[int], packed: Sequence[bytes]) -> None:
        self.numbers = numbers
        self.order_ids = order_ids
        self.packed = packed

    def __len__(self) -> int:
        return len(self.numbers)

    @overload
    def __getitem__(self, index: int) -> InvoiceRequest: ...
    @overload
    def __getitem__(self, index: slice) -> PackedRequests: ...

    def __getitem__(self, index: int | slice) -> InvoiceRequest | PackedRequests:
        if isinstance(index, slice):
            return PackedRequests(self.numbers[index], self.order_ids[index], self.packed[index])
        order = marshal.loads(self.packed[index])  # noqa: S302  # bytes the check process made
        return InvoiceRequest(self.numbers[index], self.order_ids[index], order)

    def __iter__(self) -> Iterator[InvoiceRequest]:
        return (self[index] for index in range(len(self.numbers)))


class CheckProcess:
    """The check process, from the claimer thread's side (one claim at a time; no lock needed).

    Start it on the thread that uses it: it is killed when that thread ends (PR_SET_PDEATHSIG).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._answers: int | None = None  # the read end of the pipe the answers come on
        self.ended = False  # it could not be started, or it ended: the daemon checks in-process

    def start(self) -> bool:
        """Start the process; False (said once, in the log) if it cannot be started."""
        # -P: not the working directory first (a json.py there would be imported). This very invoicer:
        # its directory is added only where the daemon did not find it on the usual path (sys.path[0]
        # is the daemon's own start directory), so the standard library keeps coming first.
        package_root = Path(__file__).resolve().parents[1]
        env = dict(os.environ)
        if package_root not in {Path(entry).resolve() for entry in sys.path[1:] if entry}:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
        # Answers come on a pipe of their own: whatever the process prints goes to stderr, the journal.
        answers, answers_out = os.pipe()
        # Started with the stop signals blocked (a mask survives exec), so that one sent to the whole
        # unit before it has set them to be ignored waits, and is then dropped, instead of ending it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._process = subprocess.Popen(  # our own module, with this interpreter
                [sys.executable, "-P", "-m", "invoicer.checker", str(os.getpid()), str(answers_out)],
                stdin=subprocess.PIPE, stdout=2, pass_fds=(answers_out,), env=env)
        except OSError as exc:
            os.close(answers)
            self._give_up(f"it cannot be started ({exc})")
            return False
        finally:
            os.close(answers_out)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._answers = answers
        assert self._process.stdin is not None
        os.set_blocking(self._process.stdin.fileno(), False)  # sends wait in poll(), with a deadline
        # Larger pipes: fewer syscalls, each followed by a wait to win the interpreter lock back.
        for fd in (self._process.stdin.fileno(), answers):
            with contextlib.suppress(OSError):  # a smaller pipe still works
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return True

    @property
    def pid(self) -> int | None:
        """The check process's PID, while it runs."""
        return None if self._process is None or self.ended else self._process.pid

    def check(self, payloads: Sequence[bytes | str], max_bytes: int) -> list[Verdict] | None:
        """Return the verdicts on ``payloads``, in order; None if the process has ended (check in-process)."""
        size = sum(len(payload) for payload in payloads)
        return self.receive(len(payloads), size) if self.send(payloads, max_bytes, size) else None

    def send(self, payloads: Sequence[bytes | str], max_bytes: int, size: int) -> bool:
        """Send ``payloads`` (``size`` bytes) to be checked (``receive`` answers); False if it has ended.

        A process that does not take them within ANSWER_S (plus a second per 4 MiB) is killed: hung.
        """
        process = self._process
        if process is None or self.ended:
            return False
        assert process.stdin is not None
        limit = _limit(size)
        try:
            _write_within(process.stdin.fileno(), (max_bytes, list(payloads)), time.monotonic() + limit)
        except TimeoutError:
            self._give_up(f"it has not taken a claim's orders for {limit:.1f}s (pid {process.pid}, killed)",
                          kill=True)
            return False
        except Exception as exc:  # a broken pipe: it has ended
            self._failed(process, exc)
            return False
        return True

    def receive(self, count: int, size: int) -> list[Verdict] | None:
        """Return the verdicts on the ``count`` payloads last sent; None if the process has ended.

        ``size``: the bytes sent. A process that has not answered within ANSWER_S (plus a second per 4 MiB
        of them) is killed: hung.
        """
        process = self._process
        if process is None or self.ended or self._answers is None:
            return None
        limit = _limit(size)
        try:
            verdicts: list[Verdict] = _read_within(self._answers, time.monotonic() + limit)
            if type(verdicts) is not list or not all(type(verdict) is tuple and len(verdict) >= 2
                                                     for verdict in verdicts):
                raise ValueError("an answer that is not a list of verdicts")  # as any garbled frame
        except TimeoutError:
            self._give_up(f"it has not answered for {limit:.1f}s (pid {process.pid}, killed)", kill=True)
            return None
        except Exception as exc:  # a broken pipe, EOF, a garbled frame: the same, it cannot be used
            self._failed(process, exc)
            return None
        if len(verdicts) != count:
            self._give_up(f"it answered {len(verdicts)} verdicts for {count} orders", kill=True)
            return None
        return verdicts

    def _failed(self, process: subprocess.Popen[bytes], exc: Exception) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):  # EOF comes a moment before the exit status
            process.wait(0.5)
        code = process.poll()
        self._give_up(f"it ended (exit status {code})" if code is not None else f"its pipe failed ({exc})",
                      kill=code is None)

    def _give_up(self, why: str, *, kill: bool = False) -> None:
        self.ended = True
        if kill and self._process is not None:
            self._process.kill()
        log.warning("the order check process is not available: %s; orders are checked in the daemon's "
                    "own process from now on (slower, same verdicts)", why, extra={"reason": why})
        self.close()

    def close(self) -> None:
        """End the process: EOF on its input, then a kill if it does not end within CLOSE_TIMEOUT_S."""
        process, self._process = self._process, None
        answers, self._answers = self._answers, None
        if answers is not None:
            with contextlib.suppress(OSError):
                os.close(answers)
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):  # a broken pipe: it has ended already
                process.stdin.close()
        try:
            process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the kernel: leave it to init
                process.wait(CLOSE_TIMEOUT_S)


def verdicts(payloads: Sequence[bytes | str], max_bytes: int) -> list[Verdict]:
    """Check each payload with the built-in check (what the process answers for one frame)."""
    from invoicer.intake import decode_payload, reason_for  # noqa: PLC0415  # intake imports this module
    from invoicer.orders import InvalidOrder, check_order  # noqa: PLC0415

    out: list[Verdict] = []
    for payload in payloads:
        try:
            order = check_order(decode_payload(payload), max_bytes=max_bytes)
            out.append((True, marshal.dumps(order)))
        except Exception as exc:  # any failure refuses that order, as in the daemon
            broken = "" if isinstance(exc, InvalidOrder) else traceback.format_exc()
            out.append((False, reason_for(exc), broken))
    return out


def main() -> int:
    """Answer frames on stdin until it closes; the daemon ends it, not systemd's stop signal."""
    # A stop signals the whole control group; a claim under way still needs its answer, and EOF ends us.
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the daemon until now
    # Ended with the daemon even if it is hung itself (EOF only reaches a process that reads).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if len(sys.argv) > 1 and os.getppid() != int(sys.argv[1]):
        return 0  # the daemon ended before the line above
    answers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    try:
        while True:
            max_bytes, payloads = _read_within(0, None)
            _write_within(answers, verdicts(payloads, max_bytes), None)
    except (EOFError, BrokenPipeError):  # the daemon closed its end: it has stopped, or stops
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in order check in a process of its own, off the interpreter lock the consumers need.

Parsing and checking a claim's orders costs about as much as computing their invoices, and in the
daemon's process both wait for the one interpreter lock. So the claimer sends each claim's payloads to
``python -m invoicer.checker`` and waits for the answers on a pipe, while the consumers go on. Each
answer is the checked order as ``marshal`` bytes, which the consumer turns into the order right before
the processor call (:class:`PackedRequests`): an order made a whole claimed block ahead cost three times
as much as one made just in time (docs/performance.md, "The orders source").

On SQLite the process makes the whole claim (:func:`claim`): it reads the waiting orders on a connection
of its own, checks them and pairs the valid ones with their numbers in one transaction, as the claimer
would, and answers with what it paired. The claimer asks for the next claim as soon as it has an answer,
so the next block is read, checked and paired while the consumers process this one, and the daemon's
interpreter does nothing for a claim but take the answer. PostgreSQL's claims hold row locks in the
daemon's transaction: there the process only checks.

Only the built-in check runs here: a plugin's ``check_order`` may rely on its module's state, so it runs
in the daemon, as always. If the check process cannot be started or ends, the daemon says so and
claims and checks in its own process until it has started a new one (docs/design.md): slower, never
different.

Frames on both pipes are an 8-byte length and a ``marshal`` dump. In: ``("check", max_bytes, [payload,
...])``, ``("open", database, synchronous)`` or ``("claim", after, block, room, alone, max_bytes)``. Out,
in the same order: ``[(True, order_bytes) | (False, reason, traceback), ...]`` (``traceback``: empty,
unless the check raised something other than InvalidOrder); ``("opened",)``; for a claim,
``("read", bytes)`` once it has read, then a :data:`Claimed` tuple or ``("conflict", why, "")``; or,
for either of the last two, ``("error", message, sqlite_errorname)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import marshal
import math
import os
import select
import signal
import site
import sqlite3
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from invoicer.processing import InvoiceRequest

log = logging.getLogger("invoicer")

_LENGTH = struct.Struct("<Q")
PIPE_BYTES = 1 << 20  # the default /proc/sys/fs/pipe-max-size
CLOSE_TIMEOUT_S = 5.0  # a check process that does not end at EOF within this is killed
ANSWER_S = 5.0  # ... nor takes or answers a claim within this, and a second per 4 MiB of its orders
# A claim waits this long for another connection's write lock, then answers SQLITE_BUSY and the claimer
# asks again: a hung process is then told from a long lock within ANSWER_S + CLAIM_BUSY_S (and the
# bytes read), below the daemon's 10 s stall limit, and the claimer sees how long the lock has lasted.
CLAIM_BUSY_S = 1.0
MAX_FRAME = 2 << 30  # a longer length is a garbled frame (claims are capped at 512 MiB of payloads)
PR_SET_PDEATHSIG = 1  # prctl(2)
EX_CHANGED = 3  # the check process's exit status when the files on disk are not the daemon's
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # a stop or reload is the daemon's to act on

# One answer: (True, marshal bytes of the order) or (False, reason, traceback of a broken check or '').
Verdict = tuple[Any, ...]
# A claim's answer: ("claimed", first, last, [order id], [order bytes], [payload size],
# [(order id, reason, traceback)], full, waiting, blocked, last_id), the names as in _Plan. It follows
# ("read", bytes): what the claim read, sent before checking, which the answer's deadline follows.
Claimed = tuple[Any, ...]
CLAIMED_FIELDS = 11


def _source() -> str:
    """Return a digest of the code a claim runs on both sides (the check process must run the daemon's)."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        with contextlib.suppress(OSError):  # not there (a zipped install): not there on either side
            digest.update((PACKAGE / name).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _site_directories() -> set[Path]:
    """Where this interpreter finds installed packages (an installed invoicer is found there as it is)."""
    found = [*site.getsitepackages(), site.getusersitepackages()]
    return {Path(directory).resolve() for directory in found}


PACKAGE = Path(__file__).resolve().parent  # this invoicer's package directory, in the daemon and the process
SOURCE_FILES = ("checker.py", "intake.py", "orders.py", "storage/sqlite.py")
# Taken when the daemon imports this module, and again by each check process it starts once it has
# imported them all: one started after an upgrade replaced these files under a running daemon ends at
# once, saying so (main), and the daemon claims in-process until it is restarted.
SOURCE = _source()


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


def _well_formed(answer: tuple[Any, ...]) -> bool:
    """Whether a "claimed" answer has the fields and types of one (a wrong one must not be handed out)."""
    if len(answer) != CLAIMED_FIELDS:
        return False
    _, first, last, order_ids, packed, sizes, rejected, full, waiting, blocked, last_id = answer
    return (all(type(number) is int for number in (first, last, blocked, last_id))
            and all(type(flag) is bool for flag in (full, waiting))
            and all(type(part) is list for part in (order_ids, packed, sizes, rejected))
            and len(order_ids) == len(packed) == len(sizes) == last - first + 1
            and set(map(type, order_ids)) <= {int} and set(map(type, sizes)) <= {int}  # in C: 8,192 a claim
            and set(map(type, packed)) <= {bytes}
            and all(type(refused) is tuple and len(refused) == 3 and type(refused[0]) is int
                    and type(refused[1]) is str and type(refused[2]) is str for refused in rejected))


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
        self.exit_status: int | None = None  # how it ended, if it did and that is known
        self.database: str | None = None  # the SQLite database it claims from (None: it only checks)
        self._started = 0.0  # when the exchange under way began (monotonic)
        self.stopping = False  # the daemon stops: a give-up now is said as such, not as a fallback

    def start(self) -> bool:
        """Start the process; False (said once, in the log) if it cannot be started."""
        # -P: not the working directory first (a json.py there would be imported). This very invoicer:
        # its directory goes first on the path, unless it is a site directory (an installed invoicer,
        # which this interpreter finds there anyway), so the standard library keeps coming before
        # whatever else is installed. The process checks that it found it there (main).
        package_root = PACKAGE.parent
        env = dict(os.environ)
        if package_root not in _site_directories():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
        # Answers come on a pipe of their own: whatever the process prints goes to stderr, the journal.
        try:
            answers, answers_out = os.pipe()
        except OSError as exc:  # out of file descriptors, say: the daemon claims in-process meanwhile
            self._give_up(f"it cannot be started ({exc})")
            return False
        # Started with the stop signals blocked (a mask survives exec), so that one sent to the whole
        # unit before it has set them to be ignored waits, and is then dropped, instead of ending it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._process = subprocess.Popen(  # our own module, with this interpreter
                [sys.executable, "-P", "-m", "invoicer.checker", str(os.getpid()), str(answers_out),
                 SOURCE, str(package_root)],
                stdin=subprocess.PIPE, stdout=2, pass_fds=(answers_out,), env=env)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
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
        """Return the verdicts on ``payloads``, in order; None if the process has ended (check in-process).

        A process that has not taken them and answered within ANSWER_S (plus a second per 4 MiB) is
        killed: hung.
        """
        deadline = self._start(_limit(sum(len(payload) for payload in payloads)))
        if not self._send(("check", max_bytes, list(payloads)), deadline, "a claim's orders"):
            return None
        verdicts = self._receive(deadline)
        if verdicts is None:
            return None
        if type(verdicts) is not list or not all(type(verdict) is tuple and len(verdict) >= 2
                                                 for verdict in verdicts):
            self._give_up("an answer that is not a list of verdicts", kill=True)
            return None
        if len(verdicts) != len(payloads):
            self._give_up(f"it answered {len(verdicts)} verdicts for {len(payloads)} orders", kill=True)
            return None
        return verdicts

    def open_database(self, database: str, synchronous: str) -> bool:
        """Have the process claim orders from SQLite ``database`` too; False if it cannot (it has ended)."""
        deadline = self._start(ANSWER_S)
        if not self._send(("open", database, synchronous), deadline, "the database to claim from"):
            return False
        answer = self._receive(deadline)
        if answer is None:
            return False
        if answer != ("opened",):
            why = answer[1] if type(answer) is tuple and len(answer) > 1 and answer[0] == "error" else answer
            self._give_up(f"it cannot open {database} ({why})", kill=True)
            return False
        self.database = database
        return True

    def ask_claim(self, after: int, block: int, room: int, alone: bool, max_bytes: int) -> bool:
        """Ask for a claim (see :func:`claim`), answered by ``claimed``; False if the process has ended."""
        return self._send(("claim", after, block, room, alone, max_bytes), self._start(ANSWER_S), "a claim")

    def claimed(self, most: float | None = None) -> Claimed | None:
        """Return the answer to the claim asked for: Claimed, a conflict or an error; None if it ended.

        A process that has not said what it read within ANSWER_S, or answered within ANSWER_S, CLAIM_BUSY_S
        and a second per 4 MiB read (all from now), is hung, and killed; so is one that has not answered
        within ``most`` seconds, if given (at a stop).
        """
        started = time.monotonic()
        cap = math.inf if most is None else started + most
        self._started = started
        answer = self._receive(min(started + ANSWER_S, cap))
        if type(answer) is tuple and len(answer) == 2 and answer[0] == "read" and type(answer[1]) is int:
            answer = self._receive(min(started + _limit(answer[1]) + CLAIM_BUSY_S, cap))
        if answer is None:
            return None
        if type(answer) is not tuple or not answer:
            self._give_up(f"an answer that is not a claim ({type(answer).__name__})", kill=True)
            return None
        if answer[0] == "claimed" and _well_formed(answer):
            return answer
        if answer[0] in ("conflict", "error") and len(answer) == 3 and all(type(part) is str
                                                                             for part in answer):
            return answer
        self._give_up(f"an answer with the wrong shape for a claim ({str(answer[0])[:40]!r})", kill=True)
        return None

    def _start(self, limit: float) -> float:
        """Start timing an exchange; return its deadline, ``limit`` seconds from now."""
        self._started = time.monotonic()
        return self._started + limit

    def _send(self, value: Any, deadline: float, what: str) -> bool:
        """Write one frame by ``deadline``; False (and the process given up) if it cannot."""
        process = self._process
        if process is None or self.ended:
            return False
        assert process.stdin is not None
        try:
            _write_within(process.stdin.fileno(), value, deadline)
        except TimeoutError:
            self._give_up(f"it has not taken {what} for {time.monotonic() - self._started:.1f}s "
                          f"(pid {process.pid}, killed)", kill=True)
            return False
        except Exception as exc:  # a broken pipe: it has ended
            self._failed(process, exc)
            return False
        return True

    def _receive(self, deadline: float) -> Any:
        """Read one frame by ``deadline``; None (and the process given up) if it cannot."""
        process = self._process
        if process is None or self.ended or self._answers is None:
            return None
        try:
            return _read_within(self._answers, deadline)
        except TimeoutError:
            self._give_up(f"it has not answered for {time.monotonic() - self._started:.1f}s "
                          f"(pid {process.pid}, killed)", kill=True)
            return None
        except Exception as exc:  # a broken pipe, EOF, a garbled frame: the same, it cannot be used
            self._failed(process, exc)
            return None

    def _failed(self, process: subprocess.Popen[bytes], exc: Exception) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):  # EOF comes a moment before the exit status
            process.wait(0.5)
        code = process.poll()
        self.exit_status = code
        self._give_up(f"it ended (exit status {code})" if code is not None else f"its pipe failed ({exc})",
                      kill=code is None)

    def _give_up(self, why: str, *, kill: bool = False) -> None:
        self.ended = True
        if kill and self._process is not None:
            self._process.kill()
        if self.stopping:
            log.warning("the order check process did not answer at the stop: %s; the claim it was making is "
                        "given back", why, extra={"reason": why})
        else:
            log.warning("the order check process is not available: %s; orders are claimed and checked in "
                        "the daemon's own process meanwhile (slower, same verdicts)", why,
                        extra={"reason": why})
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


def claim(connection: sqlite3.Connection, after: int, block: int, room: int, *, alone: bool,
          max_bytes: int, say: Callable[[Any], None]) -> Claimed | tuple[str, ...]:
    """Claim as the daemon's claimer does on SQLite: read, plan, check, pair; return the answer.

    The waiting orders after id ``after`` are read outside the transaction that pairs them, which is
    rolled back if another program deleted one meanwhile (the answer is then a conflict). What was read
    is told (``say``) before the orders are checked.
    """
    from invoicer.intake import CLAIM_BYTES, plan_claim  # noqa: PLC0415  # intake imports this module
    from invoicer.storage import ClaimConflictError  # noqa: PLC0415
    from invoicer.storage import sqlite as backend  # noqa: PLC0415

    try:
        waiting = backend.split_waiting(connection.execute(backend.SELECT_WAITING, {
            "max": max_bytes, "limit": block, "room": min(room, CLAIM_BYTES), "after": after}).fetchone(),
            max_bytes)
        plan = plan_claim(waiting, block, max_bytes, room, alone=alone)
        say(("read", plan.planned))
        rejected = [(order_id, reason, "") for order_id, reason in plan.rejected]
        order_ids: list[int] = []
        packed: list[bytes] = []
        sizes: list[int] = []
        found = verdicts([payload for _, payload, _ in plan.candidates], max_bytes)
        for (order_id, _, size), verdict in zip(plan.candidates, found, strict=True):
            if verdict[0]:
                order_ids.append(order_id)
                packed.append(verdict[1])
                sizes.append(size)
            else:
                rejected.append((order_id, verdict[1], verdict[2]))
        first, last = 0, -1
        if order_ids or rejected:
            connection.execute("BEGIN IMMEDIATE")
            first, last = backend.pair_orders(connection.cursor(), order_ids,
                                              [(order_id, reason) for order_id, reason, _ in rejected])
            connection.execute("COMMIT")
    except (ClaimConflictError, sqlite3.Error) as exc:
        with contextlib.suppress(sqlite3.Error):  # none under way if BEGIN failed
            connection.execute("ROLLBACK")
        if isinstance(exc, ClaimConflictError):
            return ("conflict", str(exc), "")
        return ("error", str(exc), getattr(exc, "sqlite_errorname", ""))
    return ("claimed", first, last, order_ids, packed, sizes, rejected, plan.full, plan.waiting,
            plan.blocked, plan.last_id)


def open_database(database: str, synchronous: str) -> sqlite3.Connection:
    """Open the connection claims run on: autocommit (transactions are explicit), the daemon's durability."""
    connection = sqlite3.connect(database, timeout=CLAIM_BUSY_S, isolation_level=None)
    connection.execute(f"PRAGMA synchronous={synchronous}")
    return connection


def answer(request: tuple[Any, ...], state: dict[str, sqlite3.Connection], say: Callable[[Any], None]) -> Any:
    """Answer one request frame (``state`` holds the connection, once opened; ``say`` sends a frame first)."""
    kind = request[0]
    if kind == "check":
        return verdicts(request[2], request[1])
    if kind == "open":
        try:
            state["connection"] = open_database(request[1], request[2])
        except sqlite3.Error as exc:
            return ("error", str(exc), getattr(exc, "sqlite_errorname", ""))
        return ("opened",)
    if kind == "claim":
        if "connection" not in state:
            return ("error", "no database is open to claim from", "")
        after, block, room, alone, max_bytes = request[1:]
        return claim(state["connection"], after, block, room, alone=alone, max_bytes=max_bytes, say=say)
    return ("error", f"unknown request {kind!r}", "")


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
    if len(sys.argv) > 4:
        # Everything a claim runs is imported now, and then compared: what is loaded stays as it is.
        import invoicer.intake  # noqa: PLC0415
        import invoicer.storage.sqlite  # noqa: F401, PLC0415

        found = PACKAGE.parent
        if str(found) != sys.argv[4]:
            print(f"invoicer.checker: this process found invoicer in {found}, the daemon runs the one in "
                  f"{sys.argv[4]} (PYTHONPATH?): it claims in its own process", file=sys.stderr)
            return EX_CHANGED
        if _source() != sys.argv[3]:
            print("invoicer.checker: invoicer's files changed since the daemon started (an upgrade?): it "
                  "claims in its own process until it is restarted", file=sys.stderr)
            return EX_CHANGED
    state: dict[str, sqlite3.Connection] = {}

    def say(value: Any) -> None:
        _write_within(answers, value, None)
    try:
        while True:
            say(answer(_read_within(0, None), state, say))
    except (EOFError, BrokenPipeError):  # the daemon closed its end: it has stopped, or stops
        return 0


if __name__ == "__main__":
    sys.exit(main())

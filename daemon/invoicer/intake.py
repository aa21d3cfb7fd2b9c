"""Where the work comes from: submitted orders (the default) or synthetic demo orders.

A *source* hands the producer chunks of consecutive invoice numbers, each paired with what the processor
will receive, and finds the requests for the numbers start-up must recover:

* :class:`OrderSource` (``INVOICER_SOURCE=orders``) claims waiting rows of the ``orders`` table. A claim
  is one transaction that raises the high-water mark and pairs each valid order with its number, so the
  pairing is durable before any processor sees the order; orders that fail the processor's check are
  marked ``rejected`` in the same transaction and take no number.
* :class:`DemoSource` (``INVOICER_SOURCE=demo``) takes numbers from the generator and makes a synthetic
  order from each (:func:`invoicer.orders.demo_order`): for demos and benchmarks.

Orders vary in size, so the work in flight is bounded in bytes as well as in count: a claim takes payload
bytes from a :class:`ByteBudget` that the writer gives back once their invoices are committed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from invoicer.checker import ANSWER_S, CLAIM_BUSY_S, EX_CHANGED, CheckProcess, PackedRequests
from invoicer.generator import InvoiceNumberGenerator
from invoicer.orders import InvalidOrder, check_order
from invoicer.processing import InvoiceRequest
from invoicer.storage import BUSY_TIMEOUT_S, Batch, ClaimConflictError, Row, StorageError
from invoicer.storage.sqlite import LOCKED

Storage = Any  # a backend of invoicer.storage (SQLite's Storage, PostgresStorage)

log = logging.getLogger("invoicer")

MIN_CLAIM = 64          # orders per claim, at first and at least
MAX_CLAIM = 8192        # ... and at most: the claim's transaction and its parsed orders stay small
CLAIM_SECONDS = 0.5     # claims grow while one lasts less than this, so a backlog costs few fsyncs
IDLE_POLL_S = 0.025     # how often an idle daemon looks for new orders: the latency floor at idle
ROOM_WAIT_S = 0.5       # how long a claim waits for the byte budget to make room before it looks again
# A claim reads the orders that begin within this many bytes (and the byte budget's room), so that one
# claim's check stays within seconds whatever INVOICER_INFLIGHT_BYTES allows; an order larger than this
# still goes, as a claim of its own.
CLAIM_BYTES = 8 << 20
# A check process that ended is started again this long after, the wait doubling with each one that
# ends within RESTART_MAX_S of its start, up to RESTART_MAX_S: the daemon claims in-process meanwhile.
RESTART_S = 1.0
RESTART_MAX_S = 60.0


class OrderChunk(Sequence[int]):
    """Consecutive invoice numbers with their requests: a work-queue chunk of the orders source.

    Indexing gives the number (as a ``range`` chunk does), slicing another OrderChunk; ``weight`` is the
    payload bytes it holds in the :class:`ByteBudget`.
    """

    __slots__ = ("numbers", "requests", "sizes")

    def __init__(self, numbers: range, requests: Sequence[InvoiceRequest], sizes: Sequence[int]) -> None:
        self.numbers = numbers
        self.requests = requests
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.numbers)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> OrderChunk: ...

    def __getitem__(self, index: int | slice) -> int | OrderChunk:
        if isinstance(index, slice):
            return OrderChunk(self.numbers[index], self.requests[index], self.sizes[index])
        return self.numbers[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.numbers)

    @property
    def weight(self) -> int:
        """Payload bytes these requests hold in the budget."""
        return sum(self.sizes)

    def __repr__(self) -> str:
        return f"OrderChunk({self.numbers.start}..{self.numbers.stop - 1})"


def decode_payload(payload: bytes | str) -> str:
    """Return a stored payload as text; InvalidOrder if it is not UTF-8."""
    if isinstance(payload, str):  # PostgreSQL's text is UTF-8 already
        return payload
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidOrder(f"payload is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def recheck(check: Callable[..., dict[str, Any]], order_id: int, payload: bytes,
            max_bytes: int = 0) -> dict[str, Any]:
    """Parse a paired order again (recovery, ``invoicer retry``); InvalidOrder if it no longer passes.

    Its size never refuses it: it took its number within the limit of its day.
    """
    try:
        return check(decode_payload(payload), max_bytes=max(max_bytes, len(payload)))
    except Exception as exc:  # any check failure: the invoice is stored as failed, saying why
        raise InvalidOrder(f"order {order_id} no longer passes its check: {refusal(exc)}") from None


def refusal(exc: Exception) -> str:
    """Say why an order is refused: an InvalidOrder's message, or what went wrong in the check (logged)."""
    if not isinstance(exc, InvalidOrder):
        log.error("the processor's check_order raised %s instead of InvalidOrder", type(exc).__name__,
                  exc_info=exc)
    return reason_for(exc)


def reason_for(exc: Exception) -> str:
    """Say in one line why an order is refused for ``exc`` (refusal(), without the log)."""
    if isinstance(exc, InvalidOrder):
        return " ".join(str(exc).split())[:2000]  # one line, whatever a plugin's message holds
    return " ".join(f"check_order failed: {type(exc).__name__}: {exc}".split())[:2000]


def _log_broken_check(order_id: int, reason: str, broken: str) -> None:
    """Log the check process's traceback when its check broke rather than refused (as refusal() does)."""
    if broken:
        log.error("the built-in check_order raised instead of refusing order %d: %s\n%s", order_id, reason,
                  broken.rstrip())


def weight_of(numbers: object) -> int:
    """Budget bytes a part's numbers hold (0 for the demo source's ranges)."""
    return numbers.weight if type(numbers) is OrderChunk else 0


class ByteBudget:
    """Bytes of order payloads in flight, from claim to commit, at most ``capacity``.

    When nothing is in flight any amount is admitted, so an order larger than the budget still goes
    through, alone.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Rule: _changed's lock guards used; the producer takes, the writer gives back.
        self._changed = threading.Condition(threading.Lock())
        self.used = 0

    def room(self) -> int:
        """Bytes that may be taken now (the whole capacity while nothing is in flight)."""
        with self._changed:
            return self.capacity if self.used == 0 else self.capacity - self.used

    def take(self, size: int) -> None:
        """Take ``size`` bytes (the caller checked the room; only the producer takes)."""
        with self._changed:
            self.used += size

    def wait_room(self, size: int, timeout: float) -> bool:
        """Wait until ``size`` bytes may be taken; True if they may, False once ``timeout`` passed."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.used == 0 or self.used + size <= self.capacity, timeout)

    def give_back(self, size: int) -> None:
        """Give back ``size`` bytes once their invoices are committed."""
        if size:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


# What recovery yields: a chunk to queue, or a Part of failed rows to hand the writer straight away.
Recovered = Any


class DemoSource:
    """Numbers from the generator, each with its synthetic demo order (made by the consumer)."""

    idle = False
    busy_since = 0.0  # reservations are timed by the producer

    def __init__(self, generator: InvoiceNumberGenerator, recovery: Recovery | None = None) -> None:
        self._generator = generator
        self._recovery = recovery

    def start(self) -> None:
        """Nothing to start: the producer takes numbers itself."""

    def stop(self) -> None:
        """Nothing to stop."""

    def join(self, timeout: float | None = None) -> bool:
        """Nothing to wait for."""
        return True

    def take(self, limit: int) -> range:
        """Hand out up to ``limit`` new numbers."""
        return self._generator.take(limit)

    def give_back(self, chunk: Any) -> None:
        """Return the chunk last taken, unused."""
        self._generator.give_back(chunk)

    def leftovers(self) -> list[range]:
        """Return what a drain must still process: the rest of the last block (PostgreSQL keeps blocks)."""
        if self._recovery is None or self._recovery.contiguous:
            return []  # SQLite: Storage.release() gives the rest back
        rest = self._generator.rest()
        return [rest] if rest else []

    def take_over(self) -> list[range]:
        """Numbers other instances left (see :class:`Recovery`)."""
        return [] if self._recovery is None else self._recovery.take_over()

    def recover(self, numbers: range) -> list[Recovered]:
        """Return the work for recovered ``numbers`` (see :class:`Recovery`; without one, the numbers)."""
        return [numbers] if self._recovery is None else self._recovery.recover(numbers)

    def admit(self, chunk: object, timeout: float) -> bool:
        """Take a recovered chunk's bytes from the budget (see :class:`Recovery`)."""
        return True if self._recovery is None else self._recovery.admit(chunk, timeout)

    @property
    def last_issued(self) -> int:
        """The highest number handed out."""
        return self._generator.last_issued


@dataclasses.dataclass
class _Plan:
    """A claim's read, taken in id order while it fits the room: what to check, what is refused."""

    full: bool                       # the read found a whole block waiting (a backlog)
    waiting: bool = False            # the read found any order waiting
    candidates: list[tuple[int, bytes | str, int]] = dataclasses.field(default_factory=list)
    rejected: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    planned: int = 0                 # the candidates' bytes
    blocked: int = 0                 # the size of the first order that did not fit (0: none)
    last_id: int = 0                 # the last order taken into the plan, candidate or refused


def plan_claim(waiting: list[tuple[int, bytes | None, int]], block: int, max_bytes: int, room: int, *,
               alone: bool) -> _Plan:
    """Take the waiting orders in id order while they fit ``room``; refuse those over the size limit.

    ``block``: the orders asked for (a full read means a backlog). ``alone``: nothing is in flight, so a
    first order larger than the room may go, by itself.
    """
    plan = _Plan(full=len(waiting) == block, waiting=bool(waiting))
    for order_id, payload, size in waiting:
        if payload is None:  # over the size limit: refused without being read, whatever the room
            plan.rejected.append((order_id, f"order is {size:,} bytes, over the limit of "
                                            f"{max_bytes:,} bytes"))
            plan.last_id = order_id
            continue
        if plan.planned + size > room and (plan.candidates or not alone):
            plan.blocked = size
            break  # the rest waits for room
        plan.candidates.append((order_id, payload, size))
        plan.planned += size
        plan.last_id = order_id
    return plan


class OrderSource:
    """Claims waiting orders, pairing each valid one with the next number in one durable transaction.

    Numbers follow submission order (``orders.id``). Once started, a claimer thread keeps the next block
    claimed (parsed, checked, paired) while the producer queues the current one, so that consumers do
    not wait for a claim's parsing and fsync; unstarted, ``take`` claims inline (the tests). What is
    claimed and not handed out at a stop is given back by ``Storage.release`` (its orders wait again).
    """

    idle = False

    def __init__(self, storage: Storage, high_water: int, budget: ByteBudget,
                 check: Callable[..., dict[str, Any]], *, max_order_bytes: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_fatal: Callable[[str, BaseException], None] | None = None) -> None:
        self._storage = storage
        self._budget = budget
        self._check = check
        self._max_bytes = max_order_bytes
        self._clock = clock
        self._on_fatal = on_fatal
        self._recovery = Recovery(storage, budget, check, max_order_bytes)
        self._block = MIN_CLAIM
        self._claimed_at: float | None = None
        self._reserved_last = high_water  # written by whoever claims (the claimer thread, once started)
        # Rule: _changed's lock guards _current, _offset, _ready and _last_issued. The producer takes,
        # the claimer thread appends to _ready; nobody holds it during a claim.
        self._changed = threading.Condition(threading.Lock())
        self._current: OrderChunk | None = None  # the block being handed out ...
        self._offset = 0                          # ... from here on
        self._ready: collections.deque[OrderChunk] = collections.deque()  # claimed ahead, in order
        self._last_issued = high_water
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The built-in check runs in a process of its own once the claimer thread runs (invoicer.checker),
        # which on SQLite makes the claims too.
        self.check_process: CheckProcess | None = None
        self.asked = False  # the check process is making the next claim
        self._process_started = 0.0  # when the check process was last started (the clock's time)
        self._restart_at: float | None = None  # when to start it again, once it has ended
        self._restart_wait = 0.0  # the wait before that start
        self._restarts_over = False  # it cannot run the daemon's code: none is started any more
        self._locked_since: float | None = None  # when its claims first met another connection's lock
        self._lock_told = 0.0  # how long that lock had lasted when last said
        self.idle = False           # the last look found no order waiting
        self.busy_since = 0.0       # monotonic start of the claim under way (0: none)
        self.claimed_total = 0
        self.rejected_total = 0

    @property
    def last_issued(self) -> int:
        """The highest number handed out (what a stop keeps; the rest of the claim is given back)."""
        with self._changed:
            return self._last_issued

    def start(self) -> None:
        """Start claiming ahead in a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="invoicer-claimer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming (what is claimed stays, for the producer or for release)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the claimer thread; True once it has ended (or never started)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self._check is check_order:
                self._start_check_process()
            while not self._stop.is_set():
                with self._changed:  # one block claimed ahead of the one being handed out
                    self._changed.wait_for(lambda: not self._ready or self._stop.is_set())
                if self._stop.is_set():
                    return
                self._restart_check_process()
                locked = self._locked_since
                self.busy_since = self._clock() if locked is None else locked
                block = self._claim()
                self._restart_check_process()  # the wait counts from when a claim found it ended
                # Still under way while another connection's lock holds the claims up (the health check).
                self.busy_since = self._locked_since or 0.0
                if block is None:  # nothing waiting, or no room in the byte budget: look again soon
                    self._stop.wait(IDLE_POLL_S)
                    continue
                with self._changed:
                    self._ready.append(block)
                    self._changed.notify_all()
        except BaseException as exc:  # a broken claimer must end the process loudly
            if self._on_fatal is None:
                raise
            self._on_fatal("claimer", exc)
        finally:
            if self.check_process is not None:
                if self._stop.is_set():
                    self._settle()
                self.check_process.close()

    def _start_check_process(self) -> None:
        """Start the check process from the claimer thread, which it must not outlive (PR_SET_PDEATHSIG)."""
        self.check_process = CheckProcess()
        self._process_started = self._clock()
        self.check_process.start()

    def _restart_check_process(self) -> None:
        """Start the check process again, RESTART_S after it ended, or longer if it ended soon again.

        It ended after everything it may have paired unanswered was given back (``_claims_lost``), and
        the claims made here since follow on from there, so a new one reads on where they stopped.
        """
        process = self.check_process
        if process is None or not process.ended or self._stop.is_set() or self._restarts_over:
            return
        if process.exit_status == EX_CHANGED:  # another invoicer's code: a new one would be no different
            self._restarts_over = True
            log.error("the order check process cannot run the daemon's code (its own message says why); "
                      "orders are claimed and checked in the daemon's own process until the daemon is "
                      "restarted")
            return
        now = self._clock()
        if self._restart_at is None:  # just found ended
            # A restarted one that ended within RESTART_MAX_S waits twice as long as the last time; one
            # that had run longer than that starts the count afresh.
            again = self._restart_wait > 0 and now - self._process_started < RESTART_MAX_S
            self._restart_wait = min(self._restart_wait * 2, RESTART_MAX_S) if again else RESTART_S
            self._restart_at = now + self._restart_wait
            return
        if now < self._restart_at:
            return
        found_gone, self._restart_at = self._restart_at - self._restart_wait, None
        self._start_check_process()
        assert self.check_process is not None
        if self.check_process.pid is not None:
            log.info("the order check process was started again (pid %d), %.1fs after a claim found it gone",
                     self.check_process.pid, now - found_gone, extra={"pid": self.check_process.pid})

    def take(self, limit: int) -> OrderChunk | None:
        """Hand out up to ``limit`` paired orders; None if none is claimed within IDLE_POLL_S."""
        if self._thread is None and not self._ready and self._left() == 0:
            block = self._claim()
            if block is not None:
                self._ready.append(block)
        with self._changed:
            if self._left() == 0 and not self._ready:
                self._changed.wait_for(lambda: bool(self._ready), IDLE_POLL_S)
            if self._left() == 0:
                if not self._ready:
                    return None
                self._current, self._offset = self._ready.popleft(), 0
                self._changed.notify_all()  # room to claim the next block
            assert self._current is not None
            # An offset into the block, not the block's rest sliced off each time: that copied the rest
            # of an 8,192-order block for every chunk of ten.
            start = self._offset
            chunk = self._current[start:start + limit]
            self._offset = start + len(chunk)
            self._last_issued = chunk.numbers[-1]
            return chunk

    def _left(self) -> int:
        return 0 if self._current is None else len(self._current) - self._offset

    def give_back(self, chunk: OrderChunk) -> None:
        """Return the chunk last taken: it goes back in front of the rest of the claim."""
        with self._changed:
            assert self._current is not None
            assert self._offset >= len(chunk)
            self._offset -= len(chunk)
            assert self._current.numbers[self._offset] == chunk.numbers.start
            self._last_issued = chunk.numbers.start - 1

    def _claim(self) -> OrderChunk | None:
        """Claim the next waiting orders (as many as the block and the byte budget allow)."""
        if self._process_claims():
            return self._claim_by_process()
        room = self._budget.room()
        if room <= 0:
            self._budget.wait_room(1, IDLE_POLL_S)
            return None
        try:
            with self._storage.claiming(self._block, self._max_bytes, min(room, CLAIM_BYTES)) as claim:
                plan = self._plan(claim.waiting, room, alone=self._budget.used == 0)
                valid, packed = self._checked(plan, self._verdicts(plan))
                chunk = self._pair(claim, plan, valid, packed)
        except StorageError as exc:  # PostgreSQL: a lock wait timed out, say; the next look tries again
            if not self._storage.may_retry(exc, 1):
                raise
            return None
        if plan.blocked and chunk is None:  # the next order does not fit yet: wait for its room, not a poll
            self._budget.wait_room(plan.blocked, ROOM_WAIT_S)
        return chunk

    def _process_claims(self) -> bool:
        """Whether the check process makes the claims: on SQLite, while it runs (opening the database once).

        A claim's read, check and pairing in the claimer thread took the interpreter lock from the
        consumers; only SQLite's single instance claims in id order from a connection of its own.
        """
        process = self.check_process
        if not self._storage.contiguous or process is None or process.ended:
            return False
        if process.database is None and not process.open_database(*self._storage.claim_database()):
            self._claims_lost()
            return False
        return True

    def _claim_by_process(self) -> OrderChunk | None:
        """Take the claim the check process made (asking for it first if need be), and ask for the next.

        The next is asked for at once, reading on after this one's last order, unless this one found no
        order, was stopped by the byte budget or was rolled back: then the next reads from the start.
        """
        process = self.check_process
        assert process is not None
        if not self.asked:
            room = self._budget.room()
            if room <= 0:
                self._budget.wait_room(1, IDLE_POLL_S)
                return None
            if not self._ask(0, room, alone=self._budget.used == 0):
                return None
        answer = process.claimed()
        self.asked = False
        if answer is None:
            self._claims_lost()
            return None
        return self._take_claimed(answer)

    def _take_claimed(self, answer: tuple[Any, ...]) -> OrderChunk | None:
        """Take the check process's answer to a claim: the chunk it paired, if any."""
        if answer[0] == "error" and answer[2] in LOCKED:
            self._wait_for_lock(answer[1], answer[2])
            return None
        self._lock_waited_out()
        if answer[0] == "conflict":  # another program deleted a waiting order: read them again
            log.info("claim rolled back and tried again: %s", answer[1])
            return None
        if answer[0] == "error":
            self.idle = False
            self._storage.claim_failed(answer[1], answer[2])
            return None
        _, first, last, order_ids, packed, sizes, rejected, full, waiting, blocked, last_id = answer
        self.idle = not waiting
        self._refused(rejected)
        if order_ids or rejected:
            self._adapt_block(full=full)
        # Taken first: a failed ask gives back every number above the last one taken.
        chunk = self._chunk(first, last, order_ids, packed, sizes, packed=True) if order_ids else None
        asks_on = chunk is not None and not blocked and not self._stop.is_set()  # none after a stop
        if asks_on and (room := self._budget.room()) > 0:
            self._ask(last_id, room, alone=False)
        if chunk is None and blocked:  # the next order does not fit yet: wait for its room, not a poll
            self._budget.wait_room(blocked, ROOM_WAIT_S)
        return chunk

    def _refused(self, rejected: list[tuple[int, str, str]]) -> None:
        """Log and count the orders a claim of the check process refused (with a broken check's traceback)."""
        for order_id, reason, broken in rejected:
            _log_broken_check(order_id, reason, broken)
        self._rejected([(order_id, reason) for order_id, reason, _ in rejected])

    def _wait_for_lock(self, message: str, name: str) -> None:
        """Another connection held the write lock past CLAIM_BUSY_S: ask again, as a busy timeout would.

        The claim counts as under way since the lock was first met (the health check sees a long one), a
        running daemon says so every BUSY_TIMEOUT_S it lasts, and one starting or draining gives up then
        (Storage.claim_failed), as for its own writes.
        """
        now = self._clock()
        if self._locked_since is None:
            self._locked_since = now - CLAIM_BUSY_S
        self.idle = False
        waited = now - self._locked_since
        if waited >= self._lock_told + BUSY_TIMEOUT_S:
            self._lock_told = waited
            self._storage.claim_failed(message, name, waited)

    def _lock_waited_out(self) -> None:
        self._locked_since, self._lock_told = None, 0.0

    def _settle(self) -> None:
        """At a stop: take the answer to the claim asked for, for its refusals (its pairing is given back).

        Its numbers count as claimed until Storage.release unpairs them.
        """
        process = self.check_process
        if not self.asked or process is None or process.ended:
            return
        self.asked = False
        process.stopping = True
        self.busy_since = self._clock()  # the drain's health check sees a wait for a hung process
        answer = process.claimed(most=ANSWER_S)
        self.busy_since = 0.0
        if answer is None or answer[0] != "claimed":
            return
        self._refused(answer[6])
        if answer[3]:
            self._reserved_last = answer[2]

    def _ask(self, after: int, room: int, *, alone: bool) -> bool:
        """Ask the check process for the next claim; False if it has ended (claims are made here then)."""
        assert self.check_process is not None
        self.asked = self.check_process.ask_claim(after, self._block, room, alone, self._max_bytes)
        if not self.asked:
            self._claims_lost()
        return self.asked

    def _claims_lost(self) -> None:
        """Give back what the check process, ended now, may have paired without telling.

        Its last claim may have been committed unanswered. Storage.release unpairs every number above
        the last one claimed here, and lowers the high-water mark to it, so claims made here go on from
        there. SQLite's write lock orders this after any transaction of the killed process.
        """
        self.asked = False
        self._lock_waited_out()
        self._storage.release(self._reserved_last)

    def _plan(self, waiting: list[tuple[int, bytes | None, int]], room: int, *, alone: bool) -> _Plan:
        """Plan a claim of ``waiting`` orders within ``room`` bytes (see :func:`plan_claim`)."""
        return plan_claim(waiting, self._block, self._max_bytes, room, alone=alone)

    def _verdicts(self, plan: _Plan) -> list[Any] | None:
        """Return the check process's verdicts on the plan's orders; None without one (checked here)."""
        if self.check_process is None or not plan.candidates:
            return None
        return self.check_process.check([payload for _, payload, _ in plan.candidates], self._max_bytes)

    def _checked(self, plan: _Plan, verdicts: list[Any] | None) -> tuple[list[tuple[int, Any, int]], bool]:
        """Return the plan's valid orders (id, order, size) and refuse the rest (into ``plan.rejected``).

        With the check process's ``verdicts`` the orders are marshal bytes (True); without, checked here.
        """
        valid: list[tuple[int, Any, int]] = []
        if verdicts is not None:
            for (order_id, _, size), verdict in zip(plan.candidates, verdicts, strict=True):
                if verdict[0]:
                    valid.append((order_id, verdict[1], size))
                    continue
                _log_broken_check(order_id, verdict[1], verdict[2])
                plan.rejected.append((order_id, verdict[1]))
            return valid, True
        check, max_bytes = self._check, self._max_bytes
        for order_id, payload, size in plan.candidates:
            try:
                valid.append((order_id, check(decode_payload(payload), max_bytes=max_bytes), size))
            except Exception as exc:  # a plugin's check that breaks refuses the order
                plan.rejected.append((order_id, refusal(exc)))
        return valid, False

    def _pair(self, claim: Any, plan: _Plan, valid: list[tuple[int, Any, int]],
              packed: bool) -> OrderChunk | None:
        """Pair the valid orders with numbers and mark the refused ones, in the claim's transaction.

        Returns the paired chunk (None: nothing paired, or the claim was rolled back).
        """
        rejected = plan.rejected
        if not plan.waiting:
            self.idle = True
            return None
        self.idle = False
        if not valid and not rejected:  # waits outside the claim (a PostgreSQL one holds row locks)
            return None
        try:
            first, last = claim.pair([order_id for order_id, _, _ in valid], rejected)
        except ClaimConflictError as exc:  # another program deleted a waiting order: read them again
            log.info("claim rolled back and tried again: %s", exc)
            return None
        self._rejected(rejected)
        self._adapt_block(full=plan.full)
        if not valid:
            return None
        return self._chunk(first, last, [order_id for order_id, _, _ in valid],
                           [order for _, order, _ in valid], [size for _, _, size in valid], packed=packed)

    def _rejected(self, rejected: Sequence[tuple[int, str]]) -> None:
        for order_id, reason in rejected:
            log.warning("order %d rejected before numbering: %s", order_id, reason,
                        extra={"order": order_id, "reason": reason})
        self.rejected_total += len(rejected)

    def _chunk(self, first: int, last: int, order_ids: list[int], orders: list[Any], sizes: list[int], *,
               packed: bool) -> OrderChunk:
        """Return the chunk of orders just paired with ``first..last``, taking their bytes from the budget.

        ``packed``: the orders are marshal bytes from the check process, each made into its order just
        before its processor call.
        """
        if self._storage.contiguous and first != self._reserved_last + 1:
            raise RuntimeError(f"claimed numbers {first}..{last} do not follow {self._reserved_last}; "
                               "is another writer using the database?")
        self._reserved_last = last
        self._budget.take(sum(sizes))
        self.claimed_total += len(order_ids)
        numbers = range(first, last + 1)
        if packed:
            return OrderChunk(numbers, PackedRequests(numbers, order_ids, orders), sizes)
        requests = [InvoiceRequest(number, order_id, order)
                    for number, order_id, order in zip(numbers, order_ids, orders, strict=True)]
        return OrderChunk(numbers, requests, sizes)

    def _adapt_block(self, *, full: bool) -> None:
        """Grow the block while full claims come faster than CLAIM_SECONDS; shrink when they are slow.

        Only a claim that found a full block of orders waiting says anything about the backlog: idle
        polls, which find few or none, leave the block as it is.
        """
        now = self._clock()
        if full and self._claimed_at is not None:
            lasted = now - self._claimed_at
            if lasted < CLAIM_SECONDS:
                self._block = min(MAX_CLAIM, self._block * 2)
            elif lasted > 4 * CLAIM_SECONDS:
                self._block = max(MIN_CLAIM, self._block // 2)
        self._claimed_at = now if full else None

    def leftovers(self) -> list[OrderChunk]:
        """Return what a drain must still process: claimed orders not handed out (PostgreSQL keeps blocks).

        On SQLite they are given back instead (Storage.release unpairs them). Call once claiming stopped.
        """
        if self._storage.contiguous:
            return []
        with self._changed:
            rest = [] if self._left() == 0 or self._current is None else [self._current[self._offset:]]
            rest += self._ready
            self._ready.clear()
            self._current, self._offset = None, 0
            if rest:
                self._last_issued = rest[-1].numbers[-1]
            return rest

    def take_over(self) -> list[range]:
        """Numbers other instances left (see :class:`Recovery`)."""
        return self._recovery.take_over()

    @property
    def claimed_ahead(self) -> int:
        """Numbers claimed and not handed out (given back at a stop, recovered after a crash)."""
        return self._reserved_last - self.last_issued

    def recover(self, numbers: range) -> list[Recovered]:
        """Return the work for recovered ``numbers`` (see :class:`Recovery`)."""
        return self._recovery.recover(numbers)

    def admit(self, chunk: object, timeout: float) -> bool:
        """Take a recovered chunk's bytes from the budget (see :class:`Recovery`)."""
        return self._recovery.admit(chunk, timeout)


class Recovery:
    """The work for numbers start-up must recover: each with the order it was paired with.

    Whatever the source is now: a number paired with an order under ``INVOICER_SOURCE=orders`` is
    reprocessed with that order even if the daemon restarts as a demo.
    """

    def __init__(self, storage: Storage, budget: ByteBudget, check: Callable[..., dict[str, Any]],
                 max_order_bytes: int) -> None:
        self._storage = storage
        self._budget = budget
        self._check = check
        self._max_bytes = max_order_bytes
        self.contiguous = storage.contiguous

    def take_over(self) -> list[range]:
        """Take over what other instances left unstored (PostgreSQL); return those numbers."""
        result: list[range] = self._storage.take_over()
        return result

    def recover(self, numbers: range) -> list[Recovered]:
        """Return the work for recovered ``numbers``: their paired orders, read again.

        A number with no order came from the demo source and gets its demo order (a bare range, when no
        number of it has one); an order that no longer passes the check is stored as failed with the
        reason, keeping its number.
        """
        from invoicer.pipeline import Part, failed_row  # noqa: PLC0415  # the pipeline imports this module
        from invoicer.processing import demo_request  # noqa: PLC0415

        paired: dict[int, tuple[int | None, bytes | None]] = {
            number: (order_id, payload) for number, order_id, payload
            in self._storage.paired_orders(numbers.start, numbers[-1])}
        if not paired:
            return [numbers]
        requests: list[InvoiceRequest] = []
        sizes: list[int] = []
        out: list[Recovered] = []
        start = numbers.start
        for number in numbers:
            order_id, payload = paired.get(number, (None, None))
            if order_id is None or payload is None:
                requests.append(demo_request(number))
                sizes.append(0)
                continue
            try:
                order = recheck(self._check, order_id, payload, self._max_bytes)
            except InvalidOrder as error:  # stored as failed, keeping its number
                if requests:
                    out.append(OrderChunk(range(start, number), requests, sizes))
                row: Row = failed_row(number, error, 0, order_id)
                out.append(Part(range(number, number + 1), Batch(failed=[row])))
                requests, sizes, start = [], [], number + 1
                continue
            requests.append(InvoiceRequest(number, order_id, order))
            sizes.append(len(payload))
        if requests:
            out.append(OrderChunk(range(start, numbers.stop), requests, sizes))
        return out

    def admit(self, chunk: object, timeout: float) -> bool:
        """Take a recovered chunk's bytes from the budget once there is room; False if ``timeout`` passed."""
        weight = weight_of(chunk)
        if not weight:
            return True
        if not self._budget.wait_room(weight, timeout):
            return False
        self._budget.take(weight)
        return True

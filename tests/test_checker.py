"""The built-in check in a process of its own: same verdicts, claims made there, and what if it ends."""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import re
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import invoicer.checker
from invoicer.checker import CLOSE_TIMEOUT_S, EX_CHANGED, CheckProcess, PackedRequests, verdicts
from invoicer.checker import answer as answer_request
from invoicer.intake import ByteBudget, OrderChunk, OrderSource, decode_payload, reason_for
from invoicer.orders import DEFAULT_MAX_ORDER_BYTES, check_order, demo_order
from invoicer.storage import EX_TEMPFAIL, Storage, StorageError, submit_orders
from tests.conftest import Daemon
from tests.test_intake import pairs, payload, submit
from tests.test_orders_daemon import ORDERS, assert_one_invoice_per_order, invoice_to_the_end

LIMIT = DEFAULT_MAX_ORDER_BYTES
StartDaemon = Callable[..., Daemon]

BAD = [
    b"{not json",
    b'{"customer": "A", "currency": "EUR", "lines": []}',
    b'{"customer": "A", "currency": "eur", "lines": [{"description": "x", "quantity": 1, '
    b'"unit_price": "1.00", "tax_rate": "0.19"}]}',
    b"\xff\xfe not UTF-8",
    b'{"customer": "A\x00B", "currency": "EUR"}',
    b"[1, 2]",
    b"{" * 40 + b"}" * 40,
]


def in_process(raw: bytes | str, max_bytes: int = LIMIT) -> tuple[bool, object]:
    """What the daemon's own check says: (True, order) or (False, reason)."""
    try:
        return True, check_order(decode_payload(raw), max_bytes=max_bytes)
    except Exception as exc:  # the verdict on any failure is what is compared
        return False, reason_for(exc)


@pytest.fixture
def process() -> Iterator[CheckProcess]:
    started = CheckProcess()
    assert started.start()
    yield started
    started.close()


def paired(database: Path) -> list[tuple[int, int]]:
    """(number, order id) of every paired order, by number, read by another connection."""
    return sorted((number, order_id) for order_id, number in pairs(database).items())


def claim_all(orders: OrderSource, limit: int = 10_000) -> list[OrderChunk]:
    """Take chunks until no order is waiting (inline claims, as the claimer thread makes them)."""
    chunks: list[OrderChunk] = []
    for _ in range(limit):
        chunk = orders.take(limit)
        if chunk is None:
            if orders.idle and not orders.asked:  # no claim under way in the check process either
                return chunks
            continue
        chunks.append(chunk)
    raise AssertionError("claims did not end")


def test_the_check_process_gives_the_daemons_verdicts(process: CheckProcess) -> None:
    """Valid orders come back as the same order, bad ones with the same one-line reason."""
    payloads: list[bytes | str] = [payload(1), payload(2).encode(), *BAD, payload(3)]
    answers = process.check(payloads, LIMIT)
    assert answers is not None
    for raw, answer in zip(payloads, answers, strict=True):
        ok, expected = in_process(raw)
        assert answer[0] is ok
        if ok:
            assert marshal.loads(answer[1]) == expected  # noqa: S302  # bytes the test's process made
        else:
            assert answer[1] == expected
            assert answer[2] == ""  # refused, not a broken check
    small = process.check([payload(4)], 100)
    assert small is not None
    assert small[0][:2] == in_process(payload(4), 100)


def test_verdicts_say_when_the_check_itself_broke(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: str, *, max_bytes: int) -> dict[str, object]:
        raise KeyError("tax_id")

    monkeypatch.setattr("invoicer.orders.check_order", broken)
    (answer,) = verdicts([payload(1)], LIMIT)
    assert answer[:2] == (False, "check_order failed: KeyError: 'tax_id'")
    assert answer[2].startswith("Traceback")
    assert "KeyError: 'tax_id'" in answer[2]


def test_packed_requests_make_a_new_order_for_each_request() -> None:
    orders = [check_order(payload(n), max_bytes=LIMIT) for n in range(3)]
    requests = PackedRequests(range(7, 10), [11, 12, 13], [marshal.dumps(order) for order in orders])
    assert [(r.number, r.order_id, r.order) for r in requests] == [
        (7, 11, orders[0]), (8, 12, orders[1]), (9, 13, orders[2])]
    assert requests[1].order is not requests[1].order
    tail = requests[1:]
    assert isinstance(tail, PackedRequests)
    assert [r.number for r in tail] == [8, 9]
    assert len(tail) == 2


def test_the_check_process_claims_asks_for_the_next_at_once_and_keeps_submission_order(
        storage: Storage, process: CheckProcess) -> None:
    """Numbers follow submission order; refused orders take none; the next claim reads on meanwhile."""
    texts: list[str | bytes] = [payload(n) for n in range(500)]
    for position, bad in zip(range(7, 500, 37), BAD * 3, strict=False):
        texts[position] = bad
    ids = submit(storage.path, texts)
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = process
    afters = []
    ask_claim = process.ask_claim

    def spy(after: int, *arguments: object) -> bool:
        afters.append(after)
        return ask_claim(after, *arguments)  # type: ignore[arg-type]

    process.ask_claim = spy  # type: ignore[method-assign,assignment]
    chunks = claim_all(orders)
    valid = [order_id for order_id, text in zip(ids, texts, strict=True) if in_process(text)[0]]
    assert len(valid) == 500 - len(range(7, 500, 37))
    assert paired(storage.path) == list(zip(range(1, len(valid) + 1), valid, strict=True))
    assert process.database == str(storage.path)
    assert afters[0] == 0
    assert any(after > 0 for after in afters)  # asked for on from the last order, before being needed
    requests = [request for chunk in chunks for request in chunk.requests]
    assert [r.order_id for r in requests] == valid
    assert all(r.order == in_process(texts[ids.index(r.order_id or 0)])[1] for r in requests)
    assert all(isinstance(chunk.requests, PackedRequests) for chunk in chunks)
    assert [reason for _, _, reason in storage.rejected_orders()] == [
        in_process(texts[position])[1] for position in range(7, 500, 37)]
    assert orders.rejected_total == len(range(7, 500, 37))


class LocalProcess(CheckProcess):
    """The check process's claims run in this process, on a connection of their own.

    The same :func:`invoicer.checker.answer` as the real process, without the pipe, so that a test can
    act at a chosen point of a claim (which a real process gives no event for).
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, sqlite3.Connection] = {}
        self._request: tuple[object, ...] | None = None
        self._frames: list[object] = []  # what the request made the process say, in order
        self.after = -1  # where the claim under way reads from

    def _send(self, value: object, limit: float, what: str) -> bool:
        self._request = value  # type: ignore[assignment]
        return True

    def _receive(self, limit: float) -> object:
        if not self._frames:
            request, self._request = self._request, None
            assert request is not None
            if request[0] == "claim":
                self.after = request[1]  # type: ignore[assignment]
            said: list[object] = []
            final = answer_request(request, self.state, said.append)
            self._frames = [*said, final]
        return self._frames.pop(0)


@pytest.mark.parametrize("which", ["the first claim", "the claim asked for ahead"])
def test_an_order_deleted_during_a_claim_rolls_it_back_and_keeps_submission_order(
        storage: Storage, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """Another program deletes a waiting order after the claim read it, before the pairing."""
    ids = submit(storage.path, [payload(n) for n in range(400)])
    victim = ids[3] if which == "the first claim" else ids[200]
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders._block = 128
    orders.check_process = local = LocalProcess()
    victim_payload = payload(ids.index(victim)).encode()
    deleted: list[int] = []
    asked_ahead: list[bool] = []

    def delete_then_check(payloads: list[bytes], max_bytes: int) -> list[tuple[object, ...]]:
        if not deleted and victim_payload in payloads:  # read by this claim, which pairs next
            with sqlite3.connect(storage.path) as connection:
                connection.execute("DELETE FROM orders WHERE id = ?", (victim,))
            connection.close()
            deleted.append(victim)
            asked_ahead.append(local.after > 0)
        return verdicts(payloads, max_bytes)

    monkeypatch.setattr("invoicer.checker.verdicts", delete_then_check)
    claim_all(orders)
    assert deleted == [victim]
    assert asked_ahead == [which != "the first claim"]
    left = [order_id for order_id in ids if order_id != victim]
    assert paired(storage.path) == list(zip(range(1, len(left) + 1), left, strict=True))


def test_a_killed_check_process_leaves_the_checks_to_the_daemon(
        storage: Storage, process: CheckProcess, caplog: pytest.LogCaptureFixture) -> None:
    ids = submit(storage.path, [payload(n) for n in range(300)] + [b"{not json"] + [payload(300)])
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = process
    assert orders.take(64) is not None
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        claim_all(orders)
    assert process.ended
    assert "the order check process is not available: it ended" in caplog.text
    valid = ids[:300] + ids[301:]
    assert paired(storage.path) == list(zip(range(1, 302), valid, strict=True))
    assert storage.rejected_orders()[0][0] == ids[300]


def test_the_check_process_outlives_a_stop_signal_and_ends_at_eof(process: CheckProcess) -> None:
    """A stop signals the whole control group (systemd): the check process answers until EOF."""
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    answers = process.check([payload(1)], LIMIT)
    assert answers is not None
    assert answers[0][0] is True
    popen = process._process
    assert popen is not None
    process.close()
    assert popen.returncode == 0


def children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def checker_of(daemon: Daemon, timeout: float = 30.0) -> list[int]:
    """The daemon's one child, its check process, once the claimer thread has started it."""
    deadline = time.monotonic() + timeout
    while not (found := children(daemon.process.pid)):
        assert time.monotonic() < deadline, "no check process"
        time.sleep(0.05)  # polling /proc: the start of a grandchild gives no event to wait on
    assert len(found) == 1
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return  # a zombie: ended, waiting for its parent
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.05)  # polling /proc: a process we did not start gives no event to wait on


def test_a_daemon_whose_check_process_is_killed_invoices_every_order_once(
        tmp_path: Path, start_daemon: StartDaemon) -> None:
    database = tmp_path / "checker.db"
    total = 30_000
    submit_orders(database, [payload(n) for n in range(total)])
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="0", **ORDERS)
    daemon.wait_stored(1)
    checkers = checker_of(daemon)
    os.kill(checkers[0], signal.SIGKILL)
    daemon.wait_stored(total, timeout=120)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    assert "the order check process is not available" in log
    assert len(assert_one_invoice_per_order(database)) == total


def restarting(storage: Storage) -> tuple[OrderSource, list[float]]:
    """An order source that has started its check process, and its clock: ``now[0]``, moved by the test."""
    now = [1_000.0]
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT,
                         clock=lambda: now[0])
    orders._start_check_process()
    return orders, now


def found_ended(orders: OrderSource, process: CheckProcess) -> None:
    """Take orders until the claims find ``process`` gone (those of the block in hand come first)."""
    for _ in range(100):
        if process.ended:
            return
        orders.take(50)
    raise AssertionError("the killed check process was not found gone")


def test_a_killed_check_process_is_started_again_after_a_wait_that_doubles_while_it_keeps_ending(
        storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    """1 s after it ended, then 2 s, 4 s ... up to 60 s while each new one ends within 60 s; then 1 s again.

    Orders are claimed in the daemon meanwhile, and every order is paired once, in submission order.
    """
    ids = submit(storage.path, [payload(n) for n in range(5_000)])
    orders, now = restarting(storage)
    pids = []
    try:
        for wait in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, None):
            process = orders.check_process
            assert process is not None
            assert process.pid is not None, "a check process runs"
            pids.append(process.pid)
            assert orders.take(50) is not None  # claimed by it (or, just after a kill, here)
            if wait is None:
                break
            now[0] += 30.0 if wait < 60.0 else 0.0  # each one ends within 60 s of its start
            os.kill(process.pid, signal.SIGKILL)
            found_ended(orders, process)
            orders._restart_check_process()  # found ended: the wait starts
            now[0] += wait - 0.5
            orders._restart_check_process()
            assert orders.check_process is process, f"not started again before {wait}s"
            assert orders.take(50) is not None  # claimed here meanwhile
            now[0] += 0.7  # the next claim comes a little after the wait: the line says when
            with caplog.at_level(logging.INFO, logger="invoicer"):
                orders._restart_check_process()
            assert orders.check_process is not process
            pid = orders.check_process.pid
            assert f"started again (pid {pid}), {wait + 0.2:.1f}s after a claim found it gone" in caplog.text
        # One that ran longer than 60 s starts the count afresh.
        process = orders.check_process
        assert process is not None
        assert process.pid is not None
        now[0] += 61.0
        os.kill(process.pid, signal.SIGKILL)
        found_ended(orders, process)
        orders._restart_check_process()
        now[0] += 1.0
        orders._restart_check_process()
        restarted = orders.check_process
        assert restarted is not None
        assert restarted is not process
        assert restarted.pid is not None
        claim_all(orders)
    finally:
        assert orders.check_process is not None
        orders.check_process.close()
    assert len(set(pids)) == len(pids)
    assert paired(storage.path) == list(zip(range(1, len(ids) + 1), ids, strict=True))


def test_a_check_process_that_cannot_be_started_again_leaves_the_claims_here_and_waits_longer(
        storage: Storage, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    """Out of file descriptors, say: the claimer goes on in-process (it does not die), and tries later."""
    ids = submit(storage.path, [payload(n) for n in range(500)])
    orders, now = restarting(storage)
    first = orders.check_process
    assert first is not None
    request.addfinalizer(first.close)
    assert first.pid is not None
    assert orders.take(50) is not None
    os.kill(first.pid, signal.SIGKILL)
    found_ended(orders, first)
    orders._restart_check_process()
    now[0] += 1.0

    def no_pipe() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="invoicer"):
        patch.setattr(os, "pipe", no_pipe)
        orders._restart_check_process()
    broken = orders.check_process
    assert broken is not first
    assert broken is not None
    assert broken.ended
    assert "the order check process is not available: it cannot be started ([Errno 24] Too many open " \
           "files)" in caplog.text
    assert orders.take(50) is not None  # claimed here
    orders._restart_check_process()  # found ended: it waits twice as long now
    now[0] += 1.5
    orders._restart_check_process()
    assert orders.check_process is broken
    now[0] += 0.5
    orders._restart_check_process()
    restarted = orders.check_process
    assert restarted is not broken
    assert restarted is not None
    try:
        assert restarted.pid is not None
        claim_all(orders)
        orders.stop()  # none is started during a stop
        os.kill(restarted.pid, signal.SIGKILL)
        found_ended(orders, restarted)
        orders._restart_check_process()
        now[0] += 100.0
        orders._restart_check_process()
        assert orders.check_process is restarted
    finally:
        restarted.close()
    assert paired(storage.path) == list(zip(range(1, len(ids) + 1), ids, strict=True))


def test_a_popen_that_raises_gives_the_check_process_up(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("sys.executable", "/usr/bin/python3\0")  # Popen: ValueError, embedded null byte
    process = CheckProcess()
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        assert not process.start()
    assert process.ended
    assert "not available: it cannot be started (embedded null byte)" in caplog.text


def started_and_ended(process: CheckProcess) -> int | None:
    """Start ``process``, have it check an order; return its exit status (it is expected to end at once)."""
    assert process.start()
    popen = process._process
    assert popen is not None
    try:
        assert process.check([payload(1)], LIMIT) is None  # the daemon checks in-process
        assert process.ended
    finally:
        process.close()
    return popen.returncode


def test_a_check_process_started_on_other_files_than_the_daemons_ends_at_once_saying_so(
        storage: Storage, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """An upgrade replaced invoicer's files under a running daemon: a new check process must not claim.

    The daemon then claims in-process, says why once, and starts no other.
    """
    monkeypatch.setattr("invoicer.checker.SOURCE", "not these files")
    assert started_and_ended(CheckProcess()) == EX_CHANGED
    assert "invoicer's files changed since the daemon started (an upgrade?)" in capfd.readouterr().err
    ids = submit(storage.path, [payload(n) for n in range(300)])
    orders, now = restarting(storage)
    process = orders.check_process
    assert process is not None
    with caplog.at_level(logging.INFO, logger="invoicer"):
        found_ended(orders, process)
        for _ in range(3):
            orders._restart_check_process()
            now[0] += 100.0
    assert orders.check_process is process
    assert caplog.text.count("cannot run the daemon's code") == 1
    assert "was started again" not in caplog.text
    claim_all(orders)
    assert paired(storage.path) == list(zip(range(1, len(ids) + 1), ids, strict=True))


def test_a_check_process_that_finds_another_invoicer_than_the_daemons_ends_at_once_saying_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A path that puts another copy of invoicer first (the daemon's is taken as installed, not added)."""
    package_root = Path(invoicer.checker.__file__).resolve().parents[1]
    shutil.copytree(package_root / "invoicer", tmp_path / "invoicer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr("invoicer.checker._site_directories", lambda: {package_root})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert started_and_ended(CheckProcess()) == EX_CHANGED
    assert (f"this process found invoicer in {tmp_path}, the daemon runs the one in {package_root}"
            in capfd.readouterr().err)


def test_a_daemon_starts_its_killed_check_process_again_and_invoices_every_order_once(
        tmp_path: Path, start_daemon: StartDaemon) -> None:
    database = tmp_path / "restart.db"
    total = 30_000
    submit_orders(database, [payload(n) for n in range(total)])
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="1", **ORDERS)
    daemon.wait_stored(1)
    killed = []
    for _ in range(2):
        deadline = time.monotonic() + 30
        while not (found := [pid for pid in children(daemon.process.pid) if pid not in killed]):
            assert time.monotonic() < deadline, "the check process was not started again"
            time.sleep(0.05)  # polling /proc: the start of a grandchild gives no event to wait on
        killed += found
        os.kill(found[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not [pid for pid in children(daemon.process.pid) if pid not in killed]:
        assert time.monotonic() < deadline, "the check process was not started again"
        time.sleep(0.05)  # as above
    daemon.wait_stored(total, timeout=120)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    assert log.count("the order check process is not available") == 2
    # At the first claim at least 1 s (then 2 s) after a claim found it gone.
    waits = [float(wait) for wait in re.findall(r"started again \(pid \d+\), ([\d.]+)s after a claim found",
                                                 log)]
    assert len(waits) == 2, log
    assert waits[0] >= 1.0
    assert waits[1] >= 2.0
    assert len(assert_one_invoice_per_order(database)) == total


def test_a_stop_signal_to_the_whole_group_drains_and_ends_the_check_process(
        tmp_path: Path, start_daemon: StartDaemon) -> None:
    """As systemd stops a unit: SIGTERM to every process of it; SIGKILL to the daemon leaves none behind."""
    database = tmp_path / "group.db"
    total = 30_000
    submit_orders(database, [payload(n) for n in range(total)])
    daemon = start_daemon(database, prefix=("setsid",), INVOICER_WORKERS="4",
                          INVOICER_PROCESSING_DELAY_MS="0", **ORDERS)
    daemon.wait_stored(500)
    checkers = checker_of(daemon)
    os.killpg(daemon.process.pid, signal.SIGTERM)
    code, log = daemon.wait()
    assert code == 0, log
    assert "the order check process is not available" not in log
    wait_gone(checkers[0])
    daemon = start_daemon(database, INVOICER_PROCESSING_DELAY_MS="0", **ORDERS)
    daemon.wait_stored(2_000)
    checkers = checker_of(daemon)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(30)
    wait_gone(checkers[0])  # its input closed with the daemon
    invoice_to_the_end(start_daemon, database, total, {"INVOICER_PROCESSING_DELAY_MS": "0", **ORDERS})


def test_a_claim_asked_for_ahead_keeps_within_the_byte_budget(
        storage: Storage, process: CheckProcess) -> None:
    """The block just claimed is in flight too: an order larger than what is left waits for room."""
    small = [payload(n) for n in range(64)]
    large = json.dumps({**demo_order(1), "lines": [{"description": "x" * 400, "quantity": 1,
                                                     "unit_price": "1.00", "tax_rate": "0.19"}] * 200})
    submit(storage.path, [*small, large, *(payload(n) for n in range(10))])
    capacity = sum(len(text) for text in small) + 1000
    assert len(large) > 1000
    budget = ByteBudget(capacity)
    orders = OrderSource(storage, 0, budget, check_order, max_order_bytes=LIMIT)
    orders.check_process = process
    first = orders.take(10_000)
    assert first is not None
    assert len(first) == 64
    assert orders.take(10_000) is None  # the large one waits: 64 orders are still in flight
    assert budget.used <= capacity
    sizes = []
    while len(paired(storage.path)) < 75:
        budget.give_back(budget.used)  # the invoices of what was taken are committed
        chunk = orders.take(10_000)
        if chunk is not None:
            sizes.append(len(chunk))
            assert budget.used <= capacity or len(chunk) == 1  # only an order alone goes past the room
    assert sizes[0] == 1  # the large one, by itself, once nothing else was in flight


@pytest.mark.parametrize("when", ["before it opened the database", "while it claims"])
def test_a_check_process_that_stops_answering_is_killed_and_the_daemon_claims(
        storage: Storage, process: CheckProcess, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, when: str) -> None:
    """Stopped (SIGSTOP), it answers nothing more: killed at the deadline, the claims go on here."""
    monkeypatch.setattr("invoicer.checker.ANSWER_S", 0.5)
    total = 3_000
    ids = submit(storage.path, [payload(n) for n in range(total)])
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = process
    pid = process.pid
    assert pid is not None
    if when == "while it claims":
        assert orders.take(10) is not None
        assert orders.asked
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        claim_all(orders)
    assert time.monotonic() - started < CLOSE_TIMEOUT_S  # killed at the deadline, not waited for
    assert re.search(rf"the order check process is not available: it has not answered for [0-9.]+s "
                     rf"\(pid {pid}, killed\)", caplog.text)
    wait_gone(pid)
    assert paired(storage.path) == list(zip(range(1, total + 1), ids, strict=True))


class EndsWhenAsked(LocalProcess):
    """Ends as the claimer asks for the claim after the first: the pipe breaks under the request."""

    def _send(self, value: object, limit: float, what: str) -> bool:
        if value[0] == "claim" and value[1] > 0:  # type: ignore[index]
            self.ended = True
            return False
        return super()._send(value, limit, what)


def test_a_check_process_that_ends_as_the_next_claim_is_asked_for_loses_nothing(storage: Storage) -> None:
    """The claim just answered is handed out; only numbers above it are given back."""
    ids = submit(storage.path, [payload(n) for n in range(300)])
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = EndsWhenAsked()
    chunks = claim_all(orders)
    assert orders.check_process.ended
    assert [number for chunk in chunks for number in chunk] == list(range(1, 301))
    assert paired(storage.path) == list(zip(range(1, 301), ids, strict=True))
    assert storage.recovery_plan().high_water == 300


class Garbles(LocalProcess):
    """Answers its first claim with ``wrong`` in place of one field: as a broken process might."""

    def __init__(self, field: int, wrong: object) -> None:
        super().__init__()
        self.field, self.wrong = field, wrong

    def _receive(self, limit: float) -> object:
        said = super()._receive(limit)
        if type(said) is tuple and said[0] == "claimed" and self.field:
            said = (*said[:self.field], self.wrong, *said[self.field + 1:])
            self.field = 0
        return said


@pytest.mark.parametrize(("field", "wrong"), [(1, "1"), (6, None), (3, [1.5]), (4, ["text"]), (7, 1)])
def test_a_claim_answered_in_the_wrong_shape_gives_the_check_process_up_and_loses_nothing(
        storage: Storage, caplog: pytest.LogCaptureFixture, field: int, wrong: object) -> None:
    ids = submit(storage.path, [payload(n) for n in range(200)])
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = process = Garbles(field, wrong)
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        chunks = claim_all(orders)
    assert process.ended
    assert "an answer with the wrong shape for a claim ('claimed')" in caplog.text
    assert [number for chunk in chunks for number in chunk] == list(range(1, 201))
    assert paired(storage.path) == list(zip(range(1, 201), ids, strict=True))


def test_a_claim_the_check_process_paired_and_never_told_is_given_back(
        storage: Storage, process: CheckProcess, caplog: pytest.LogCaptureFixture) -> None:
    """It committed the claim asked for ahead, then died before the answer was read: nothing is lost."""
    ids = submit(storage.path, [payload(n) for n in range(1_000)])
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = process
    first = orders.take(10_000)
    assert first is not None
    assert orders.asked
    lost = process.claimed()  # the answer the claimer never reads: the claim is committed by now
    assert lost is not None
    assert lost[0] == "claimed"
    assert lost[1] == first.numbers[-1] + 1
    assert len(pairs(storage.path)) == len(first) + len(lost[3])
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        chunks = [first, *claim_all(orders)]
    assert "the order check process is not available: it ended" in caplog.text
    assert paired(storage.path) == list(zip(range(1, 1_001), ids, strict=True))
    assert [number for chunk in chunks for number in chunk] == list(range(1, 1_001))
    assert storage.recovery_plan().high_water == 1_000


def on_a_fake_clock(storage: Storage, process: CheckProcess) -> OrderSource:
    """An order source claiming through ``process``, whose clock says 3 s more at each look."""
    now = iter(range(1_000, 4_000, 3))
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT,
                         clock=lambda: float(next(now)))
    orders.check_process = process
    return orders


@contextlib.contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """Hold the database's write lock from another connection, as a program in a transaction does."""
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.mark.parametrize("patient", [True, False])
def test_another_programs_write_lock_is_waited_out_by_a_claim_in_the_check_process(
        storage: Storage, process: CheckProcess, caplog: pytest.LogCaptureFixture, patient: bool) -> None:
    """Held past the busy timeout: a running daemon warns and asks again, one starting or draining gives up.

    The check process gives up on the lock after CLAIM_BUSY_S (1 s, real); the claimer's clock (fake) says
    how long the lock has lasted, 3 s more at each look.
    """
    ids = submit(storage.path, [payload(n) for n in range(100)])
    orders = on_a_fake_clock(storage, process)
    storage.patient = patient
    with write_lock(storage.path), caplog.at_level(logging.WARNING, logger="invoicer"):
        assert orders.take(10_000) is None  # 1 s of the lock: asked again, nothing said
        assert "locked" not in caplog.text
        assert not orders.idle  # orders wait: STATUS must not say idle
        assert orders._locked_since == 999  # the health check counts the claim as under way since then
        assert orders.take(10_000) is None  # 4 s of it by the fake clock: still quiet
        if not patient:  # 7 s: past the busy timeout
            with pytest.raises(StorageError, match="is locked by another program and stayed locked"):
                orders.take(10_000)
            return
        assert orders.take(10_000) is None  # 7 s: said once
    assert re.findall(r"database .* is locked by another program \(([0-9]+)s so far\); still waiting",
                      caplog.text) == ["7"]
    assert not process.ended
    claim_all(orders)
    assert orders._locked_since is None
    assert paired(storage.path) == list(zip(range(1, 101), ids, strict=True))


def test_a_lock_met_before_the_check_process_ends_is_forgotten_with_it(
        storage: Storage, process: CheckProcess) -> None:
    """Claims made here afterwards must not count as held up since then (a stall reported forever)."""
    ids = submit(storage.path, [payload(n) for n in range(100)])
    orders = on_a_fake_clock(storage, process)
    storage.patient = True
    with write_lock(storage.path):
        assert orders.take(10_000) is None
    assert orders._locked_since is not None
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    claim_all(orders)
    assert process.ended
    assert orders._locked_since is None
    assert paired(storage.path) == list(zip(range(1, 101), ids, strict=True))


def test_a_claim_that_fails_in_the_check_process_fails_as_one_made_here(storage: Storage) -> None:
    """What SQLite said in the check process becomes the daemon's one-line StorageError and exit code."""
    with pytest.raises(StorageError, match=r"is locked by another program and stayed locked") as locked:
        storage.claim_failed("database is locked", "SQLITE_BUSY")  # not patient: starting or draining
    assert locked.value.exit_code == EX_TEMPFAIL
    with pytest.raises(StorageError, match=r"the disk is full while claiming orders"):
        storage.claim_failed("database or disk is full", "SQLITE_FULL")


def test_the_refusals_in_a_claim_asked_for_ahead_are_logged_at_a_stop(
        storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    """The claim under way in the check process at a stop is committed; its refusals are said, once."""
    texts: list[str | bytes] = [payload(n) for n in range(3_000)]
    for position in range(25, 3_000, 50):
        texts[position] = b"{not json"
    ids = submit(storage.path, texts)
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        orders.start()  # the claimer thread, with a check process of its own
        taken = None
        while taken is None:
            taken = orders.take(64)  # waits for the claimer, IDLE_POLL_S at a time
        orders.stop()
        assert orders.join(30)
    storage.release(orders.last_issued)  # as the drain does
    rejected = [order_id for order_id, _, _ in storage.rejected_orders()]
    assert rejected[:3] == [ids[25], ids[75], ids[125]]  # the claim asked for ahead was made and answered
    logged = [int(found) for found in re.findall(r"order (\d+) rejected before numbering", caplog.text)]
    assert logged == rejected
    assert orders.rejected_total == len(rejected)
    assert orders.check_process is not None
    assert orders.check_process.ended is False  # closed at the stop, not given up
    valid = [order_id for order_id, text in zip(ids, texts, strict=True) if text != b"{not json"]
    assert paired(storage.path) == list(zip(range(1, len(taken) + 1), valid[:len(taken)], strict=True))


def test_after_a_stop_no_claim_is_asked_for_and_a_hung_one_is_waited_for_briefly(
        storage: Storage, process: CheckProcess, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("invoicer.intake.ANSWER_S", 0.5)
    submit(storage.path, [payload(n) for n in range(1_000)])
    orders = OrderSource(storage, 0, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    orders.check_process = process
    assert orders.take(64) is not None  # the first claim, and the next asked for
    orders.stop()
    asked: list[object] = []
    ask_claim = process.ask_claim

    def spy(*arguments: object) -> bool:
        asked.append(arguments)
        return ask_claim(*arguments)  # type: ignore[arg-type]

    process.ask_claim = spy  # type: ignore[method-assign,assignment]
    assert orders.take(64) is not None  # the claim asked for before the stop is taken ...
    assert not asked  # ... and no other asked for
    assert not orders.asked
    orders.asked = True  # as if one were under way: the process hangs
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        orders._settle()
    assert time.monotonic() - started < 2.0  # not the whole claim deadline
    assert "the order check process did not answer at the stop" in caplog.text
    assert "in the daemon's own process meanwhile" not in caplog.text
    wait_gone(pid)


def test_a_check_process_that_takes_no_orders_is_killed_at_the_deadline(
        process: CheckProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Checks only (PostgreSQL): stopped, it takes nothing; orders larger than the pipe must not wait."""
    monkeypatch.setattr("invoicer.checker.ANSWER_S", 0.5)
    payloads: list[bytes | str] = [payload(n) for n in range(4_000)]  # 1.4 MB: more than the pipe holds
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        assert process.check(payloads, LIMIT) is None
    assert time.monotonic() - started < CLOSE_TIMEOUT_S
    assert re.search(rf"the order check process is not available: it has not taken a claim's orders for "
                     rf"[0-9.]+s \(pid {pid}, killed\)", caplog.text)
    assert process.ended
    wait_gone(pid)


def test_the_check_process_imports_this_invoicer_whatever_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A json.py (or an invoicer/) where the daemon was started is not what the check process imports."""
    (tmp_path / "json.py").write_text("print('garbage on stdout')\nraise SystemExit(3)\n")
    # What the process prints, at import or later, goes to stderr, never among the answers.
    (tmp_path / "sitecustomize.py").write_text("import os\nos.write(1, b'junk from sitecustomize')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import os\nos.write(1, b'\\xff' * 64)\n")
    (tmp_path / "invoicer").mkdir()
    (tmp_path / "invoicer" / "__init__.py").write_text("raise SystemExit(4)\n")
    monkeypatch.chdir(tmp_path)
    started = CheckProcess()
    assert started.start()
    try:
        answers = started.check([payload(1), b"{not json"], LIMIT)
    finally:
        started.close()
    assert answers is not None
    assert [answer[0] for answer in answers] == [True, False]

"""A FUSE passthrough that behaves like a disk with a volatile write cache, for power-loss tests.

Data written to a file is visible through the mount at once but reaches the backing file only when that
file is fsync'ed or fdatasync'ed (both flush the file's data and its size). Metadata operations (create,
unlink, rename, truncate, mkdir, chmod, utimens...) go to the backing directory at once, as on a file
system whose journal commits metadata eagerly; a truncate also drops the cached data beyond the new size.
A write that extends a file makes reads and stat see the new size at once; the backing file keeps its old
size until the sync. Dirty data lives in whole 4 KiB blocks per file (keyed by the backing inode, so
renames and hard links keep it); the last write of each file since its last sync is remembered for tearing.

Commands arrive on a unix socket, one line each, answered by one JSON line (``FaultClient``, or
``python -m tests.faultfs ctl SOCKET COMMAND...`` from a shell):

``stats``
    counters (fsyncs, writes, failed fsyncs, fsyncs waiting on a freeze) and dirty bytes per file.
``cut [tear=all|NAME,...] [keep=BYTES] [sector=512] [seed=N]``
    power loss: every unsynced write is dropped at once; for the files named in ``tear`` a prefix of
    their last write, a multiple of ``sector`` bytes (``keep`` rounded down, else a random one shorter
    than the write), reaches the backing file first. Afterwards every operation fails with EIO.
``freeze [after=N]`` / ``thaw``
    fsync and fdatasync block until thawed (a stalled disk); reads, and writes to other files, go on
    (the kernel holds a file's inode lock through its fsync, so writes to that very file wait too).
    With ``after=N`` the next N fsyncs still pass and the freeze starts at the one after them.
``fail fsync|write [after=N]`` / ``heal``
    fsync fails with EIO and drops that file's dirty data ("fsyncgate": no retry), or writes fail with
    ENOSPC; ``heal`` ends both. ``after=N`` counts fsyncs as for ``freeze``.

Run ``python -m tests.faultfs serve BACKING MOUNT SOCKET``; it prints ``ready`` once the kernel has
initialised the mount, and unmounts on SIGTERM or SIGINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import random
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

BLOCK = 4096
P = ParamSpec("P")
R = TypeVar("R")
STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")


@dataclasses.dataclass
class CachedFile:
    """One backing file as the volatile cache sees it."""

    fd: int  # O_RDWR on the backing file, owned by this entry: reads of clean data, syncs, tears
    name: str  # the last path it was opened or renamed under, for stats and ``tear=NAME``
    size: int  # the size reads and stat see; the backing file catches up at the next sync
    blocks: dict[int, bytearray] = dataclasses.field(default_factory=dict)
    last_write: tuple[int, bytes] | None = None  # since the last sync: what a tear applies a prefix of
    dirty: int = 0  # bytes written since the last sync
    handles: int = 0


def _refused(errno_: int) -> OSError:
    return OSError(errno_, os.strerror(errno_))


def _alive(method: Callable[Concatenate[FaultFS, P], R]) -> Callable[Concatenate[FaultFS, P], R]:
    """After a cut the disk is gone: every operation fails with EIO until unmounted."""
    @functools.wraps(method)
    def guarded(self: FaultFS, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.cut_done:
            raise _refused(errno.EIO)
        return method(self, *args, **kwargs)
    return guarded


class FaultFS:
    """The mfusepy operations: a passthrough to ``backing`` with a write cache and injectable faults."""

    use_ns = True  # utimens gets nanoseconds (mfusepy warns otherwise)

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        # Rule: _state guards every field below and the backing files' contents; each FUSE worker thread
        # and the control thread take it for one operation. Only a frozen fsync waits on it (wait_for
        # releases it), so reads and writes go on during a freeze.
        self._state = threading.Condition()
        self._files: dict[int, CachedFile] = {}  # by backing inode
        self._handles: dict[int, int] = {}  # FUSE file handle -> backing inode
        self._next_handle = 1
        self.cut_done = False
        self.frozen = False
        self.failing: set[str] = set()
        self.armed: dict[str, int] = {}  # a fault (freeze, fsync, write) -> fsyncs to let pass before it
        self.counters = {"fsyncs": 0, "fsync_failures": 0, "writes": 0, "waiting": 0}

    def _path(self, path: str) -> str:
        return str(self.backing) + path

    def init(self, path: str) -> None:
        """The kernel answered FUSE_INIT: the mount is up."""
        print("ready", flush=True)

    # -- the cache ---------------------------------------------------------------------------------

    def _entry(self, fh: int) -> CachedFile:
        return self._files[self._handles[fh]]

    def _block(self, entry: CachedFile, index: int) -> bytearray:
        """The dirty copy of a block, read from the backing file (zeros past its end) on first touch."""
        if index not in entry.blocks:
            data = os.pread(entry.fd, BLOCK, index * BLOCK)
            entry.blocks[index] = bytearray(data.ljust(BLOCK, b"\0"))
        return entry.blocks[index]

    def _shrink(self, entry: CachedFile, length: int) -> None:
        """Drop cached data past ``length``; the zeroed tail keeps a later extension reading zeros."""
        for index in [i for i in entry.blocks if i * BLOCK >= length]:
            del entry.blocks[index]
        if length % BLOCK and length // BLOCK in entry.blocks:
            entry.blocks[length // BLOCK][length % BLOCK:] = bytes(BLOCK - length % BLOCK)
        if entry.last_write is not None:
            offset, data = entry.last_write
            entry.last_write = (offset, data[:max(0, length - offset)]) if offset < length else None

    def _flush(self, entry: CachedFile) -> None:
        """Write the dirty blocks and the size to the backing file and sync it."""
        for index, block in sorted(entry.blocks.items()):
            os.pwrite(entry.fd, block[:max(0, min(BLOCK, entry.size - index * BLOCK))], index * BLOCK)
        if os.fstat(entry.fd).st_size != entry.size:
            os.ftruncate(entry.fd, entry.size)
        os.fsync(entry.fd)
        self._forget(entry)

    def _forget(self, entry: CachedFile) -> None:
        """Drop the dirty data: the file is what the backing file holds."""
        entry.blocks.clear()
        entry.last_write = None
        entry.dirty = 0
        entry.size = os.fstat(entry.fd).st_size

    def _release_if_unused(self, inode: int) -> None:
        """Close an entry nobody has open that holds no dirty data, or whose file is gone."""
        entry = self._files.get(inode)
        if entry is not None and not entry.handles and (not entry.blocks or not os.fstat(entry.fd).st_nlink):
            os.close(entry.fd)
            del self._files[inode]

    def _open_handle(self, path: str, fresh: bool) -> int:
        """A FUSE handle on ``path``, sharing its inode's cache entry."""
        fd = os.open(self._path(path), os.O_RDWR)
        inode = os.fstat(fd).st_ino
        if fresh and inode in self._files:  # a reused inode number: its old dirty data is not this file's
            self._files[inode].handles = 0
            self._files[inode].blocks.clear()
            self._release_if_unused(inode)
        if inode in self._files:
            os.close(fd)
            entry = self._files[inode]
            entry.name = path
        else:
            entry = self._files[inode] = CachedFile(fd, path, os.fstat(fd).st_size)
        entry.handles += 1
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self._handles[handle] = inode
        return handle

    # -- files -------------------------------------------------------------------------------------

    @_alive
    def create(self, path: str, mode: int, flags: int) -> int:
        """Create the backing file at once (metadata is immediate) and open it."""
        with self._state:
            try:
                os.close(os.open(self._path(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
                fresh = True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fresh = False
            handle = self._open_handle(path, fresh)
            if flags & os.O_TRUNC:
                self._truncate(self._entry(handle), 0)
            return handle

    @_alive
    def open(self, path: str, flags: int) -> int:
        """Open through the cache entry of the backing inode."""
        with self._state:
            handle = self._open_handle(path, fresh=False)
            if flags & os.O_TRUNC:
                self._truncate(self._entry(handle), 0)
            return handle

    @_alive
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        """The backing file's bytes, overlaid with the dirty blocks, up to the cached size."""
        with self._state:
            entry = self._entry(fh)
            end = min(offset + size, entry.size)
            if offset >= end:
                return b""
            data = bytearray(os.pread(entry.fd, end - offset, offset).ljust(end - offset, b"\0"))
            for index in range(offset // BLOCK, (end - 1) // BLOCK + 1):
                block = entry.blocks.get(index)
                if block is not None:
                    start = max(offset, index * BLOCK)
                    stop = min(end, (index + 1) * BLOCK)
                    data[start - offset:stop - offset] = block[start - index * BLOCK:stop - index * BLOCK]
            return bytes(data)

    @_alive
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        """Put the bytes in the cache only; the size grows at once for reads and stat."""
        with self._state:
            if "write" in self.failing:
                raise _refused(errno.ENOSPC)
            entry = self._entry(fh)
            position = offset
            while position < offset + len(data):
                index, within = divmod(position, BLOCK)
                count = min(BLOCK - within, offset + len(data) - position)
                start = position - offset
                self._block(entry, index)[within:within + count] = data[start:start + count]
                position += count
            entry.size = max(entry.size, offset + len(data))
            entry.last_write = (offset, bytes(data))
            entry.dirty += len(data)
            self.counters["writes"] += 1
            return len(data)

    def _truncate(self, entry: CachedFile, length: int) -> None:
        os.ftruncate(entry.fd, length)
        self._shrink(entry, length)
        entry.size = length

    @_alive
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        """Truncate the backing file at once, dropping cached data past the new end."""
        with self._state:
            if fh is not None:
                self._truncate(self._entry(fh), length)
                return
            inode = os.stat(self._path(path)).st_ino
            if inode in self._files:
                self._truncate(self._files[inode], length)
            else:
                os.truncate(self._path(path), length)

    @_alive
    def fsync(self, path: str, datasync: int, fh: int) -> None:
        """Flush this file's dirty data to the backing file, unless frozen (wait) or failing (EIO)."""
        with self._state:
            self._arm()
            self.counters["waiting"] += 1
            self._state.wait_for(lambda: not self.frozen or self.cut_done)
            self.counters["waiting"] -= 1
            if self.cut_done:
                raise _refused(errno.EIO)
            self.counters["fsyncs"] += 1
            entry = self._entry(fh)
            if "fsync" in self.failing:
                self.counters["fsync_failures"] += 1
                self._forget(entry)  # like Linux after a failed writeback: the pages are clean, the data gone
                raise _refused(errno.EIO)
            self._flush(entry)

    def _arm(self) -> None:
        """Start each armed fault whose count of fsyncs to let pass has run out; count the others down."""
        for fault, left in list(self.armed.items()):
            if left:
                self.armed[fault] = left - 1
                continue
            del self.armed[fault]
            if fault == "freeze":
                self.frozen = True
            else:
                self.failing.add(fault)

    @_alive
    def flush(self, path: str, fh: int) -> None:
        """Closing a descriptor does not sync, as on a real disk."""

    def release(self, path: str, fh: int) -> None:
        """The last descriptor on a handle is closed; the dirty data stays cached."""
        with self._state:
            inode = self._handles.pop(fh)
            self._files[inode].handles -= 1
            self._release_if_unused(inode)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        """The backing file's attributes with the cached size."""
        if self.cut_done:
            raise _refused(errno.EIO)
        with self._state:
            st = os.fstat(self._entry(fh).fd) if fh is not None else os.lstat(self._path(path))
            attributes = {field: getattr(st, field) for field in STAT_FIELDS}
            attributes.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            if st.st_ino in self._files:
                attributes["st_size"] = self._files[st.st_ino].size
            return attributes

    # -- metadata, immediate on the backing directory ---------------------------------------------

    @_alive
    def unlink(self, path: str) -> None:
        """Remove at once; a file nobody has open loses its cached data with it."""
        with self._state:
            inode = os.lstat(self._path(path)).st_ino
            os.unlink(self._path(path))
            self._release_if_unused(inode)

    @_alive
    def rename(self, old: str, new: str) -> None:
        """Rename at once; the cache follows the inode."""
        with self._state:
            replaced = os.lstat(self._path(new)).st_ino if os.path.lexists(self._path(new)) else None
            os.rename(self._path(old), self._path(new))
            moved = os.lstat(self._path(new)).st_ino
            if moved in self._files:
                self._files[moved].name = new
            if replaced is not None and replaced != moved:
                self._release_if_unused(replaced)

    @_alive
    def mkdir(self, path: str, mode: int) -> None:
        """Make the directory at once."""
        os.mkdir(self._path(path), mode)

    @_alive
    def rmdir(self, path: str) -> None:
        """Remove the directory at once."""
        os.rmdir(self._path(path))

    @_alive
    def chmod(self, path: str, mode: int) -> None:
        """Change the mode at once."""
        os.chmod(self._path(path), mode)

    @_alive
    def chown(self, path: str, uid: int, gid: int) -> None:
        """Change the owner at once."""
        os.chown(self._path(path), uid, gid, follow_symlinks=False)

    @_alive
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        """Set the times at once."""
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=times)

    @_alive
    def symlink(self, target: str, source: str) -> None:
        """Make the symbolic link at once."""
        os.symlink(source, self._path(target))

    @_alive
    def link(self, target: str, source: str) -> None:
        """Make the hard link at once."""
        os.link(self._path(source), self._path(target))

    @_alive
    def readlink(self, path: str) -> str:
        """Read the link."""
        return os.readlink(self._path(path))

    @_alive
    def readdir(self, path: str, fh: int) -> list[str]:
        """List the backing directory."""
        return [".", "..", *os.listdir(self._path(path))]

    @_alive
    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        """Nothing to do: metadata is never cached."""

    @_alive
    def statfs(self, path: str) -> dict[str, int]:
        """The backing file system's figures."""
        st = os.statvfs(self._path(path))
        return {name: getattr(st, name) for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                                     "f_bavail", "f_files", "f_ffree", "f_namemax")}

    # -- commands ----------------------------------------------------------------------------------

    def command(self, line: str) -> dict[str, Any]:
        """Carry out one control command (see the module docstring) and describe the outcome."""
        words = line.split()
        name, options = (words[0] if words else ""), dict(w.split("=", 1) for w in words[1:] if "=" in w)
        with self._state:
            if name == "stats":
                return {**self.counters, "frozen": self.frozen, "cut": self.cut_done,
                        "failing": sorted(self.failing), "armed": dict(self.armed),
                        "dirty": {e.name: e.dirty for e in self._files.values() if e.blocks}}
            if name == "cut":
                return {"torn": self._cut(options)}
            fault = "freeze" if name == "freeze" else words[1] if name == "fail" and len(words) > 1 else ""
            if fault and "after" in options:
                self.armed[fault] = int(options["after"])
            elif name in ("freeze", "thaw"):
                self.frozen = name == "freeze"
                self.armed.pop("freeze", None)
            elif name == "fail" and fault in ("fsync", "write"):
                self.failing.add(fault)
            elif name == "heal":
                self.failing.clear()
                self.armed = {k: v for k, v in self.armed.items() if k == "freeze"}
            else:
                return {"error": f"unknown command {line!r}"}
            self._state.notify_all()
            return {"ok": True}

    def _cut(self, options: dict[str, str]) -> dict[str, dict[str, int]]:
        """Lose every unsynced write, after the chosen files' last writes reached the disk in part."""
        sector = int(options.get("sector", "512"))
        chooser = random.Random(options.get("seed"))
        tear = options.get("tear", "")
        torn: dict[str, dict[str, int]] = {}
        for entry in self._files.values():
            if entry.last_write is None or not (tear == "all" or entry.name in tear.split(",")):
                continue
            offset, data = entry.last_write
            if "keep" in options:
                kept = min(int(options["keep"]), len(data)) // sector * sector
            else:  # a torn write: a whole number of sectors, fewer than all of it
                kept = chooser.randrange(0, max(1, -(-len(data) // sector))) * sector
            if kept:
                os.pwrite(entry.fd, data[:kept], offset)
                os.fsync(entry.fd)
            torn[entry.name] = {"offset": offset, "length": len(data), "kept": kept}
        for entry in self._files.values():
            entry.blocks.clear()
        self.cut_done = True
        self._state.notify_all()  # frozen fsyncs wake up to fail
        return torn


class ControlServer:
    """The unix socket that carries commands to a ``FaultFS``: one line in, one JSON line out."""

    def __init__(self, filesystem: FaultFS, path: Path) -> None:
        self._filesystem = filesystem
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(str(path))
        self._socket.listen()
        self._thread = threading.Thread(target=self._serve, name="faultfs-control", daemon=True)

    def start(self) -> None:
        """Answer commands on a background thread."""
        self._thread.start()

    def _serve(self) -> None:
        while True:
            connection, _ = self._socket.accept()
            with connection, connection.makefile("rw") as stream:
                try:
                    reply = self._filesystem.command(stream.readline())
                except (OSError, ValueError) as exc:
                    reply = {"error": str(exc)}
                stream.write(json.dumps(reply) + "\n")


class FaultClient:
    """Sends commands to a running faultfs over its control socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, command: str) -> dict[str, Any]:
        """Send one command line; return the reply, raising on an error reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(30)
            connection.connect(str(self.path))
            with connection.makefile("rw") as stream:
                stream.write(command + "\n")
                stream.flush()
                reply: dict[str, Any] = json.loads(stream.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def stats(self) -> dict[str, Any]:
        """Counters and dirty bytes per file."""
        return self.send("stats")

    def cut(self, tear: str = "", keep: int | None = None, sector: int = 512,
            seed: int | None = None) -> dict[str, dict[str, int]]:
        """Power loss; return, per torn file, the last write's offset, length and the bytes kept."""
        words = ["cut", f"sector={sector}"]
        words += [f"tear={tear}"] if tear else []
        words += [f"keep={keep}"] if keep is not None else []
        words += [f"seed={seed}"] if seed is not None else []
        torn: dict[str, dict[str, int]] = self.send(" ".join(words))["torn"]
        return torn

    def freeze(self, after: int | None = None) -> None:
        """Make every fsync block until ``thaw`` (from the one after the next ``after`` fsyncs)."""
        self.send("freeze" if after is None else f"freeze after={after}")

    def thaw(self) -> None:
        """Let blocked and later fsyncs go on."""
        self.send("thaw")

    def fail(self, what: str, after: int | None = None) -> None:
        """Make ``fsync`` fail with EIO (dropping its data) or ``write`` with ENOSPC, after ``after``."""
        self.send(f"fail {what}" if after is None else f"fail {what} after={after}")

    def heal(self) -> None:
        """End every ``fail``."""
        self.send("heal")


def serve(backing: Path, mount: Path, control: Path, debug: bool = False) -> None:
    """Mount ``backing`` at ``mount`` in the foreground until unmounted or signalled."""
    import mfusepy

    filesystem = FaultFS(backing.resolve())
    ControlServer(filesystem, control).start()
    # No kernel caching of attributes or names: stat must always see the cache's size, and a cut or a
    # dropped fsync must show at once. The page cache is invalidated on each open (no keep_cache), and
    # mmap of the -shm file works because there is no direct_io. POSIX locks are left to the kernel
    # (no lock callback), which is exact as every locker goes through this one mount.
    mfusepy.FUSE(filesystem, str(mount), foreground=True, debug=debug, allow_other=True,
                 default_permissions=True, attr_timeout=0, entry_timeout=0, negative_timeout=0,
                 fsname="faultfs", subtype="faultfs")


def main(argv: list[str]) -> int:
    """``serve BACKING MOUNT SOCKET [--debug]`` or ``ctl SOCKET COMMAND...``."""
    if len(argv) >= 4 and argv[0] == "serve":
        serve(Path(argv[1]), Path(argv[2]), Path(argv[3]), debug="--debug" in argv[4:])
        return 0
    if len(argv) >= 3 and argv[0] == "ctl":
        try:
            print(json.dumps(FaultClient(Path(argv[1])).send(" ".join(argv[2:]))))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))

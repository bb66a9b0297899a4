"""Where snapshots live: a local directory, or any fsspec filesystem URL.

The contract every store meets (and ``tests/test_snapshot_stores.py`` checks for
each): ``list``, ``read``, ``write_atomic`` (all or nothing, durable on return),
``append`` (durable on return), ``delete``, ``clear`` and ``acquire_lease``.

* :class:`LocalStore` -- a directory. Atomic writes are a temp file in the same
  directory, fsync, rename, fsync of the directory. The lease is an ``flock`` on
  ``lease``: the OS drops it when the holder dies, so a crashed supervisor never
  blocks its successor.
* :class:`FsspecStore` -- ``file://``, ``s3://``, ``gs://``... via fsspec. Atomic
  writes go to a temp object, then move into place; appends are numbered part
  objects (object stores cannot append). The lease is a record with an expiry that
  its holder renews; a successor waits until it expires. Without conditional writes
  on the store, two supervisors starting at the same instant could both take it:
  the lease guards against a second pool started later, not against a race.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from typing import Any

from .errors import LeaseHeld, SnapshotError

LEASE = "lease"


def holder_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "id": secrets.token_hex(4)}


def describe_holder(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}"


class Lease:
    def __init__(self, store: "Store", info: dict[str, Any], fd: int | None = None) -> None:
        self.store, self.info, self._fd = store, info, fd

    def renew(self) -> None:
        self.store._renew_lease(self)

    def release(self) -> None:
        self.store._release_lease(self)


class Store:
    """The contract; see the module docstring."""

    location: str
    local_disk = False  # appends cost ~0.1 ms (a local file), not a network round trip

    def list(self) -> list[str]: ...
    def children(self) -> list[str]: ...  # locations of the directories inside this one
    def read(self, name: str) -> bytes: ...
    def write_atomic(self, name: str, data: bytes) -> None: ...
    def append(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...
    def acquire_lease(self, ttl_s: float, owner: str | None = None) -> Lease: ...
    def _renew_lease(self, lease: Lease) -> None: ...
    def _release_lease(self, lease: Lease) -> None: ...

    def remove_partial(self) -> None:
        """Delete temp files left by writes that a crash interrupted (lease holder only)."""

    def clear(self, keep: tuple[str, ...] = (LEASE,)) -> None:
        # Directories inside (an older history set aside there) are not this history's.
        inside = {c.rstrip("/").rsplit("/", 1)[-1] for c in self.children() or ()}
        for name in self.list():
            if name not in keep and name not in inside:
                self.delete(name)

    def close(self) -> None:
        pass


class LocalStore(Store):
    local_disk = True

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, create: bool = True) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.location = self.path
        self.fsync = fsync
        self._fds: dict[str, int] = {}
        if not create:  # read-only use (ls, show, finding a pool): never make directories
            return
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(self.path, f"cannot create the snapshot directory: {exc.strerror}; "
                                           "set snapshot_dir to a writable directory") from None
        if not os.access(self.path, os.W_OK):
            raise SnapshotError(self.path, "the snapshot directory is not writable; set snapshot_dir "
                                           "to a writable directory")

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _sync_dir(self) -> None:
        if self.fsync:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def list(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if not n.startswith("."))

    def children(self) -> list[str]:
        return [os.path.join(self.path, n) for n in self.list() if os.path.isdir(self._p(n))]

    def remove_partial(self) -> None:
        for n in os.listdir(self.path):
            if n.startswith(".") and ".tmp-" in n:
                os.unlink(self._p(n))

    def read(self, name: str) -> bytes:
        with open(self._p(name), "rb") as fh:
            return fh.read()

    def write_atomic(self, name: str, data: bytes) -> None:
        tmp = self._p(f".{name}.tmp-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self._p(name))
        self._sync_dir()

    def append(self, name: str, data: bytes) -> None:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self._p(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fds[name] = fd
            self._sync_dir()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if self.fsync:
            os.fdatasync(fd)

    def delete(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self._p(name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def acquire_lease(self, ttl_s: float, owner: str | None = None) -> Lease:
        import fcntl

        fd = os.open(self._p(LEASE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = describe_holder(json.loads(os.pread(fd, 4096, 0) or b"{}"))
            except ValueError:
                holder = "an unknown holder"
            os.close(fd)
            raise LeaseHeld(self.path, holder) from None
        info = holder_info()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return Lease(self, info, fd)

    def _renew_lease(self, lease: Lease) -> None:
        pass  # the flock lasts as long as the process

    def _release_lease(self, lease: Lease) -> None:
        if lease._fd is not None:
            os.close(lease._fd)  # closing drops the flock
            lease._fd = None


class FsspecStore(Store):
    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            import fsspec
        except ImportError:
            raise SnapshotError(url, "snapshot URLs need fsspec: pip install fsspec "
                                     "(plus s3fs or gcsfs for s3:// or gs://)") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise SnapshotError(url, f"cannot open this snapshot URL: {exc}; check snapshot_dir") from None
        self.location = url.rstrip("/")
        self.root = self.root.rstrip("/")
        self._parts: dict[str, int] = {}
        if create:
            self.fs.makedirs(self.root, exist_ok=True)

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _names(self) -> list[str]:
        if not self.fs.isdir(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def children(self) -> list[str]:
        return [f"{self.location}/{n}" for n in self._names()
                if not n.startswith(".") and self.fs.isdir(self._p(n))]

    def list(self) -> list[str]:
        out = set()
        for n in self._names():
            if n.startswith("."):
                continue
            base, _, part = n.rpartition(".part-")
            out.add(base if base and part.isdigit() else n)
        return sorted(out)

    def remove_partial(self) -> None:
        for n in self._names():
            if n.startswith(".") and ".tmp-" in n:
                self.fs.rm_file(self._p(n))

    def _parts_of(self, name: str) -> list[str]:
        prefix = f"{name}.part-"
        return sorted(n for n in self._names() if n.startswith(prefix))

    def read(self, name: str) -> bytes:
        parts = self._parts_of(name)
        if parts:
            return b"".join(self.fs.cat_file(self._p(p)) for p in parts)
        return self.fs.cat_file(self._p(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        tmp = self._p(f".{name}.tmp-{secrets.token_hex(4)}")
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self._p(name))

    def append(self, name: str, data: bytes) -> None:
        n = self._parts.get(name)
        if n is None:
            parts = self._parts_of(name)
            n = int(parts[-1].rsplit("-", 1)[1]) + 1 if parts else 0
        self.fs.pipe_file(self._p(f"{name}.part-{n:08d}"), data)
        self._parts[name] = n + 1

    def delete(self, name: str) -> None:
        self._parts.pop(name, None)
        for n in self._parts_of(name) or [name]:
            try:
                self.fs.rm_file(self._p(n))
            except FileNotFoundError:
                pass

    def acquire_lease(self, ttl_s: float, owner: str | None = None) -> Lease:
        """Take the lease once it is free or expired -- waiting up to ``ttl_s`` for a
        crashed holder's lease to run out -- or at once if ``owner`` held it (the same
        supervisor, restarted by Ray)."""
        deadline = time.time() + ttl_s + 1
        while True:
            now = time.time()
            try:
                current = json.loads(self.fs.cat_file(self._p(LEASE)))
            except (FileNotFoundError, ValueError):
                current = None
            free = not current or current.get("expires_at", 0) <= now
            if free or (owner is not None and current.get("owner") == owner):
                break
            if now >= deadline:
                raise LeaseHeld(self.location, describe_holder(current)
                                + f", lease renewed until {current['expires_at'] - now:.0f}s from now")
            time.sleep(0.5)
        lease = Lease(self, {**holder_info(), "ttl_s": ttl_s, "owner": owner})
        self._renew_lease(lease)
        return lease

    def _renew_lease(self, lease: Lease) -> None:
        lease.info["expires_at"] = time.time() + lease.info["ttl_s"]
        self.fs.pipe_file(self._p(LEASE), json.dumps(lease.info).encode())

    def _release_lease(self, lease: Lease) -> None:
        try:
            self.fs.rm_file(self._p(LEASE))
        except FileNotFoundError:
            pass


def open_store(location: str, *, fsync: bool = True, create: bool = True) -> Store:
    """A plain path opens a :class:`LocalStore`; a URL (``scheme://``) an :class:`FsspecStore`.

    ``create=False`` is for reading: a missing location then lists as empty."""
    if "://" in location:
        return FsspecStore(location, create=create)
    return LocalStore(location, fsync=fsync, create=create)

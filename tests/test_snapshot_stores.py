"""Every snapshot store meets one contract: the local directory and fsspec URLs alike."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from threadbound.snapshots import FsspecStore, LeaseHeld, LocalStore, SnapshotLocation, open_store


@pytest.fixture(params=["local", "file-url"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return FsspecStore(f"file://{tmp_path}/store")


def test_store_writes_atomically_reads_lists_and_deletes(store):
    store.write_atomic("a", b"1")
    store.write_atomic("a", b"22")
    store.write_atomic("b", b"3")
    assert store.read("a") == b"22"
    assert store.list() == ["a", "b"]
    store.delete("a")
    store.delete("a")  # deleting twice is fine
    assert store.list() == ["b"]


def test_store_appends_in_order(store):
    store.append("j", b"ab")
    store.append("j", b"cd")
    assert store.read("j") == b"abcd"
    assert store.list() == ["j"]
    store.delete("j")
    assert store.list() == []


def test_store_has_one_lease_holder_and_names_it(store):
    lease = store.acquire_lease(ttl_s=30)
    other = open_store(store.location) if isinstance(store, LocalStore) else FsspecStore(store.location)
    with pytest.raises(LeaseHeld) as err:
        other.acquire_lease(ttl_s=1)  # URL stores wait up to ttl_s for a crashed holder's lease
    assert f"pid {os.getpid()}" in str(err.value) and "snapshot_dir" in str(err.value)
    lease.release()
    other.acquire_lease(ttl_s=30).release()


def test_snapshot_location_works_on_every_store(store):
    loc = SnapshotLocation(store, b"k" * 32, keep=1)
    loc.write_snapshot(0, {"a": 1}, tasks={})
    loc.append(1, [["r", 1]])
    loc.append(1, [["r", 2]])
    loaded = loc.load_newest()
    assert (loaded.seq, loaded.state, loaded.records) == (0, {"a": 1}, [["r", 1], ["r", 2]])
    loc.write_snapshot(1, {"a": 2}, tasks={})
    loc.prune()
    assert loc.snapshots() == [1] and loc.segments() == []


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, text=True)


def test_a_killed_holder_releases_the_local_lease(tmp_path):
    child = _child(f"""
        import time
        from threadbound.snapshots import LocalStore
        lease = LocalStore({str(tmp_path)!r}).acquire_lease(30)
        print("held", flush=True)
        time.sleep(60)
    """)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {child.pid}"):
            LocalStore(tmp_path).acquire_lease(30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    LocalStore(tmp_path).acquire_lease(30).release()


def test_a_crash_in_the_middle_of_a_write_never_leaves_a_snapshot_that_loads_wrong(tmp_path):
    # Given: a process writing large snapshots as fast as it can
    child = _child(f"""
        import os
        from threadbound.snapshots import LocalStore, SnapshotLocation
        loc = SnapshotLocation(LocalStore({str(tmp_path)!r}), b"k" * 32, keep=3)
        print("go", flush=True)
        seq = 0
        while True:
            seq += 1
            loc.write_snapshot(seq, {{"seq": seq, "blob": os.urandom(4 << 20)}}, tasks={{}})
            loc.prune()
    """)
    assert child.stdout.readline().strip() == "go"
    # When: it is killed at an arbitrary moment, mid-write most likely
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        names = os.listdir(tmp_path)
        if any(n.startswith("snap-") for n in names) and any(n.startswith(".snap-") for n in names):
            break
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    # Then: every snapshot that exists verifies, and the newest loads
    assert any(n.startswith(".snap-") for n in os.listdir(tmp_path)), "killed outside a write; retry"
    loc = SnapshotLocation(LocalStore(tmp_path), b"k" * 32)
    assert loc.snapshots()
    for seq in loc.snapshots():
        assert loc.load(seq)[1]["seq"] == seq
    assert loc.load_newest().state["seq"] == max(loc.snapshots())

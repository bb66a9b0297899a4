"""Snapshots are refused before unpickling when they are not exactly what we signed."""

import os
import pickle
import stat

import msgpack
import pytest

from threadbound.snapshots import (
    LocalStore, SnapshotCorrupt, SnapshotError, SnapshotLocation, UnsupportedFormat, load_key,
)
from threadbound.snapshots import codec, journal

KEY = b"k" * 32
OTHER = b"o" * 32


class _Evil:
    """Unpickling this creates a file: proof that a payload was (not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def location(tmp_path, key=KEY, **kw):
    return SnapshotLocation(LocalStore(tmp_path / "snaps"), key, **kw)


def test_a_snapshot_round_trips_and_its_manifest_reads_without_unpickling(tmp_path):
    loc = location(tmp_path)
    loc.write_snapshot(7, {"tasks": [1, 2]}, tasks={"t1": "running"})
    assert loc.manifest(7)["tasks"] == {"t1": "running"}
    assert loc.manifest(7)["format"] == codec.FORMAT
    assert loc.load(7)[1] == {"tasks": [1, 2]}


@pytest.mark.parametrize("how", ["foreign key", "payload swapped under a good manifest",
                                 "manifest re-hashed without the key"])
def test_a_crafted_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    # Given: a payload that would create a file if it were ever unpickled
    victim = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(victim)))
    loc = location(tmp_path)
    loc.write_snapshot(0, {}, tasks={})  # the location's history, which a good manifest is bound to
    if how == "foreign key":
        data = codec.encode(None, OTHER, seq=1, tasks={}, payload=evil, history=loc.history)
    else:
        good = codec.encode({"ok": 1}, KEY, seq=1, tasks={}, history=loc.history)
        manifest, at = codec.read_manifest(good)
        if how == "manifest re-hashed without the key":
            import hashlib
            manifest.update(payload_size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
        head = msgpack.packb(manifest, use_bin_type=True)
        data = codec.MAGIC + len(head).to_bytes(4, "big") + head + evil
    loc.store.write_atomic("snap-0000000001.tbs", data)
    # When / Then
    with pytest.raises(SnapshotCorrupt) as err:
        loc.load(1)
    assert "snap-0000000001.tbs" in str(err.value)
    assert {"foreign key": "different key", "payload swapped under a good manifest": "the payload",
            "manifest re-hashed without the key": "signature"}[how] in err.value.reason
    assert not victim.exists()


def _damage(kind, loc, tmp_path):
    """Damage the newest of two snapshots in one of the ways a disk or a person can."""
    path = tmp_path / "snaps" / "snap-0000000002.tbs"
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) - 10])
    elif kind == "byte flipped in the payload":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    elif kind == "byte flipped in the manifest":
        i = len(codec.MAGIC) + 4 + 20
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif kind == "re-signed with another key":
        _, payload = codec.verify(data, KEY)
        path.write_bytes(codec.encode(None, OTHER, seq=2, tasks={}, payload=payload, history=loc.history))
    elif kind == "payloads swapped between two snapshots":
        other = (tmp_path / "snaps" / "snap-0000000001.tbs").read_bytes()
        _, at_other = codec.read_manifest(other)
        _, at = codec.read_manifest(data)
        path.write_bytes(data[:at] + other[at_other:])
    return path


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "truncated"),
    ("byte flipped in the payload", "SHA-256"),
    ("byte flipped in the manifest", ""),
    ("re-signed with another key", "different key"),
    ("payloads swapped between two snapshots", "SHA-256"),
])
def test_a_damaged_newest_snapshot_is_refused_and_the_previous_one_is_used(tmp_path, kind, reason):
    loc = location(tmp_path)
    loc.write_snapshot(1, {"n": 1}, tasks={})
    loc.append(2, [["ev", "t1", 0]])
    loc.write_snapshot(2, {"n": 2}, tasks={})
    path = _damage(kind, loc, tmp_path)
    with pytest.raises(SnapshotCorrupt) as err:
        loc.load(2)
    assert str(path) in str(err.value) and reason in str(err.value)
    loaded = location(tmp_path).load_newest()
    assert loaded.seq == 1 and loaded.state == {"n": 1}
    assert loaded.records == [["ev", "t1", 0]]  # the journal after the older snapshot is still there
    assert loaded.skipped and loaded.skipped[0][0] == str(path)


def test_an_older_format_is_a_clear_error_not_a_pickle_traceback(tmp_path):
    loc = location(tmp_path)
    manifest = {"format": 0, "threadbound": "0.0.1", "seq": 1, "tasks": {}}
    head = msgpack.packb(manifest)
    loc.store.write_atomic("snap-0000000001.tbs", codec.MAGIC + len(head).to_bytes(4, "big") + head + b"junk")
    with pytest.raises(UnsupportedFormat, match=rf"unsupported snapshot format v0 .*reads v{codec.FORMAT}"):
        loc.load_newest()


def test_journal_drops_a_torn_tail_but_refuses_a_tampered_frame(tmp_path):
    loc = location(tmp_path)
    loc.append(1, [["a", 1]])
    loc.append(1, [["b", {"state": object.__name__}]])
    path = tmp_path / "snaps" / "journal-0000000001.tbj"
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # a crash mid-append
    records, torn = loc.replay(after=0)
    assert records == [["a", 1]] and torn == [str(path)]
    header = int.from_bytes(whole[len(journal.SEGMENT_MAGIC):len(journal.SEGMENT_MAGIC) + 4], "big")
    i = len(journal.SEGMENT_MAGIC) + 4 + 32 + header + 8 + 32 + 1  # a byte of frame 0's body
    path.write_bytes(whole[:i] + bytes([whole[i] ^ 1]) + whole[i + 1:])
    with pytest.raises(SnapshotCorrupt, match="journal frame 0 .*fails its signature"):
        loc.replay(after=0)


def test_journal_values_msgpack_cannot_carry_travel_pickled_and_signed(tmp_path):
    loc = location(tmp_path)
    loc.append(3, [["commit", {1, 2}, ("a", "b")]])
    assert loc.replay(after=2)[0] == [["commit", {1, 2}, ["a", "b"]]]
    with pytest.raises(SnapshotCorrupt):
        location(tmp_path, key=OTHER).replay(after=2)


def test_retention_keeps_the_window_and_final_states_of_forgotten_tasks(tmp_path):
    loc = location(tmp_path, keep=2, keep_pinned=1)
    loc.write_snapshot(1, {}, tasks={"t1": "running"})
    loc.write_snapshot(2, {}, tasks={"t1": "succeeded", "t2": "running"})
    loc.append(3, [["x"]])
    loc.write_snapshot(3, {}, tasks={"t2": "running"})  # t1 forgotten by the pool
    loc.append(4, [["y"]])
    loc.write_snapshot(4, {}, tasks={"t2": "succeeded"})
    loc.prune()
    assert loc.snapshots() == [2, 3, 4]  # 3, 4: window; 2: t1's final state
    assert loc.segments() == [4]  # segment 3 is covered by snapshot 3, the window's oldest


def test_disk_use_stays_flat_over_a_long_run(tmp_path):
    loc = location(tmp_path, keep=3, keep_pinned=2)
    sizes = []
    for seq in range(1, 200):
        loc.append(seq, [["ev", seq]])
        loc.write_snapshot(seq, {"blob": b"x" * 1000}, tasks={f"t{seq % 5}": "succeeded"})
        loc.prune()
        sizes.append(sum(f.stat().st_size for f in (tmp_path / "snaps").iterdir()))
    assert max(sizes[50:]) == max(sizes[150:])
    # snapshots, pins, the segments after the window's oldest snapshot, the history record
    assert len(list((tmp_path / "snaps").iterdir())) <= 3 + 2 + 2 + 1


def test_key_file_is_created_private_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "keys" / "snapshot.key"
    key = load_key(path, env={})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path, env={}) == key
    os.chmod(path, 0o644)
    with pytest.raises(SnapshotError, match="chmod 600"):
        load_key(path, env={})
    assert load_key(path, env={"THREADBOUND_SNAPSHOT_KEY": "z" * 32}) == b"z" * 32

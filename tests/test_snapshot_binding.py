"""A snapshot and the journal after it load only at their own place and in their own order.

Every case here is a file a person or a bad copy can produce with genuine, correctly
signed pieces: an old snapshot renamed, another pool's or another run's snapshot
copied in, journal frames duplicated, swapped, dropped or cut off, a whole segment
deleted. Each is refused with a reason naming the check, before anything in it is
unpickled; a crash's torn tail is still dropped quietly.
"""

import hashlib
import hmac
import pickle
import shutil
import struct
from pathlib import Path

import cloudpickle
import msgpack
import pytest

from threadbound.snapshots import (
    HistoryExists, LeaseHeld, LocalStore, NoSnapshot, SnapshotCorrupt, SnapshotError, SnapshotLocation,
    UnsupportedFormat,
)
from threadbound.snapshots import codec

KEY = b"k" * 32


class _Evil:
    """Unpickling this creates a file: proof that a payload was (not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def location(path, **kw):
    return SnapshotLocation(LocalStore(path), KEY, **kw)


def snap(where, seq):
    return where / f"snap-{seq:010d}.tbs"


def seg(where, seq):
    return where / f"journal-{seq:010d}.tbj"


def frames(loc, segment, n, first=None):
    """Append a first frame (``first`` or ``["r", 0]``), then frames ``["r", 1]`` ..
    ``["r", n]``; return the file's bytes up to the end of the first frame and each
    later frame's bytes (boundaries taken from the file size, whatever the format)."""
    path = seg(Path(loc.store.path), segment)
    loc.append(segment, [first if first is not None else ["r", 0]])
    ends = [path.stat().st_size]
    for i in range(1, n + 1):
        loc.append(segment, [["r", i]])
        ends.append(path.stat().st_size)
    data = path.read_bytes()
    return data[:ends[0]], [data[a:b] for a, b in zip(ends, ends[1:])]


@pytest.fixture
def where(tmp_path):
    return tmp_path / "main"


# -- snapshots bound to their number, their pool and their history ----------------------


def test_an_old_snapshot_renamed_to_a_newer_number_is_refused_before_unpickling(where, tmp_path):
    # Given: snapshot 3 (whose payload would create a file if unpickled) and snapshot 9
    victim = tmp_path / "pwned"
    loc = location(where)
    loc.write_snapshot(3, None, tasks={}, payload=pickle.dumps(_Evil(str(victim))))
    loc.write_snapshot(9, {"n": 9}, tasks={})
    # When: the old one is copied over the newer name and the original removed
    shutil.copy(snap(where, 3), snap(where, 9))
    snap(where, 3).unlink()
    # Then
    with pytest.raises(SnapshotCorrupt) as err:
        location(where).load(9)
    assert err.value.path.endswith("snap-0000000009.tbs")
    assert ("the file is named snap-0000000009.tbs but its signed manifest says it is snapshot 3 "
            "(an old snapshot renamed)") in err.value.reason
    with pytest.raises(NoSnapshot, match="an old snapshot renamed"):
        location(where).load_newest()
    assert not victim.exists()


def test_another_pools_snapshot_signed_with_the_same_key_is_refused(where, tmp_path):
    # Given: pool 'main' and pool 'other', both signing with the same key
    victim = tmp_path / "pwned"
    main = location(where, pool="main")
    main.write_snapshot(1, {"n": 1}, tasks={})
    other = location(tmp_path / "other", pool="other")
    other.write_snapshot(5, None, tasks={}, payload=pickle.dumps(_Evil(str(victim))))
    # When: the other pool's snapshot is copied into main's location
    shutil.copy(snap(tmp_path / "other", 5), snap(where, 5))
    # Then: it is refused and main resumes from its own
    with pytest.raises(SnapshotCorrupt) as err:
        location(where, pool="main").load(5)
    assert "written by pool 'other' but this location belongs to pool 'main'" in err.value.reason
    loaded = location(where, pool="main").load_newest()
    assert (loaded.seq, loaded.state) == (1, {"n": 1})
    assert loaded.skipped[0][0].endswith("snap-0000000005.tbs")
    assert "written by pool 'other'" in loaded.skipped[0][1]
    # And: the other pool's whole directory, copied in place of main's, is refused too
    shutil.rmtree(where)
    shutil.copytree(tmp_path / "other", where)
    with pytest.raises(SnapshotError, match="written by pool 'other' but this location belongs to pool 'main'"):
        location(where, pool="main").load_newest()
    assert not victim.exists()


def test_a_snapshot_of_another_history_of_the_same_pool_is_refused(where, tmp_path):
    # Given: this location's history (snapshots 1, 2) and an earlier run's snapshot 7
    # of the same pool, kept somewhere else
    victim = tmp_path / "pwned"
    loc = location(where, pool="main")
    loc.write_snapshot(1, {"n": 1}, tasks={})
    loc.write_snapshot(2, {"n": 2}, tasks={})
    earlier = location(tmp_path / "earlier", pool="main")
    earlier.write_snapshot(7, None, tasks={}, payload=pickle.dumps(_Evil(str(victim))))
    assert earlier.history != loc.history
    # When: it is copied in as the newest snapshot
    shutil.copy(snap(tmp_path / "earlier", 7), snap(where, 7))
    # Then
    loaded = location(where, pool="main").load_newest()
    assert (loaded.seq, loaded.state) == (2, {"n": 2})
    path, why = loaded.skipped[0]
    assert path.endswith("snap-0000000007.tbs")
    assert f"belongs to history {earlier.history} but this location's history is {loc.history}" in why
    assert not victim.exists()


def test_resuming_carries_the_history_forward(where):
    # Given: a history, resumed by a new writer that continues it
    first = location(where, pool="main")
    first.write_snapshot(0, {"n": 0}, tasks={})
    first.append(1, [["r", 1]])
    second = location(where, pool="main")
    assert second.load_newest().records == [["r", 1]]
    second.write_snapshot(2, {"n": 2}, tasks={})
    second.append(3, [["r", 3]])
    # Then: one history, and a third writer reads all of it
    assert second.history == first.history
    assert codec.read_manifest(snap(where, 2).read_bytes())[0]["history"] == first.history
    loaded = location(where, pool="main").load_newest()
    assert (loaded.seq, loaded.records, loaded.breaks) == (2, [["r", 3]], [])
    # And: clearing starts a new history
    second.clear()
    second.write_snapshot(0, {}, tasks={})
    assert second.history != first.history


# -- journal frames in their order ------------------------------------------------------


def journal_after_snapshot_1(where, victim):
    """Snapshot 1, then segment 2: a first frame carrying a payload that creates
    ``victim`` when unpickled, then frames r1..r4. Returns the writer too."""
    loc = location(where)
    loc.write_snapshot(1, {"n": 1}, tasks={})
    return (loc, *frames(loc, 2, 4, first=["evil", _Evil(str(victim))]))


@pytest.mark.parametrize("how, check, why", [
    ("a frame duplicated", "frame 2 appears again", "duplicated"),
    ("two frames swapped", "frame 2 is missing", "reordered"),
    ("a frame dropped from the middle", "frame 2 is missing", "dropped"),
])
def test_journal_frames_out_of_their_order_are_refused_not_replayed(where, tmp_path, how, check, why):
    # Given: a journal of five frames after snapshot 1
    victim = tmp_path / "pwned"
    _, head, (f1, f2, f3, f4) = journal_after_snapshot_1(where, victim)
    # When: its frames are rearranged -- each frame itself genuine and signed
    body = {"a frame duplicated": [f1, f2, f2, f3, f4],
            "two frames swapped": [f1, f3, f2, f4],
            "a frame dropped from the middle": [f1, f3, f4]}[how]
    seg(where, 2).write_bytes(head + b"".join(body))
    # Then: resume refuses, naming the segment and the check; nothing was unpickled
    with pytest.raises(SnapshotCorrupt) as err:
        location(where).load_newest()
    assert err.value.path.endswith("journal-0000000002.tbj")
    assert check in err.value.reason and why in err.value.reason
    assert "would skip or repeat committed records" in err.value.reason
    assert not victim.exists()


def test_a_segment_cut_at_a_frame_boundary_is_refused_when_a_later_segment_exists(where, tmp_path):
    # Given: snapshot 1, segment 2 of five frames, segment 3 (snapshot 2 never got written)
    victim = tmp_path / "pwned"
    loc, head, (f1, f2, f3, f4) = journal_after_snapshot_1(where, victim)
    loc.append(3, [["r", "s3"]])
    # When: segment 2 loses its last three frames, cleanly at a frame boundary
    seg(where, 2).write_bytes(head + f1)
    # Then
    with pytest.raises(SnapshotCorrupt) as err:
        location(where).load_newest()
    assert err.value.path.endswith("journal-0000000002.tbj")
    assert ("segment 3's header says the journal reached 5 frame(s) of segment 2, but segment 2 holds only 2: "
            "3 acknowledged frame(s) were cut off") in err.value.reason
    assert not victim.exists()


def test_a_segment_cut_at_a_frame_boundary_is_refused_when_a_later_snapshot_records_it(where, tmp_path):
    # Given: snapshot 1, segment 2 of five frames, snapshot 2 -- whose payload is then damaged
    victim = tmp_path / "pwned"
    loc, head, (f1, f2, f3, f4) = journal_after_snapshot_1(where, victim)
    loc.write_snapshot(2, {"n": 2}, tasks={})
    data = snap(where, 2).read_bytes()
    snap(where, 2).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    # When: segment 2 is cut at a frame boundary
    seg(where, 2).write_bytes(head + f1 + f2)
    # Then: falling back to snapshot 1 would lose acknowledged frames: refused
    with pytest.raises(SnapshotCorrupt) as err:
        location(where).load_newest()
    assert "snapshot 2's manifest says the journal reached 5 frame(s) of segment 2" in err.value.reason
    assert "2 acknowledged frame(s) were cut off" in err.value.reason
    assert not victim.exists()


def test_a_whole_segment_deleted_between_two_present_ones_is_refused(where, tmp_path):
    # Given: snapshot 1, then segments 2, 3 and 4
    victim = tmp_path / "pwned"
    loc, _, _ = journal_after_snapshot_1(where, victim)
    loc.append(3, [["r", "s3"]])
    loc.append(4, [["r", "s4"]])
    # When: segment 3 is deleted
    seg(where, 3).unlink()
    # Then
    with pytest.raises(SnapshotCorrupt) as err:
        location(where).load_newest()
    assert err.value.path.endswith("journal-0000000003.tbj")
    assert ("segment 4's header says the journal reached 1 frame(s) of segment 3, but segment 3 is missing "
            "(a whole segment deleted)") in err.value.reason
    assert not victim.exists()


def test_a_segment_of_another_history_copied_in_is_refused_before_unpickling(where, tmp_path):
    # Given: this history's snapshot 1, and another history's segment 2 with a malicious record
    victim = tmp_path / "pwned"
    location(where).write_snapshot(1, {"n": 1}, tasks={})
    other = location(tmp_path / "other")
    other.write_snapshot(1, {}, tasks={})
    other.append(2, [["evil", _Evil(str(victim))]])
    # When
    shutil.copy(seg(tmp_path / "other", 2), seg(where, 2))
    # Then
    with pytest.raises(SnapshotCorrupt, match="a segment copied in from another history"):
        location(where).load_newest()
    assert not victim.exists()


def test_a_torn_tail_is_still_dropped_and_a_later_resume_reads_past_it(where):
    # Given: snapshot 1 and a segment whose last append a crash cut short
    loc = location(where)
    loc.write_snapshot(1, {"n": 1}, tasks={})
    frames(loc, 2, 2)
    whole = seg(where, 2).read_bytes()
    seg(where, 2).write_bytes(whole[:-3])
    # When: a new supervisor resumes
    again = location(where)
    loaded = again.load_newest()
    # Then: the unacknowledged frame is dropped, quietly
    assert loaded.records == [["r", 0], ["r", 1]]
    assert loaded.torn == [str(seg(where, 2))] and loaded.breaks == [] and loaded.skipped == []
    # And: it continues (snapshot 3, segment 4); should snapshot 3 be damaged later,
    # snapshot 1 + the torn segment + segment 4 still replay
    again.write_snapshot(3, {"n": 3}, tasks={})
    again.append(4, [["r", "s4"]])
    data = snap(where, 3).read_bytes()
    snap(where, 3).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    loaded = location(where).load_newest()
    assert (loaded.seq, loaded.records) == (1, [["r", 0], ["r", 1], ["r", "s4"]])
    assert loaded.breaks == [] and loaded.skipped[0][0] == str(snap(where, 3))


# -- resume at a break ------------------------------------------------------------------


def test_resume_falls_back_past_a_snapshot_the_journal_does_not_continue_from(where):
    # Given: snapshots 2 and 3, and a journal (segments 3, 4) whole from snapshot 2 on;
    # snapshot 3, re-signed with the key, claims the journal stood elsewhere
    loc = location(where)
    loc.write_snapshot(2, {"n": 2}, tasks={})
    frames(loc, 3, 1)
    loc.write_snapshot(3, {"n": 3}, tasks={})
    loc.append(4, [["r", "s4"]])
    manifest, payload = codec.verify(snap(where, 3).read_bytes(), KEY)
    snap(where, 3).write_bytes(codec.encode(None, KEY, seq=3, tasks={}, payload=payload, pool=manifest["pool"],
                                            history=manifest["history"], journal_tail=[3, 1, "00" * 32]))
    # When
    loaded = location(where).load_newest()
    # Then: it resumes from snapshot 2 and says why snapshot 3 was passed over
    assert (loaded.seq, loaded.records) == (2, [["r", 0], ["r", 1], ["r", "s4"]])
    (path, why), = loaded.breaks
    assert path.endswith("journal-0000000004.tbj") and "segment 4's header says" in why
    assert loaded.skipped[0][0] == str(snap(where, 3))
    assert "the journal after it breaks" in loaded.skipped[0][1]


def test_resume_fails_clearly_rather_than_replay_across_a_pruned_journal(where):
    # Given: retention kept snapshot 1 (task t1's final state) and the window (snapshot 3),
    # and deleted the journal snapshot 1 would need
    loc = location(where, keep=1, keep_pinned=1)
    loc.write_snapshot(1, {"n": 1}, tasks={"t1": "succeeded"})
    loc.append(2, [["r", 2]])
    loc.write_snapshot(2, {"n": 2}, tasks={"t2": "running"})
    loc.append(3, [["r", 3]])
    loc.write_snapshot(3, {"n": 3}, tasks={"t2": "running"})
    loc.append(4, [["r", 4]])
    loc.prune()
    assert loc.snapshots() == [1, 3] and loc.segments() == [4]
    # When: the window's snapshot is damaged
    data = snap(where, 3).read_bytes()
    snap(where, 3).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    # Then: snapshot 1 + segment 4 would skip segments 2 and 3: refused, naming what is missing
    with pytest.raises(SnapshotCorrupt) as err:
        location(where).load_newest()
    assert err.value.path.endswith("journal-0000000003.tbj")
    assert "segment 3 is missing" in err.value.reason
    assert "snap-0000000001.tbs" in err.value.reason


# -- format versions --------------------------------------------------------------------


def test_a_snapshot_in_the_previous_format_is_refused_with_what_to_do(where):
    # Given: a genuine snapshot as threadbound wrote it before the manifest was bound
    payload = cloudpickle.dumps({"n": 1})
    manifest = {"format": 1, "threadbound": "0.1.0", "created_at": 0.0, "seq": 1, "tasks": {},
                "payload_size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "key_id": "x"}
    manifest["signature"] = hmac.new(KEY, msgpack.packb(dict(sorted(manifest.items())), use_bin_type=True),
                                     hashlib.sha256).hexdigest()
    head = msgpack.packb(manifest, use_bin_type=True)
    LocalStore(where).write_atomic("snap-0000000001.tbs", codec.MAGIC + len(head).to_bytes(4, "big") + head + payload)
    # Then
    with pytest.raises(UnsupportedFormat) as err:
        location(where).load_newest()
    assert "unsupported snapshot format v1" in err.value.reason and f"reads v{codec.FORMAT}" in err.value.reason
    assert "start with an empty snapshot_dir" in err.value.reason


def test_a_journal_segment_in_the_previous_format_is_refused_with_what_to_do(where):
    # Given: snapshot 1 and a segment 2 as threadbound wrote it before frames were chained
    location(where).write_snapshot(1, {"n": 1}, tasks={})
    body = msgpack.packb([["r", 1]])
    mac = hmac.new(KEY, struct.pack(">Q", 2) + body, hashlib.sha256).digest()
    seg(where, 2).write_bytes(b"TBJRNL1\n" + struct.pack(">I", len(body)) + mac + body)
    # Then
    with pytest.raises(UnsupportedFormat) as err:
        location(where).load_newest()
    assert "unsupported journal format v1" in err.value.reason and "start with an empty snapshot_dir" in err.value.reason


# -- errors cross processes -------------------------------------------------------------


@pytest.mark.parametrize("err", [
    SnapshotError("/s", "why"), SnapshotCorrupt("/s/journal-0000000002.tbj", "frame 2 is missing"),
    UnsupportedFormat("/s/snap-0000000001.tbs", "v1"), NoSnapshot("/s", "none"),
    LeaseHeld("/s", "pid 1 on h"), HistoryExists("/s", "unfinished"),
], ids=lambda e: type(e).__name__)
def test_every_snapshot_error_survives_pickling_with_its_fields(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and back.__dict__ == err.__dict__


# -- the writer: a snapshot records exactly where its segment ends ----------------------


def test_every_snapshot_plus_the_journal_after_it_gives_every_record_exactly_once(tmp_path):
    # Given: the supervisor's durability, writing frames on its writer thread (as for a
    # remote store), with snapshots taken while frames are in flight
    import asyncio

    from threadbound.runtime.config import RuntimeConfig
    from threadbound.runtime.supervisor.durability import Durability, open_location

    cfg = RuntimeConfig.from_mapping({"name": "main", "snapshot_dir": str(tmp_path), "snapshot_interval_s": 3600,
                                      "snapshots": {"keep": 4}})
    n = 300

    async def run():
        durable = Durability(cfg, open_location(cfg), on_durable=lambda marks: None)
        durable._inline = False
        state = {"n": 0}
        export = lambda: (dict(state), {}, [])  # noqa: E731
        durable.write_now(0, export)
        durable.start(export)
        for i in range(n):
            durable.record(["r", i])
            state["n"] = i + 1
            if i % 3 == 0:
                await asyncio.sleep(0)
            if i % 40 == 20:
                await durable.snapshot(export)
        await durable.close(export)

    asyncio.run(run())
    # Then: from every snapshot kept, its state plus the journal after it is records 0..n-1, once each
    loc = open_location(cfg)
    assert len(loc.snapshots()) == 4
    for seq in loc.snapshots():
        _, state = loc.load(seq)
        records, torn = loc.replay(after=seq)
        assert [r[1] for r in records] == list(range(state["n"], n)) and torn == []


def test_a_burst_of_records_shares_one_frame_and_a_flush_writes_at_once(tmp_path, monkeypatch):
    # Given: the supervisor's durability on a local disk
    import asyncio

    from threadbound.runtime.supervisor import durability
    from threadbound.runtime.config import RuntimeConfig

    cfg = RuntimeConfig.from_mapping({"name": "main", "snapshot_dir": str(tmp_path), "snapshot_interval_s": 3600})
    seen: list[dict] = []

    async def run():
        durable = durability.Durability(cfg, durability.open_location(cfg),
                                        on_durable=lambda marks: seen.append(dict(marks)))
        export = lambda: ({}, {}, [])  # noqa: E731
        durable.write_now(0, export)
        durable.start(export)
        # When: five events of a burst are recorded across loop turns, nobody waiting
        for i in range(5):
            durable.record(["event", i], {"t1": i + 1})
            await asyncio.sleep(0)
        during = durable.stats["journal_frames"]
        await asyncio.sleep(durability.GATHER_S * 20)  # (timers fire in order: the write's is first)
        burst = durable.stats["journal_frames"]
        # ... and then, with a gathering window that would never end, a commit is flushed
        monkeypatch.setattr(durability, "GATHER_S", 3600.0)
        durable.record(["event", 5], {"t1": 6})
        durable.record(["commit"], {"t1": 7})
        await durable.flush()  # (the test's timeout stands for "at once")
        commit = durable.stats["journal_frames"]
        await durable.close(export)
        return during, burst, commit

    during, burst, commit = asyncio.run(run())
    # Then: nothing was written mid-burst, the burst went out as one frame without a
    # flush asking for it, and the flush wrote what was pending with the commit in one more
    assert (during, burst, commit) == (0, 1, 2)
    assert seen[:2] == [{"t1": 5}, {"t1": 7}]
    records, torn = durability.open_location(cfg).replay(after=0)
    assert [r[-1] for r in records] == [0, 1, 2, 3, 4, 5, "commit"] and torn == []

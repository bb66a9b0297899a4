"""Journal segments: a signed header, then a hash chain of length-prefixed frames.

    segment = b"TBJRNL2\\n" | u32 header length | MAC | msgpack header | frame | frame | ...
    header  = {"segment": n, "pool": ..., "history": ..., "key_id": ..., "prev": [j, frames, mac] | None}
    frame   = u32 body length | u32 index | MAC | body

A body is a msgpack list of records. Values msgpack cannot carry (an agent's state,
a task spec) travel as ext type 1, cloudpickled -- decoded only once the whole
journal being replayed has verified (:func:`decode_records`).

**The chain.** The header's MAC is ``HMAC(key, "H" | header)``; frame ``i``'s is
``HMAC(key, "F" | n | i | MAC before it | body)``, where the MAC before frame 0 is the
header's. So frame ``i`` verifies only as the ``i``-th frame of segment ``n`` of
that history, after exactly the frames that preceded it when it was written: a
frame duplicated, dropped, swapped with another or moved to another segment breaks
the chain there (the index, also in the clear, lets the reason say which).

**Between segments.** ``prev`` in a header is where the journal stood when the
segment was opened: ``[j, frames, MAC of the last frame]`` of the newest non-empty
segment before it, None if none (the start of a history). A snapshot's manifest
records the same position as of the segment it closes (``journal_tail``). A reader
(:meth:`~threadbound.snapshots.location.SnapshotLocation.load_newest`) walks the
segments after a snapshot in order and requires every header's ``prev`` to be
exactly the position walked so far, starting from the snapshot's ``journal_tail``;
so a whole segment deleted between two present ones, or a segment cut at a frame
boundary and followed by a later one, is refused. An empty segment (nothing was
appended to it) has no file: the next header's ``prev`` skips over it.

**Torn tails.** A crash mid-append leaves a short last frame (or header): it was
never acknowledged and is dropped, and the next segment, if any, continues from
the complete frames. What cannot be told from a crash is the *end* of the journal:
complete frames cut off the newest segment, or newest segments deleted whole, look
like frames never written -- nothing after them vouches for them (unless a newer
snapshot does: see ``location``). Everything else that fails is
:class:`SnapshotCorrupt` naming the file and the check.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import cloudpickle
import msgpack

from .codec import check_owner
from .errors import SnapshotCorrupt, UnsupportedFormat
from .keys import key_id

VERSION = 2
SEGMENT_MAGIC = b"TBJRNL%d\n" % VERSION
_PICKLED = 1
_LEN = struct.Struct(">I")
_FRAME = struct.Struct(">II")  # body length, index
_POS = struct.Struct(">QI")  # segment, index: what a frame's MAC binds besides the chain
_MAC = 32
_MAX_HEADER = 1 << 20

Tail = list  # [segment, frames, hex MAC of its last frame]: where the journal stands


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    return msgpack.ExtType(_PICKLED, cloudpickle.dumps(obj))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _PICKLED:
        return cloudpickle.loads(data)
    return msgpack.ExtType(code, data)


def _frame_mac(key: bytes, segment: int, index: int, before: bytes, body: bytes) -> bytes:
    return hmac.new(key, b"F" + _POS.pack(segment, index) + before + body, hashlib.sha256).digest()


def open_segment(key: bytes, *, segment: int, pool: str, history: str, prev: Tail | None) -> tuple[bytes, bytes]:
    """The bytes that start segment ``segment`` and the MAC its frame 0 chains from."""
    header = msgpack.packb({"segment": segment, "pool": pool, "history": history, "key_id": key_id(key),
                            "prev": list(prev) if prev is not None else None}, use_bin_type=True)
    mac = hmac.new(key, b"H" + header, hashlib.sha256).digest()
    return SEGMENT_MAGIC + _LEN.pack(len(header)) + mac + header, mac


def encode_frame(records: list[Any], key: bytes, segment: int, index: int, before: bytes) -> tuple[bytes, bytes]:
    """Frame ``index`` of ``segment``, chained from ``before`` (the previous frame's
    MAC, or the header's for frame 0); the frame and its MAC."""
    body = msgpack.packb(records, default=_default, use_bin_type=True)
    mac = _frame_mac(key, segment, index, before, body)
    return _FRAME.pack(len(body), index) + mac + body, mac


def decode_records(bodies: list[bytes]) -> list[Any]:
    """The records of verified frame bodies (this is where ext values are unpickled)."""
    records: list[Any] = []
    for body in bodies:
        records.extend(msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, strict_map_key=False))
    return records


@dataclass
class Segment:
    """One segment as read: its complete, verified frames (bodies still packed)."""

    number: int
    header: dict[str, Any] | None  # None: torn before its header was complete
    bodies: list[bytes]
    last_mac: bytes | None
    torn: bool  # bytes after the last complete frame were dropped

    @property
    def prev(self) -> Tail | None:
        return None if self.header is None else self.header.get("prev")

    @property
    def tail(self) -> Tail | None:
        """Where the journal stands after this segment (None if it holds no frame)."""
        if not self.bodies:
            return None
        return [self.number, len(self.bodies), self.last_mac.hex()]


def read_segment(data: bytes, key: bytes, segment: int, name: str, *, pool: str | None = None,
                 history: str | None = None) -> Segment:
    """Verify segment ``segment`` (the number in its file name) frame by frame.

    Raises :class:`SnapshotCorrupt` at the first frame that is not where it was
    written, :class:`UnsupportedFormat` for another journal version. Never unpickles.
    """
    if not data.startswith(SEGMENT_MAGIC):
        if SEGMENT_MAGIC.startswith(data):  # crashed while writing the magic
            return Segment(segment, None, [], None, bool(data))
        if data.startswith(b"TBJRNL"):
            version = data[6:7].decode("ascii", "replace")
            raise UnsupportedFormat(name, f"unsupported journal format v{version}; this threadbound reads "
                                          f"v{VERSION}; resume it with the version that wrote it, or start "
                                          "with an empty snapshot_dir")
        raise SnapshotCorrupt(name, "not a threadbound journal segment (bad magic bytes)")
    at = len(SEGMENT_MAGIC)
    if at + _LEN.size + _MAC > len(data):
        return Segment(segment, None, [], None, True)
    (size,) = _LEN.unpack_from(data, at)
    if size > _MAX_HEADER:
        raise SnapshotCorrupt(name, "the segment header is unreadable (bad length)")
    end = at + _LEN.size + _MAC + size
    if end > len(data):  # crashed while writing the header (it goes out with frame 0)
        return Segment(segment, None, [], None, True)
    mac, raw = data[at + _LEN.size:at + _LEN.size + _MAC], data[at + _LEN.size + _MAC:end]
    if not hmac.compare_digest(mac, hmac.new(key, b"H" + raw, hashlib.sha256).digest()):
        try:
            theirs = _header(raw, name).get("key_id")
        except SnapshotCorrupt:
            theirs = None
        ours = key_id(key)
        if theirs is not None and theirs != ours:
            raise SnapshotCorrupt(name, f"the segment was written with a different key (key id {theirs}; "
                                        f"this pool's key is {ours})")
        raise SnapshotCorrupt(name, "the segment header fails its signature (tampered)")
    header = _header(raw, name)
    if header.get("segment") != segment:
        raise SnapshotCorrupt(name, f"the file is named {name.rsplit('/', 1)[-1]} but its signed header says "
                                    f"it is segment {header.get('segment')} (a segment renamed)")
    check_owner(name, "segment", header, pool, history)
    bodies: list[bytes] = []
    macs: list[bytes] = []
    before, at = mac, end
    head = _FRAME.size + _MAC
    while at + head <= len(data):
        size, index = _FRAME.unpack_from(data, at)
        stop = at + head + size
        if stop > len(data):
            break  # torn tail
        mac, body = data[at + _FRAME.size:at + head], data[at + head:stop]
        i = len(bodies)
        if index != i:
            raise SnapshotCorrupt(name, _misplaced(i, index, at, mac, macs))
        if not hmac.compare_digest(mac, _frame_mac(key, segment, i, before, body)):
            raise SnapshotCorrupt(name, f"journal frame {i} at byte {at} fails its signature (altered, written "
                                        f"with another key, or not the frame that followed frame {i - 1})"
                                  if i else f"journal frame 0 at byte {at} fails its signature (altered, "
                                            "written with another key, or from another segment)")
        bodies.append(body)
        macs.append(mac)
        before, at = mac, stop
    return Segment(segment, header, bodies, macs[-1] if macs else None, at < len(data))


def _header(raw: bytes, name: str) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise SnapshotCorrupt(name, f"the segment header is unreadable ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise SnapshotCorrupt(name, "the segment header is not a mapping")
    return header


def _misplaced(i: int, index: int, at: int, mac: bytes, macs: list[bytes]) -> str:
    """Why the frame at byte ``at``, which says it is frame ``index``, cannot be frame ``i``."""
    if index < i and hmac.compare_digest(mac, macs[index]):
        return f"frame {index} appears again at byte {at}, where frame {i} belongs (a frame duplicated)"
    if index < i:
        return f"frame {i} is missing: the frame at byte {at} is frame {index}, which came earlier (frames reordered)"
    return f"frame {i} is missing: the frame at byte {at} is frame {index} (a frame dropped, or frames reordered)"

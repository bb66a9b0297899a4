"""Journal frames: signed, length-prefixed batches of msgpack records.

A segment is ``b"TBJRNL1\\n"`` followed by frames; a frame is

    u32 body length | HMAC-SHA256(key, segment number | body) | body

and a body is a msgpack list of records. Values msgpack cannot carry (an agent's
state, a task spec) travel as ext type 1, cloudpickled -- decoded only after the
frame's HMAC verified. A crash mid-append leaves a short last frame: that torn
tail was never acknowledged and is dropped. A complete frame whose HMAC fails is
corruption and raises :class:`SnapshotCorrupt`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Iterator

import cloudpickle
import msgpack

from .errors import SnapshotCorrupt, UnsupportedFormat

SEGMENT_MAGIC = b"TBJRNL1\n"
_PICKLED = 1
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_MAC = 32


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    return msgpack.ExtType(_PICKLED, cloudpickle.dumps(obj))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _PICKLED:
        return cloudpickle.loads(data)
    return msgpack.ExtType(code, data)


def encode_frame(records: list[Any], key: bytes, segment: int) -> bytes:
    body = msgpack.packb(records, default=_default, use_bin_type=True)
    mac = hmac.new(key, _SEQ.pack(segment) + body, hashlib.sha256).digest()
    return _LEN.pack(len(body)) + mac + body


def decode_segment(data: bytes, key: bytes, segment: int, name: str) -> tuple[list[Any], bool]:
    """Every record of a segment, and whether its tail was torn (a crash mid-append)."""
    if not data.startswith(SEGMENT_MAGIC):
        if SEGMENT_MAGIC.startswith(data):  # crashed while writing the header
            return [], bool(data)
        if data.startswith(b"TBJRNL"):
            raise UnsupportedFormat(name, f"unsupported journal format {data[6:7]!r}; this threadbound reads 1")
        raise SnapshotCorrupt(name, "not a threadbound journal segment (bad magic bytes)")
    records: list[Any] = []
    for body in _frames(data, key, segment, name):
        records.extend(msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, strict_map_key=False))
    at = _end_of_frames(data)
    return records, at < len(data)


def _frames(data: bytes, key: bytes, segment: int, name: str) -> Iterator[bytes]:
    at, n = len(SEGMENT_MAGIC), 0
    head = _LEN.size + _MAC
    while at + head <= len(data):
        (size,) = _LEN.unpack_from(data, at)
        end = at + head + size
        if end > len(data):
            return  # torn tail
        mac, body = data[at + _LEN.size:at + head], data[at + head:end]
        if not hmac.compare_digest(mac, hmac.new(key, _SEQ.pack(segment) + body, hashlib.sha256).digest()):
            raise SnapshotCorrupt(name, f"journal frame {n} at byte {at} fails its signature "
                                        "(corrupted, or written with another key)")
        yield body
        at, n = end, n + 1


def _end_of_frames(data: bytes) -> int:
    at = len(SEGMENT_MAGIC)
    head = _LEN.size + _MAC
    while at + head <= len(data):
        (size,) = _LEN.unpack_from(data, at)
        if at + head + size > len(data):
            break
        at += head + size
    return at

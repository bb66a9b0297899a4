"""The snapshot file format: a signed msgpack manifest, then a cloudpickle payload.

    b"TBSNAP\\n" | u32 manifest length | msgpack manifest | payload

The manifest (format version, threadbound version, created-at, snapshot number,
pool name, history id, journal position, task ids and states, payload size,
SHA-256, key id, HMAC-SHA256 signature) is plain msgpack: ``threadbound snapshots
ls/show`` read it without unpickling anything.

The signature binds a snapshot to its place: ``seq`` (the number in its file
name), ``pool`` (whose location it belongs to), ``history`` (the random id a pool
draws when it starts a fresh history at a location; every later snapshot of that
history, resumed or not, carries it) and ``journal_tail`` (how far the journal had
got when the snapshot closed its segment: ``[segment, frames, MAC of its last
frame]`` of the newest non-empty segment up to ``seq``, or None). Loading checks, in
order, the magic, the format version, the signature, the binding (the file's
number, the pool and history the location expects), the payload size and the
payload checksum -- and only then unpickles. A tampered, truncated, foreign-key,
swapped, renamed, other pool's or other history's snapshot is refused with
:class:`SnapshotCorrupt` naming the file and the check that failed.

The location's own record of its pool and history (``history.tbh``, see
:mod:`.location`) is a signed msgpack map in the same style, :func:`encode_history`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from typing import Any

import cloudpickle
import msgpack

from .errors import SnapshotCorrupt, UnsupportedFormat
from .keys import key_id

MAGIC = b"TBSNAP\n"
# Bump on any change of layout or payload shape; add a migration or refuse.
# v2: the manifest binds pool, history and journal position; frames are chained.
FORMAT = 2
HISTORY_MAGIC = b"TBHIST\n"
DEFAULT_POOL = "threadbound"  # the name of a pool whose config gives none
_HEAD = struct.Struct(">I")
_MAX_MANIFEST = 64 << 20


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("threadbound")
    except Exception:
        return "unknown"


THREADBOUND_VERSION = _version()


def _sign(key: bytes, manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in sorted(manifest.items()) if k != "signature"}
    return hmac.new(key, msgpack.packb(body, use_bin_type=True), hashlib.sha256).hexdigest()


def encode(payload_obj: Any, key: bytes, *, seq: int, tasks: dict[str, str],
           extra: dict[str, Any] | None = None, payload: bytes | None = None,
           pool: str = DEFAULT_POOL, history: str | None = None,
           journal_tail: list[Any] | None = None) -> bytes:
    """A whole snapshot file: ``payload_obj`` cloudpickled (or ``payload`` as given) and signed.

    ``extra`` adds fields to the manifest; it cannot override the binding fields."""
    if payload is None:
        payload = cloudpickle.dumps(payload_obj)
    manifest: dict[str, Any] = {
        "format": FORMAT, "threadbound": THREADBOUND_VERSION, "created_at": time.time(),
        "tasks": dict(tasks), **(extra or {}),
        "seq": seq, "pool": pool, "history": history,
        "journal_tail": list(journal_tail) if journal_tail is not None else None,
        "payload_size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "key_id": key_id(key),
    }
    manifest["signature"] = _sign(key, manifest)
    head = msgpack.packb(manifest, use_bin_type=True)
    return MAGIC + _HEAD.pack(len(head)) + head + payload


def read_manifest(data: bytes, name: str = "<snapshot>") -> tuple[dict[str, Any], int]:
    """The manifest (unverified) and where the payload starts. Never unpickles."""
    if not data.startswith(MAGIC):
        raise SnapshotCorrupt(name, "not a threadbound snapshot (bad magic bytes)")
    start = len(MAGIC) + _HEAD.size
    if len(data) < start:
        raise SnapshotCorrupt(name, "truncated: the file ends inside its header")
    (size,) = _HEAD.unpack_from(data, len(MAGIC))
    if size > _MAX_MANIFEST or start + size > len(data):
        raise SnapshotCorrupt(name, "truncated: the file ends inside its manifest")
    try:
        manifest = msgpack.unpackb(data[start:start + size], raw=False, strict_map_key=False)
    except Exception as exc:
        raise SnapshotCorrupt(name, f"the manifest is unreadable ({type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise SnapshotCorrupt(name, "the manifest is not a mapping")
    return manifest, start + size


def check_format(manifest: dict[str, Any], name: str, what: str = "snapshot") -> None:
    """Refuse a format this version cannot read, saying what to do."""
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise UnsupportedFormat(name, f"unsupported {what} format v{fmt} (written by threadbound "
                                      f"{manifest.get('threadbound', '?')}; this threadbound "
                                      f"{THREADBOUND_VERSION} reads v{FORMAT}); resume it with the "
                                      "version that wrote it, or start with an empty snapshot_dir")


def _check_signature(manifest: dict[str, Any], key: bytes, name: str) -> None:
    signature = manifest.get("signature")
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _sign(key, manifest)):
        theirs, ours = manifest.get("key_id"), key_id(key)
        if theirs != ours:
            raise SnapshotCorrupt(name, f"signed with a different key (key id {theirs}; this pool's key "
                                        f"is {ours}); set THREADBOUND_SNAPSHOT_KEY or snapshots.key_file "
                                        "to the key that wrote it")
        raise SnapshotCorrupt(name, "the signature does not match the manifest (tampered)")


def check_binding(manifest: dict[str, Any], name: str, *, seq: int | None = None, pool: str | None = None,
                  history: str | None = None) -> None:
    """Refuse a (verified) manifest that belongs elsewhere: another number, pool or history.
    An expectation given as None is not checked."""
    if seq is not None and manifest.get("seq") != seq:
        theirs = manifest.get("seq")
        how = ("an old snapshot renamed" if isinstance(theirs, int) and theirs < seq
               else "a snapshot renamed or copied from another number")
        raise SnapshotCorrupt(name, f"the file is named {name.rsplit('/', 1)[-1]} but its signed manifest "
                                    f"says it is snapshot {theirs} ({how})")
    check_owner(name, "snapshot", manifest, pool, history)


def check_owner(name: str, what: str, signed: dict[str, Any], pool: str | None, history: str | None) -> None:
    """Refuse a signed record (a snapshot's manifest, a segment's header) of another pool or history."""
    if pool is not None and signed.get("pool") != pool:
        raise SnapshotCorrupt(name, f"written by pool {signed.get('pool')!r} but this location belongs "
                                    f"to pool {pool!r}")
    if history is not None and signed.get("history") != history:
        raise SnapshotCorrupt(name, f"belongs to history {signed.get('history')} but this location's "
                                    f"history is {history} (a {what} copied in from another history)")


def verify_manifest(data: bytes, key: bytes, name: str = "<snapshot>", *, seq: int | None = None,
                    pool: str | None = None, history: str | None = None) -> tuple[dict[str, Any], int]:
    """Check a snapshot's format, signature and binding; its manifest and where the
    payload starts. The payload is not looked at (see :func:`verify`)."""
    manifest, at = read_manifest(data, name)
    check_format(manifest, name)
    _check_signature(manifest, key, name)
    check_binding(manifest, name, seq=seq, pool=pool, history=history)
    return manifest, at


def verify_payload(data: bytes, at: int, manifest: dict[str, Any], name: str = "<snapshot>") -> bytes:
    """The (still pickled) payload, once its size and checksum match the verified manifest."""
    payload = data[at:]
    if len(payload) != manifest.get("payload_size"):
        raise SnapshotCorrupt(name, f"truncated or padded: the payload is {len(payload)} bytes, "
                                    f"the manifest says {manifest.get('payload_size')}")
    if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
        raise SnapshotCorrupt(name, "the payload's SHA-256 does not match the manifest "
                                    "(corrupted, or a payload from another snapshot)")
    return payload


def verify(data: bytes, key: bytes, name: str = "<snapshot>", *, seq: int | None = None,
           pool: str | None = None, history: str | None = None) -> tuple[dict[str, Any], bytes]:
    """Check a snapshot completely; return its manifest and the (still pickled) payload."""
    manifest, at = verify_manifest(data, key, name, seq=seq, pool=pool, history=history)
    return manifest, verify_payload(data, at, manifest, name)


def decode(data: bytes, key: bytes, name: str = "<snapshot>", *, seq: int | None = None,
           pool: str | None = None, history: str | None = None) -> tuple[dict[str, Any], Any]:
    """Verify, then unpickle: the manifest and the payload object."""
    manifest, payload = verify(data, key, name, seq=seq, pool=pool, history=history)
    return manifest, cloudpickle.loads(payload)


# -- the location's history record ----------------------------------------------------


def encode_history(key: bytes, *, pool: str, history: str) -> bytes:
    """The signed record naming a location's pool and current history."""
    record: dict[str, Any] = {"format": FORMAT, "threadbound": THREADBOUND_VERSION, "created_at": time.time(),
                              "pool": pool, "history": history, "key_id": key_id(key)}
    record["signature"] = _sign(key, record)
    return HISTORY_MAGIC + msgpack.packb(record, use_bin_type=True)


def read_history(data: bytes, key: bytes, name: str = "<history>") -> dict[str, Any]:
    """A verified history record: its format and signature checked. Never unpickles."""
    if not data.startswith(HISTORY_MAGIC):
        raise SnapshotCorrupt(name, "not a threadbound history record (bad magic bytes)")
    try:
        record = msgpack.unpackb(data[len(HISTORY_MAGIC):], raw=False, strict_map_key=False)
    except Exception as exc:
        raise SnapshotCorrupt(name, f"the history record is unreadable ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise SnapshotCorrupt(name, "the history record is not a mapping")
    check_format(record, name, "history record")
    _check_signature(record, key, name)
    if not isinstance(record.get("history"), str) or not isinstance(record.get("pool"), str):
        raise SnapshotCorrupt(name, "the history record names no pool or history")
    return record

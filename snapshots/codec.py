"""The snapshot file format: a signed msgpack manifest, then a cloudpickle payload.

    b"TBSNAP\\n" | u32 manifest length | msgpack manifest | payload

The manifest (format version, threadbound version, created-at, snapshot number,
task ids and states, payload size, SHA-256, key id, HMAC-SHA256 signature) is
plain msgpack: ``threadbound snapshots ls/show`` read it without unpickling
anything. Loading checks, in order, the magic, the format version, the signature
over the manifest, the payload size and the payload checksum -- and only then
unpickles. A tampered, truncated, foreign-key or swapped snapshot is refused with
:class:`SnapshotCorrupt` naming the file and the reason.
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
FORMAT = 1  # bump on any change of layout or payload shape; add a migration or refuse
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
           extra: dict[str, Any] | None = None, payload: bytes | None = None) -> bytes:
    """A whole snapshot file: ``payload_obj`` cloudpickled (or ``payload`` as given) and signed."""
    if payload is None:
        payload = cloudpickle.dumps(payload_obj)
    manifest: dict[str, Any] = {
        "format": FORMAT, "threadbound": THREADBOUND_VERSION, "created_at": time.time(),
        "seq": seq, "tasks": dict(tasks), "payload_size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(), "key_id": key_id(key),
        **(extra or {}),
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


def verify(data: bytes, key: bytes, name: str = "<snapshot>") -> tuple[dict[str, Any], bytes]:
    """Check a snapshot completely; return its manifest and the (still pickled) payload."""
    manifest, at = read_manifest(data, name)
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise UnsupportedFormat(name, f"unsupported snapshot format v{fmt} (written by threadbound "
                                      f"{manifest.get('threadbound', '?')}; this threadbound "
                                      f"{THREADBOUND_VERSION} reads v{FORMAT}); resume it with the "
                                      "version that wrote it, or start with an empty snapshot_dir")
    signature = manifest.get("signature")
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _sign(key, manifest)):
        theirs, ours = manifest.get("key_id"), key_id(key)
        if theirs != ours:
            raise SnapshotCorrupt(name, f"signed with a different key (key id {theirs}; this pool's key "
                                        f"is {ours}); set THREADBOUND_SNAPSHOT_KEY or snapshots.key_file "
                                        "to the key that wrote it")
        raise SnapshotCorrupt(name, "the signature does not match the manifest (tampered)")
    payload = data[at:]
    if len(payload) != manifest.get("payload_size"):
        raise SnapshotCorrupt(name, f"truncated or padded: the payload is {len(payload)} bytes, "
                                    f"the manifest says {manifest.get('payload_size')}")
    if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
        raise SnapshotCorrupt(name, "the payload's SHA-256 does not match the manifest "
                                    "(corrupted, or a payload from another snapshot)")
    return manifest, payload


def decode(data: bytes, key: bytes, name: str = "<snapshot>") -> tuple[dict[str, Any], Any]:
    """Verify, then unpickle: the manifest and the payload object."""
    manifest, payload = verify(data, key, name)
    return manifest, cloudpickle.loads(payload)

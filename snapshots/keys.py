"""The signing key: from an explicit value, ``THREADBOUND_SNAPSHOT_KEY``, or a key file.

A key file that does not exist is created with 32 random bytes (hex) and mode 0600.
A key file others can read is refused, as ssh refuses such a private key: anyone
who can read it can forge snapshots that this runtime would unpickle.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Mapping

from .errors import SnapshotError

KEY_ENV = "THREADBOUND_SNAPSHOT_KEY"
DEFAULT_KEY_FILE = "~/.threadbound/snapshot.key"
MIN_KEY_BYTES = 16


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key: errors may show it, it reveals nothing."""
    return hashlib.sha256(b"threadbound-key-id:" + key).hexdigest()[:12]


def load_key(key_file: str | os.PathLike | None = None, *,
             env: Mapping[str, str] | None = None) -> bytes:
    """The snapshot signing key.

    Order: ``THREADBOUND_SNAPSHOT_KEY`` in ``env`` (default ``os.environ``), then
    ``key_file`` (default ``~/.threadbound/snapshot.key``), created on first use.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "k")
        >>> load_key(path, env={}) == load_key(path, env={})
        True
    """
    env = os.environ if env is None else env
    value = env.get(KEY_ENV, "")
    if value:
        key = value.encode()
        if len(key) < MIN_KEY_BYTES:
            raise SnapshotError(KEY_ENV, f"the key must be at least {MIN_KEY_BYTES} characters; "
                                         "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'`")
        return key
    path = Path(os.path.expanduser(os.fspath(key_file or DEFAULT_KEY_FILE)))
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _create(path)
    except OSError as exc:
        raise SnapshotError(str(path), f"cannot read the snapshot key file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SnapshotError(str(path), f"the snapshot key file is accessible by others "
                                           f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")
        key = fh.read().strip()
    if len(key) < MIN_KEY_BYTES:
        raise SnapshotError(str(path), f"the snapshot key file holds fewer than {MIN_KEY_BYTES} bytes; "
                                       "delete it to have a new key created")
    return key


def _create(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return load_key(path, env={})
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key

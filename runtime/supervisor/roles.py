"""The roles a pool runs: each role's agent class, kept as a cloudpickled blob under its
digest (one copy however many tasks use it; a task remembers the digest it was
submitted with, so re-registering a role never changes a task already running)."""

from __future__ import annotations

from .task_state import digest


class RoleBook:
    """``roles``: role -> blob; ``ids``: role -> digest; ``blobs``: digest -> blob."""

    def __init__(self, roles: dict[str, bytes] | None = None) -> None:
        self.roles: dict[str, bytes] = {}
        self.ids: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}
        if roles:
            self.set(roles)

    def set(self, blobs: dict[str, bytes]) -> dict[str, bytes]:
        """Add or replace roles; returns the ones that changed."""
        changed = {}
        for role, blob in blobs.items():
            d = digest(blob)
            if self.ids.get(role) != d:
                changed[role] = blob
            self.roles[role], self.ids[role] = blob, d
            self.blobs[d] = blob
        return changed

    def restore(self, ids: dict[str, str], blobs: dict[str, bytes]) -> None:
        """Take up a snapshot's roles; roles registered before (the resuming client's) win."""
        self.blobs.update(blobs)
        given = dict(self.roles)
        self.roles, self.ids = {}, {}
        self.set({r: self.blobs[d] for r, d in ids.items() if d in self.blobs})
        self.set(given)

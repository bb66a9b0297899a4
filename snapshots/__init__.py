"""Durable runtime state: snapshot codec, integrity, stores, retention (arrives with the snapshots work)."""

__all__: list[str] = []

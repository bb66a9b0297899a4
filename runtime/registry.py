"""Roles: names mapped to Agent classes, shipped to agent actors as cloudpickle blobs."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import cloudpickle

from threadbound.agents.base import Agent

from .errors import AgentNotLoadable, ConfigError

BUILTIN_ROLES: dict[str, str] = {
    "coder": "threadbound.agents.tool_coder:Coder",  # the tool-using loop
    "coder-wholefile": "threadbound.agents.builtin:WholeFileCoder",  # the whole workspace in one prompt
    "tester": "threadbound.agents.builtin:Tester",
    "reviewer": "threadbound.agents.builtin:Reviewer",
}


def load_agent_class(role: str, spec: Any) -> type:
    """Resolve a class or a ``"package.module:Class"`` path to an Agent subclass."""
    cls = spec
    if isinstance(spec, str):
        mod_name, sep, attr = spec.partition(":")
        if not sep or not mod_name or not attr:
            raise AgentNotLoadable(
                f"agents.{role}: {spec!r} is not an import path; write it as 'package.module:ClassName'",
                agent=role)
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise AgentNotLoadable(
                f"agents.{role}: cannot import module {mod_name!r} ({exc}); install it or fix the path",
                agent=role) from None
        try:
            cls = getattr(module, attr)
        except AttributeError:
            raise AgentNotLoadable(f"agents.{role}: module {mod_name!r} has no {attr!r}", agent=role) from None
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise AgentNotLoadable(
            f"agents.{role}: {spec!r} is not a subclass of threadbound.agents.Agent; "
            "subclass it and implement step(ctx)", agent=role)
    # An adapter role (threadbound.agents.adapters) says when its framework, an optional
    # extra, is not installed: refused here, before Ray starts, naming the pip line.
    check = getattr(cls, "installation_problem", None)
    problem = check(role) if callable(check) else None
    if problem:
        raise ConfigError(f"agents.{role}", [(f"agents.{role}", problem)])
    return cls


def agent_blob(role: str, cls: type) -> bytes:
    """Pickle an agent class for shipping to agent actors; fail here, not in the actor."""
    try:
        blob = cloudpickle.dumps(cls)
        cloudpickle.loads(blob)
    except Exception as exc:
        raise AgentNotLoadable(
            f"agents.{role}: class {cls.__qualname__} cannot be pickled for its agent actor "
            f"({type(exc).__name__}: {exc}); keep locks, clients and open files out of class "
            "attributes and create them in __init__ or step()", agent=role) from None
    return blob


def role_blobs(*sources: Mapping[str, Any] | None) -> dict[str, bytes]:
    """Blobs for the built-in roles overlaid with each mapping in ``sources``, in order."""
    specs: dict[str, Any] = dict(BUILTIN_ROLES)
    for src in sources:
        for role, spec in (src or {}).items():
            if not isinstance(role, str) or not role or "/" in role:
                raise AgentNotLoadable(f"agents: role name {role!r} must be a non-empty string without '/'")
            specs[role] = spec
    return {role: agent_blob(role, load_agent_class(role, spec)) for role, spec in specs.items()}

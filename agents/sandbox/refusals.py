"""The checks that refuse a sandboxed run: before it (a hidden path covering Python) and
after it (a launcher that did not start, a layer ``required`` insists on not applied)."""

from __future__ import annotations

from . import mounts
from .settings import Layer, SandboxResult, SandboxSettings, SandboxUnavailable


def _reveal(hidden: list[str], settings: SandboxSettings) -> list[str]:
    """Before anything runs: a hidden path that covers the interpreter, Python's prefixes
    or this package would leave the launcher nothing to start. ``required`` refuses the
    run; ``best_effort`` shows those folders read-only (the rest stays hidden) and says so,
    unless the hidden path *is* one of them."""
    found = mounts.covering(hidden)
    if not found:
        return []
    stuck = [c for c in found if not mounts.revealable(c)]
    if settings.isolation == "required" or stuck:
        raise SandboxUnavailable(f"the sandbox cannot start, so the test command was not run "
                                 f"(sandbox.isolation: {settings.isolation}): "
                                 + mounts.covered_message(stuck or found, best_effort_helps=not stuck))
    return mounts.reveal_paths(found)


def required_layers(caps) -> list[str]:
    """The layers ``required`` insists on here: the namespaces and the uid always; Landlock
    where the kernel has it; seccomp where its filter could be built."""
    out = ["namespaces", "user"]
    if caps.landlock_abi:
        out.append("landlock")
    if caps.seccomp[0] is not None:
        out.append("seccomp")
    return out


def _refuse_unless_held(result: SandboxResult, caps, isolation: str) -> None:
    """A run whose launcher did not start is no result (the command never ran); under
    ``required`` neither is one in which a required layer was not applied (the command
    ran with less isolation than asked for). Raise :class:`SandboxUnavailable` with the
    layers and why; a run a limit killed is left as it is (the limit is its result)."""
    wanted = required_layers(caps) if isolation == "required" else ["user"]
    missing = [result.layer(name) or Layer(name, False, _NO_REPORT) for name in wanted]
    missing = [layer for layer in missing if not layer.applied]
    started = not any(layer.detail == _NO_REPORT for layer in missing)
    if result.killed or not missing or (isolation != "required" and started):
        return
    tail = result.output.strip()[-600:]
    raise SandboxUnavailable(
        ("the sandbox's launcher did not start, so the test command never ran" if not started else
         "the sandbox did not apply every layer, so the test command's result is refused")
        + f" (sandbox.isolation: {isolation}): not applied: "
        + "; ".join(f"{layer.name} ({layer.detail})" for layer in missing)
        + (f". Its output: {tail}" if tail else "")
        + ". Run `threadbound doctor` from the pool's environment to see why"
        + ("; sandbox.isolation: best_effort runs with the layers that work" if isolation == "required" else ""))


_NO_REPORT = "the launcher did not report (it did not start)"

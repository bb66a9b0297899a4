"""What the sandbox sees: the bwrap argument list, built from an allow-list.

Nothing of the host is visible unless it is listed: the system directories (/usr,
/etc and the merged-/usr links), Python's own prefixes and site-packages (so test
commands run), the paths the config adds (``sandbox.read_only``), a fresh /proc, a
minimal /dev, an empty size-limited /tmp, and the task's copy, the only writable
place. Home directories are not on the list (only Python's prefix may lie in one, as
with pyenv). Paths to hide (snapshot store, key file, workspaces root, the user's
workspace, the per-user state directory, ``~/.threadbound``, ``~/.ray``, Ray's session
directory) are never
bound, and where one lies under a bound path an empty tmpfs is mounted over it.
"""

from __future__ import annotations

import functools
import os
import site
import sys
from dataclasses import dataclass
from pathlib import Path

_SYSTEM = ("/usr", "/etc")
_MERGED = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _norm(p: str) -> str:
    return os.path.realpath(os.path.expanduser(p))


def _under(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=1)
def python_paths() -> list[str]:
    """Python's prefixes and package directories (what a test command needs to import)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    paths.update(p for p in sys.path if p and os.path.isabs(p) and ("site-packages" in p or "dist-packages" in p))
    return sorted({_norm(p) for p in paths if os.path.exists(p)})


def default_hidden() -> list[str]:
    """Places that hold the pool user's secrets, whatever the config says.

    Home directories are not on the allow-list anyway (only Python's own prefix may
    lie in one, as with pyenv); these are hidden even under a path that is bound.
    """
    home = os.path.expanduser("~")
    xdg_state = os.environ.get("XDG_STATE_HOME", "")
    state = os.path.join(xdg_state if os.path.isabs(xdg_state) else os.path.join(home, ".local", "state"),
                         "threadbound")  # the pool's default snapshot store and key
    out = [os.path.join(home, ".threadbound"), state, os.path.join(home, ".ray"), os.path.join(home, ".ssh"),
           os.environ.get("RAY_TMPDIR") or "/tmp/ray"]
    token = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token:
        out.append(os.path.dirname(token) or token)
    return [_norm(p) for p in out]


def hidden_paths(settings_hide: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Every path a run hides: :func:`default_hidden` plus the settings' (normalised, once each)."""
    out: list[str] = []
    for p in [*default_hidden(), *(_norm(h) for h in settings_hide if h)]:
        if p not in out:
            out.append(p)
    return out


@dataclass(frozen=True)
class Covered:
    """A hidden path that covers something the sandbox must see to run at all."""

    hidden: str  # the hidden path, as the run hides it
    what: str  # "the interpreter", "Python's prefix (sys.prefix)", ..., "the threadbound package"
    path: str  # the covered path

    def __str__(self) -> str:
        return f"{self.hidden} (hidden) covers {self.what} {self.path}"


def needed_paths(executable: str | None = None, prefixes: dict[str, str] | None = None,
                 package: str | None = None) -> list[tuple[str, str]]:
    """(what, path) the sandbox needs visible: the interpreter the launcher is started with
    (as the path it is called by, and its target), Python's prefixes, and this package.

    Arguments default to this process's (``sys.executable``, ``sys.prefix``,
    ``sys.base_prefix``, ``sys.exec_prefix``, the ``threadbound.agents`` folder).
    """
    exe = executable or sys.executable
    if prefixes is None:
        prefixes = {"Python's prefix (sys.prefix)": sys.prefix, "Python's base prefix (sys.base_prefix)":
                    sys.base_prefix, "Python's exec prefix (sys.exec_prefix)": sys.exec_prefix}
    pkg = package or str(Path(__file__).resolve().parent.parent)
    out = [("the interpreter", exe)]
    if os.path.realpath(exe) != os.path.abspath(exe):
        out.append(("the interpreter's target", os.path.realpath(exe)))
    out += list(prefixes.items())
    out.append(("the threadbound package", pkg))
    return out


def _forms(p: str, resolve_file: bool = True) -> set[str]:
    """The spellings a path is reached by: as written (absolute), with its folders resolved
    (how a symbolic link at the end is itself found), and fully resolved -- for a file only
    if ``resolve_file`` (an interpreter's target is a needed path of its own)."""
    a = os.path.abspath(os.path.expanduser(p))
    out = {a, os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))}
    if resolve_file or os.path.isdir(a):
        out.add(os.path.realpath(a))
    return out


def _wanted(needed: tuple[tuple[str, str], ...]) -> list[tuple[str, str, set[str]]]:
    return [(what, path, _forms(path, False)) for what, path in needed if path]


@functools.lru_cache(maxsize=1)
def _default_wanted() -> list[tuple[str, str, set[str]]]:  # this process's Python does not move
    return _wanted(tuple(needed_paths()))


def covering(hidden: list[str], needed: list[tuple[str, str]] | None = None) -> list[Covered]:
    """The hidden paths that cover (are, or contain) something in ``needed``
    (default :func:`needed_paths`): the sandbox hides them, so what they cover is
    missing inside and the launcher, or the tests, cannot start.

    One check for the runner (before a run) and ``threadbound doctor``. Both sides
    are compared as written and resolved, so a symbolic link on either side (a
    virtualenv's ``bin/python``, a hidden folder reached through a link) is seen.

    Examples:
        >>> covering(["/home/u/.cache/tb"], [("the interpreter", "/home/u/.cache/tb/venv/bin/python")])[0].hidden
        '/home/u/.cache/tb'
        >>> covering(["/home/u/.ray"], [("the interpreter", "/home/u/.venv/bin/python")])
        []
    """
    wanted = _default_wanted() if needed is None else _wanted(tuple(needed))
    out: list[Covered] = []
    seen: set[tuple[str, str]] = set()
    for h in hidden:
        if not h:
            continue
        hforms = _forms(h)
        for what, path, forms in wanted:
            if (h, path) not in seen and any(_under(f, hf) for f in forms for hf in hforms):
                seen.add((h, path))
                out.append(Covered(h, what, path))
    return out


def covered_message(found: list[Covered], best_effort_helps: bool = True) -> str:
    """What is hidden, what that hides, and the ways out (for SandboxUnavailable and the doctor)."""
    hidden = sorted({c.hidden for c in found})
    return (f"the sandbox hides {', '.join(hidden)}, which covers what it needs to start: "
            + "; ".join(f"{c.what} {c.path}" for c in found)
            + ". Inside the sandbox that is missing, so no test command can run there. Fix one of: move the "
            "virtualenv (or the package) out of it; point what is hidden elsewhere (RAY_AUTH_TOKEN_PATH for "
            "Ray's token folder, snapshot_dir / snapshots.key_file / THREADBOUND_WORKSPACES for the pool's "
            "own places, sandbox.hide for your own)"
            + ("; or set sandbox.isolation: best_effort, which shows Python's own folders inside it "
               "(read-only) and keeps the rest of it hidden" if best_effort_helps else "")
            + ". `threadbound doctor` checks this")


def revealable(c: Covered) -> bool:
    """Whether ``best_effort`` can show what ``c`` covers and keep the rest hidden: only
    when it lies strictly inside the hidden path (a hidden path that *is* Python's
    prefix, or lies inside what must be shown, cannot be both shown and hidden)."""
    pairs = [(f, hf) for f in _forms(c.path, False) for hf in _forms(c.hidden)]
    return not any(f == hf for f, hf in pairs) and any(_under(f, hf) for f, hf in pairs)


def reveal_paths(found: list[Covered]) -> list[str]:
    """The folders ``best_effort`` shows read-only inside hidden paths: what each revealable
    ``Covered`` needs (a folder, or the folder a file is found in), the outermost of nested ones."""
    wanted = set()
    for c in found:
        if revealable(c):
            a = os.path.abspath(os.path.expanduser(c.path))
            wanted.add(os.path.realpath(a) if os.path.isdir(a) else os.path.realpath(os.path.dirname(a)))
    out: list[str] = []
    for p in sorted(wanted, key=len):
        if os.path.exists(p) and not any(_under(p, r) for r in out):
            out.append(p)
    return out


def plan(copy: str, read_only: list[str], hidden: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(read-only binds, symlinks as "target:link", tmpfs hides) for one run.

    A read-only path inside a hidden one is dropped (it would reveal it), as is one
    inside another read-only path (bound already); a hidden path inside a bound one
    gets a tmpfs over it.
    """
    copy = _norm(copy)
    hidden = sorted({_norm(h) for h in hidden})
    links, ro = [], []
    for p in _MERGED:
        if os.path.islink(p):
            links.append(f"{os.readlink(p)}:{p}")
        elif os.path.isdir(p):
            ro.append(p)
    wanted = [*_SYSTEM, *ro, *python_paths(), *(_norm(p) for p in read_only)]
    chosen: list[str] = []
    for p in sorted(set(wanted), key=len):
        if (not os.path.exists(p) or any(_under(p, h) for h in hidden) or _under(p, copy)
                or any(_under(p, c) for c in chosen)):
            continue
        chosen.append(p)
    covers = [h for h in hidden if os.path.exists(h) and any(_under(h, c) and h != c for c in chosen)]
    return chosen, links, covers


def bwrap_args(*, copy: str, read_only: list[str], hidden: list[str], env: dict[str, str], network: bool,
               root: bool, seccomp_fd: int | None, tmp_bytes: int, reveal: list[str] = ()) -> list[str]:
    """The bwrap options (without the binary and the command) for one run.

    ``reveal`` (``best_effort`` only, see :func:`reveal_paths`): folders inside hidden
    paths bound read-only over the hiding, with any hidden path inside them hidden again.
    """
    copy = _norm(copy)
    chosen, links, covers = plan(copy, read_only, hidden)
    reveal = [_norm(r) for r in reveal]
    args = ["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox"]
    if not network:
        args.append("--unshare-net")
    if root:  # no user namespace: bwrap keeps only what the launcher needs to drop to its uid
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns"]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    made: set[str] = set()
    for p in [*chosen, *reveal, copy]:  # parents bwrap would otherwise create 0700: the dropped uid must traverse them
        for parent in reversed(Path(p).parents):
            d = str(parent)
            if d not in made and d != "/" and not any(_under(d, c) for c in chosen) and d != "/tmp":
                made.add(d)
                args += ["--perms", "0755", "--dir", d]
    for p in chosen:
        args += ["--ro-bind", p, p]
    for spec in links:
        target, link = spec.split(":", 1)
        args += ["--symlink", target, link]
    for h in covers:  # an empty directory over a hidden directory, /dev/null over a hidden file
        args += ["--perms", "0755", "--tmpfs", h] if os.path.isdir(h) else ["--ro-bind", "/dev/null", h]
    for r in reveal:
        args += ["--ro-bind", r, r]
    for h in sorted({_norm(h) for h in hidden}):  # hidden again where it lies inside what was shown
        if os.path.exists(h) and any(_under(h, r) and h != r for r in reveal):
            args += ["--perms", "0755", "--tmpfs", h] if os.path.isdir(h) else ["--ro-bind", "/dev/null", h]
    args += ["--bind", copy, copy, "--clearenv"]  # the launcher enters the copy once it runs as its uid
    for k, v in sorted(env.items()):
        args += ["--setenv", k, v]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


def landlock_paths(copy: str, read_only: list[str], hidden: list[str], tmp: str,
                   reveal: list[str] = ()) -> dict[str, list[str]]:
    """Landlock rules where bwrap could not start: read only the allow-list, write the copy and tmp.

    Landlock rules only allow, so a hidden path under an allowed one is carved out:
    that directory is replaced by its entries, except the hidden one (and except
    symbolic links, which a rule would follow), down the hidden path's ancestry.
    """
    chosen, links, _ = plan(copy, read_only, hidden)
    hidden = sorted({_norm(h) for h in hidden})
    ro: list[str] = []
    for p in [*chosen, *(_norm(r) for r in reveal)]:
        ro += _allow_except(p, hidden)
    ro += [link.split(":", 1)[1] for link in links]
    dev = [d for d in ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom") if os.path.exists(d)]
    return {"ro": ro, "rw": [_norm(copy), _norm(tmp)], "dev": dev}


def _allow_except(path: str, hidden: list[str]) -> list[str]:
    if path in hidden:
        return []
    if not any(_under(h, path) and h != path for h in hidden):
        return [path]
    out: list[str] = []
    try:
        with os.scandir(path) as it:
            entries = [(e.path, e.is_symlink()) for e in it]
    except OSError:
        return []
    for child, is_link in entries:
        if not is_link:
            out += _allow_except(child, hidden)
    return out

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
               root: bool, seccomp_fd: int | None, tmp_bytes: int) -> list[str]:
    """The bwrap options (without the binary and the command) for one run."""
    copy = _norm(copy)
    chosen, links, covers = plan(copy, read_only, hidden)
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
    for p in [*chosen, copy]:  # parents bwrap would otherwise create 0700: the dropped uid must traverse them
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
    args += ["--bind", copy, copy, "--clearenv"]  # the launcher enters the copy once it runs as its uid
    for k, v in sorted(env.items()):
        args += ["--setenv", k, v]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


def landlock_paths(copy: str, read_only: list[str], hidden: list[str], tmp: str) -> dict[str, list[str]]:
    """Landlock rules where bwrap could not start: read only the allow-list, write the copy and tmp.

    Landlock rules only allow, so a hidden path under an allowed one is carved out:
    that directory is replaced by its entries, except the hidden one (and except
    symbolic links, which a rule would follow), down the hidden path's ancestry.
    """
    chosen, links, _ = plan(copy, read_only, hidden)
    hidden = sorted({_norm(h) for h in hidden})
    ro: list[str] = []
    for p in chosen:
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

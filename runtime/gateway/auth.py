"""Who may call the gateway: bearer tokens (read-only or submit), and how often.

Tokens come from ``THREADBOUND_GATEWAY_TOKENS`` (``TOKEN[:read|:submit],...``) or a
token file (one ``SCOPE TOKEN`` per line), which the first ``threadbound serve``
creates with mode 0600 and one token of each scope, printed once. Every comparison
runs over every known token with :func:`hmac.compare_digest`, so neither a match nor
its position shows in the time taken.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass

from threadbound.agents.errors import ThreadboundError

READ = "read"
SUBMIT = "submit"  # may also cancel
SCOPES = (READ, SUBMIT)
MIN_TOKEN_LEN = 16  # shorter secrets are guessable; refuse them rather than serve with them
ENV = "THREADBOUND_GATEWAY_TOKENS"


class TokenError(ThreadboundError, ValueError):
    """The gateway's tokens cannot be used as given (a bad entry, a short token, an open file)."""


@dataclass(frozen=True)
class Token:
    """One accepted token; ``id`` names it in logs and rate limits without showing it."""

    secret: bytes
    scope: str
    id: str


def parse_env(value: str) -> list[Token]:
    """``TOKEN[:read|:submit],...``; a token without a scope may submit."""
    tokens = []
    for n, entry in enumerate(e.strip() for e in value.split(",")):
        if not entry:
            continue
        secret, _, scope = entry.rpartition(":") if entry.rsplit(":", 1)[-1] in SCOPES else (entry, "", SUBMIT)
        tokens.append(_token(secret, scope, f"{ENV}[{n}]"))
    if not tokens:
        raise TokenError(f"{ENV} is set but names no token; give TOKEN[:read|:submit],... or unset it")
    return tokens


def _token(secret: str, scope: str, where: str) -> Token:
    if len(secret) < MIN_TOKEN_LEN:
        raise TokenError(f"{where}: a token must have at least {MIN_TOKEN_LEN} characters (got {len(secret)}); "
                         "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not secret.isascii() or not secret.isprintable() or " " in secret:
        raise TokenError(f"{where}: a token must be printable ASCII without spaces")
    if scope not in SCOPES:
        raise TokenError(f"{where}: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return Token(secret.encode(), scope, where)


def read_file(path: str) -> list[Token]:
    """The tokens of a token file (``SCOPE TOKEN`` per line, ``#`` comments); refused
    when others can read it."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{path}: readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")
    tokens = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            scope, _, secret = line.partition(" ")
            tokens.append(_token(secret.strip(), scope, f"{path}:{n}"))
    if not tokens:
        raise TokenError(f"{path}: no token in it; delete it to have a new one made, or add 'submit TOKEN' lines")
    return tokens


def create_file(path: str) -> dict[str, str]:
    """Write a new token file (mode 0600, never over an existing one); returns its
    tokens by scope, to be shown once."""
    made = {SUBMIT: secrets.token_urlsafe(32), READ: secrets.token_urlsafe(32)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# threadbound gateway tokens: SCOPE TOKEN per line (scope: submit or read)\n")
        for scope, secret in made.items():
            fh.write(f"{scope} {secret}\n")
    return made


def load(path: str | None, env: dict[str, str] | None = None) -> tuple[list[Token], dict[str, str] | None]:
    """The tokens to serve with: the environment variable if set, else the token file
    (created when missing). The second value holds new tokens to print once, or None."""
    env = os.environ if env is None else env
    if env.get(ENV):
        return parse_env(env[ENV]), None
    if path is None:
        raise TokenError(f"no tokens: set {ENV} or give a token file")
    made = None
    if not os.path.exists(path):
        made = create_file(path)
    return read_file(path), made


class Tokens:
    """The accepted tokens; ``find`` checks a presented one in constant time."""

    def __init__(self, tokens: list[Token]) -> None:
        if not tokens:
            raise TokenError("the gateway needs at least one token")
        self.tokens = list(tokens)

    def find(self, presented: str) -> Token | None:
        given = presented.encode("utf-8", "replace")
        found = None
        for token in self.tokens:  # no early exit: every token is compared every time
            if hmac.compare_digest(given, token.secret):
                found = token
        return found


class RateLimit:
    """A token bucket per token: ``burst`` requests at once, refilled at ``per_s`` a second.

    ``take`` returns 0 when the request may go, else the seconds until it may (for
    ``Retry-After``)."""

    def __init__(self, per_s: float, burst: int, clock=time.monotonic) -> None:
        self.per_s, self.burst, self.clock = per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: str) -> int:
        if self.per_s <= 0:
            return 0
        now = self.clock()
        with self._lock:
            level, at = self._buckets.get(who, (float(self.burst), now))
            level = min(float(self.burst), level + (now - at) * self.per_s)
            if level >= 1:
                self._buckets[who] = (level - 1, now)
                return 0
            self._buckets[who] = (level, now)
            return max(1, math.ceil((1 - level) / self.per_s))

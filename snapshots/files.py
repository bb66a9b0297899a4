"""The file names of one snapshot location (see :mod:`.location`): numbered snapshots
``snap-<n>.tbs``, journal segments ``journal-<n>.tbj`` and the history record ``history.tbh``."""

from __future__ import annotations

import re

_SNAP = re.compile(r"^snap-(\d{10})\.tbs$")
_JRNL = re.compile(r"^journal-(\d{10})\.tbj$")
HISTORY = "history.tbh"


def snap_name(seq: int) -> str:
    return f"snap-{seq:010d}.tbs"


def journal_name(seq: int) -> str:
    return f"journal-{seq:010d}.tbj"

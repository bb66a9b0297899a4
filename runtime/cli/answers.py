"""A person's part from the terminal: ``respond``, ``approve``, ``reject`` and ``send``
to a task of a running pool (the prompt ``run --approve`` shows when its task asks is
``run``'s own).

    threadbound respond t00001-ab12 '{"database": "postgres"}' --address auto
    threadbound respond t00001-ab12 --text "use the cache" --address auto
    threadbound approve t00001-ab12 --address auto
    threadbound reject t00001-ab12 --reason "not this way" --address auto
    threadbound send t00001-ab12 "also update the changelog" --address auto

Each prints the offset of the event that records it (``input_received`` or
``message_received``); a task that is not waiting, or a request already answered, is
an error naming the task and the request (exit 2).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from .common import BadInput, attach
from .render import out


def _parse(text: str, as_text: bool, what: str) -> Any:
    if as_text:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(what, f"is not JSON ({exc.msg} at character {exc.pos}): {text[:60]!r}; a text needs "
                             "quotes inside the shell's ('\"use the cache\"'), or pass --text") from None


def _task(args: argparse.Namespace) -> Any:
    pool = attach(args)
    if pool is None:
        return None
    return pool.task(args.task)  # an unknown id raises TaskNotFound, naming it


def _answer(args: argparse.Namespace, what: str, call: Callable[[Any], int]) -> int:
    """Attach, make ``call(handle)``, and say which event records it."""
    handle = _task(args)
    if handle is None:
        return 2
    offset = call(handle)
    kind = "message_received" if what == "sent" else "input_received"
    out(f"task {handle.task_id}: {what} ({kind}, offset {offset})")
    return 0


def cmd_respond(args: argparse.Namespace) -> int:
    value = _parse(args.value, args.text, "VALUE")  # bad input is named before Ray starts
    return _answer(args, "answered", lambda h: h.respond(value, args.request))


def cmd_approve(args: argparse.Namespace) -> int:
    return _answer(args, "approved", lambda h: h.approve(args.request))


def cmd_reject(args: argparse.Namespace) -> int:
    return _answer(args, "rejected", lambda h: h.reject(args.reason, args.request))


def cmd_send(args: argparse.Namespace) -> int:
    message = _parse(args.message, not args.json, "MESSAGE")
    return _answer(args, "sent", lambda h: h.send(message))

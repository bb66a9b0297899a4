"""A person's part from the terminal: ``respond``, ``approve``, ``reject`` and ``send``
to a task of a running pool, and the prompt ``run --approve`` shows when its task asks.

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
import sys
from typing import Any, Callable, TextIO

from .cli_render import visible
from .cli_run import BadInput, say
from .task import Event


def _parse(text: str, as_text: bool, what: str) -> Any:
    if as_text:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(what, f"is not JSON ({exc.msg} at character {exc.pos}): {text[:60]!r}; a text needs "
                             "quotes inside the shell's ('\"use the cache\"'), or pass --text") from None


def _task(args: argparse.Namespace) -> Any:
    from .cli import _attach

    pool = _attach(args)
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
    print(f"task {handle.task_id}: {what} ({kind}, offset {offset})")
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


def add_parsers(command: Callable[..., argparse.ArgumentParser], ray_flags: argparse.ArgumentParser) -> None:
    """The ``respond``, ``approve``, ``reject`` and ``send`` subcommands."""

    def task_command(name: str, help: str) -> argparse.ArgumentParser:
        p = command(name, help, [ray_flags])
        p.add_argument("task", metavar="TASK", help="the task's id (threadbound tasks lists them)")
        p.add_argument("--name", default=None, help="pool name (default: the config's name)")
        return p

    def request_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--request", type=int, default=None, metavar="N",
                       help="which request, when the task waits for several (the number in input_requested)")

    respond = task_command("respond", "answer a task that waits for a person (an agent's question)")
    respond.add_argument("value", metavar="VALUE", help="the answer, as JSON (with --text: as it is)")
    respond.add_argument("--text", action="store_true", help="VALUE is plain text, not JSON")
    request_flag(respond)
    respond.set_defaults(func=cmd_respond)

    approve = task_command("approve", "approve the change a task waits with (run --approve): it is applied")
    request_flag(approve)
    approve.set_defaults(func=cmd_approve)

    reject = task_command("reject", "reject the change a task waits with: the task fails with your reason")
    reject.add_argument("--reason", default="", help="why (the task's error says it)")
    request_flag(reject)
    reject.set_defaults(func=cmd_reject)

    send = task_command("send", "send input to a running task: its agents' later steps see it in ctx.inbox")
    send.add_argument("message", metavar="MESSAGE", help="the message, as text (with --json: as JSON)")
    send.add_argument("--json", action="store_true", help="MESSAGE is JSON, not plain text")
    send.set_defaults(func=cmd_send)


EXAMPLES = {
    "respond": """examples:
  threadbound respond t00001-ab12 '{"database": "postgres"}' --address auto
  threadbound respond t00001-ab12 --text "use the cache" --address auto
  threadbound respond t00001-ab12 '"yes"' --request 2 --address auto""",
    "approve": """examples:
  threadbound approve t00001-ab12 --address auto""",
    "reject": """examples:
  threadbound reject t00001-ab12 --reason "keep the old name" --address auto""",
    "send": """examples:
  threadbound send t00001-ab12 "also update the changelog" --address auto
  threadbound send t00001-ab12 --json '{"priority": "high"}' --address auto""",
}


# -- run --approve: answering in the terminal that follows the task ------------------------

APPROVAL_PROMPT = "approve? y = apply and finish, n [reason] = reject, anything else = feedback for another round > "


def read_answer(ev: Event, stdin: TextIO = sys.stdin) -> Any | None:
    """Ask in the terminal for the answer to ``ev`` (an ``input_requested``); None if
    there is none (an empty line, or end of input)."""
    payload = ev.data.get("payload")
    approval = isinstance(payload, dict) and payload.get("kind") == "approval"
    if approval and payload.get("diff"):
        say(visible(str(payload["diff"]).rstrip("\n")))
    say(APPROVAL_PROMPT if approval else "your answer (JSON, or text) > ")
    line = stdin.readline()
    text = line.strip()
    if not text:
        return None
    if approval:
        word, _, rest = text.partition(" ")
        if word.lower() in ("y", "yes", "approve"):
            return {"approve": True}
        if word.lower() in ("n", "no", "reject"):
            return {"approve": False, "reason": rest.strip()}
        return {"feedback": text}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def answer_in_terminal(handle: Any, ev: Event, stdin: TextIO = sys.stdin) -> None:
    """``run``'s answer to a question its task asks, when a person sits at the terminal."""
    value = read_answer(ev, stdin)
    if value is None:
        say(f"not answered here; answer with `threadbound respond {handle.task_id} JSON` "
            f"(or approve/reject) from another terminal")
        return
    from threadbound.agents.errors import ThreadboundError

    try:
        handle.respond(value, ev.data.get("request"))
    except ThreadboundError as exc:  # answered elsewhere first, or refused: say so, keep following
        say(f"threadbound: {exc}")

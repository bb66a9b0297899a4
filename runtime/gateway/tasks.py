"""The gateway's task routes: submit (a JSON body checked field by field, a workspace
only under the served roots), list by page, get (waiting up to ``MAX_WAIT_S``), cancel."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from threadbound.agents.errors import ThreadboundError
from threadbound.agents.hostile_fs import SECRET_DIRS
from threadbound.agents.events import STATUSES

from ..errors import InvalidTask
from ..task import Task, TaskResult
from .auth import SUBMIT
from .wire import Problem, SafeJSON, _from_error, _int_param, dumps

TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
MAX_WAIT_S = 60.0  # longest GET /v1/tasks/{id}?wait=S holds a request
MAX_PAGE = 500
MAX_PAGE_BYTES = 256 * 1024  # a page of GET /v1/tasks ends past this many bytes (its `next` goes on)
PREVIEW_CHARS = 500  # of a goal or an error, in a page of GET /v1/tasks


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class TaskRoutes:
    """The task routes of :class:`~.app.Gateway` (a mixin: ``self`` is the gateway)."""

    async def submit(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        body = await self._json_body(request)
        task = self._task(body, request.headers.get("idempotency-key"))
        try:
            handle = await self.pool.asubmit(task)
        except ThreadboundError as exc:
            raise _from_error(exc) from None
        summary = await self.answer(self.pool.asummary(handle.task_id))
        return SafeJSON({"task_id": handle.task_id, "status": summary.status, "created": handle.created},
                            201 if handle.created else 200,
                            headers={"Location": f"/v1/tasks/{handle.task_id}", "Cache-Control": "no-store"})
    def _task(self, body: Any, key: str | None) -> Task:
        """The JSON body as a :class:`Task`; field types checked here, the rest by
        ``Task.validated`` in ``asubmit`` (same messages as in Python)."""
        if not isinstance(body, dict):
            raise Problem(422, "invalid task: body: must be a JSON object of the task's fields, e.g. "
                               '{"goal": "make the tests pass", "agents": ["coder"]}', "body", "InvalidTask")
        for name in body:
            if name not in TASK_FIELDS:
                near = difflib.get_close_matches(name, TASK_FIELDS, 1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known fields: {', '.join(TASK_FIELDS)}"
                raise _from_error(InvalidTask(str(name)[:80], "is not a field of a task" + hint))
        if key is not None:
            if body.get("idempotency_key") not in (None, key):
                raise _from_error(InvalidTask("idempotency_key", "the Idempotency-Key header and the body's "
                                                                 "idempotency_key differ; send one of them"))
            body = {**body, "idempotency_key": key}
        if "goal" not in body:
            raise _from_error(InvalidTask("goal", "must be a non-empty string saying what to achieve"))
        ws = body.get("workspace")
        if ws is not None:
            body = {**body, "workspace": self._workspace(ws)}
        agents = body.get("agents")
        if agents is not None and not isinstance(agents, (str, list)):
            raise _from_error(InvalidTask("agents", f"must be a list of role names, got {type(agents).__name__}"))
        try:
            return Task(**body)
        except (TypeError, ValueError) as exc:
            raise Problem(422, f"invalid task: {exc}", None, "InvalidTask") from None

    def _workspace(self, ws: Any) -> str:
        if not isinstance(ws, str) or not ws or "\0" in ws:
            raise _from_error(InvalidTask("workspace", f"must be a directory path or null, got {ws!r:.80}"))
        if not self.roots:
            raise _from_error(InvalidTask("workspace", "this gateway serves no workspace directories; start it "
                                                       "with --workspace-root DIR to allow some"))
        path = os.path.realpath(os.path.join(self.roots[0], ws))
        if not any(_within(path, root) for root in self.roots):
            raise _from_error(InvalidTask("workspace", f"{ws!r} is outside the directories this gateway serves "
                                                       f"({', '.join(self.roots)})"))
        if path in self.roots:
            raise _from_error(InvalidTask("workspace", f"{ws!r} is the served directory itself; name a project "
                                                       "directory under it"))
        root = next(r for r in self.roots if _within(path, r))
        secret_dir = next((p for p in os.path.relpath(path, root).split(os.sep) if p in SECRET_DIRS), None)
        if secret_dir:
            raise _from_error(InvalidTask("workspace", f"{ws!r} lies in a {secret_dir} directory, which holds "
                                                       "secrets; name a project directory"))
        for secret in self.protected:
            if _within(path, secret) or _within(secret, path):
                raise _from_error(InvalidTask("workspace", f"{ws!r} is, lies in or contains {secret}, which holds "
                                                           "secrets of the pool's user; name a project directory"))
        return path

    async def list_tasks(self, request: Request) -> Response:
        self.who(request)
        q = request.query_params
        statuses = None
        if q.get("status"):
            statuses = set(q["status"].split(","))
            bad = sorted(statuses - set(STATUSES))
            if bad:
                raise Problem(400, f"status: unknown status {bad[0][:40]!r}; one or more of {', '.join(STATUSES)}, "
                                   "comma-separated", "status")
        limit = _int_param(q["limit"], "limit", 1, MAX_PAGE) if "limit" in q else 50
        rows = [t for t in await self.answer(self.pool.atasks()) if statuses is None or t.status in statuses]
        if q.get("after"):
            ids = [t.task_id for t in rows]
            if q["after"] not in ids:
                raise Problem(400, f"after: no task {q['after'][:80]!r} among these (forgotten, or another "
                                   "status); start from the first page", "after")
            rows = rows[ids.index(q["after"]) + 1:]
        # Bounded by bytes as well as by count: each goal and error is cut to a preview
        # (GET /v1/tasks/{id} has them whole), and a page ends at MAX_PAGE_BYTES with a cursor.
        page, size = [], 0
        for t in rows[:limit]:
            row = _summary(t, preview=True)
            size += len(dumps(row))
            if page and size > MAX_PAGE_BYTES:
                break
            page.append(row)
        more = len(rows) > len(page)
        return SafeJSON({"tasks": page, "next": page[-1]["task_id"] if more else None},
                        headers={"Cache-Control": "no-store"})

    async def get_task(self, request: Request) -> Response:
        self.who(request)
        task_id = request.path_params["task_id"]
        wait = 0.0
        if "wait" in request.query_params:
            text = request.query_params["wait"]
            try:
                wait = float(text)
            except ValueError:
                wait = -1.0
            if not 0 <= wait <= MAX_WAIT_S:  # also NaN
                raise Problem(400, f"wait: seconds from 0 to {MAX_WAIT_S:g}, got {text[:40]!r}", "wait")
        result = await self.answer(self.pool.await_result(task_id, wait))
        summary = await self.answer(self.pool.asummary(task_id))  # after the wait: its status is the result's
        return SafeJSON({**_summary(summary), "result": _result(result)},
                            headers={"Cache-Control": "no-store"})

    async def cancel(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        task_id = request.path_params["task_id"]
        status = await self.answer(self.pool.acancel(task_id))
        return SafeJSON({"task_id": task_id, "status": status}, 202, headers={"Cache-Control": "no-store"})


def _summary(t: Any, preview: bool = False) -> dict[str, Any]:
    """A task's summary as JSON; with ``preview`` (a page of the list) its goal and error
    are cut to PREVIEW_CHARS characters, and ``truncated`` says whether they were."""
    d = dataclasses.asdict(t)
    d["agents"] = list(d["agents"])
    if preview:
        cut = False
        for name in ("goal", "error"):
            text = d.get(name)
            if isinstance(text, str) and len(text) > PREVIEW_CHARS:
                d[name], cut = text[:PREVIEW_CHARS] + "…", True
        d["truncated"] = cut
    return d


def _result(r: TaskResult | None) -> dict[str, Any] | None:
    """A result's fields, its outputs as the agents gave them (``asdict`` would copy them
    deeply and turn a dataclass among them into a dict)."""
    return None if r is None else {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}

"""The gateway's routes for a person in the loop: answer a task's open question,
approve or reject a proposal, send a message to a task's inbox."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .auth import SUBMIT
from .wire import Problem, SafeJSON


class PersonRoutes:
    """The person-in-the-loop routes of :class:`~.app.Gateway` (a mixin: ``self`` is the
    gateway)."""

    async def _input_body(self, request: Request, allowed: dict[str, bool]) -> dict[str, Any]:
        """A JSON object with only the ``allowed`` fields (name -> required); an empty body
        (no body at all, or only white space) is {}: approve and reject with no reason."""
        body = await self._json_body(request, empty={})
        if not isinstance(body, dict):
            raise Problem(422, f"body: must be a JSON object with {', '.join(allowed)}", "body", "InvalidInput")
        for name in body:
            if name not in allowed:
                raise Problem(422, f"{str(name)[:40]}: not a field here; the fields are {', '.join(allowed)}",
                              str(name)[:40], "InvalidInput")
        for name, required in allowed.items():
            if required and name not in body:
                raise Problem(422, f"{name}: missing", name, "InvalidInput")
        req = body.get("request")
        if req is not None and (isinstance(req, bool) or not isinstance(req, int) or req < 1):
            raise Problem(422, f"request: must be a request number (1, 2, ...) or null, got {req!r:.40}",
                          "request", "InvalidInput")
        return body

    async def _answer(self, request: Request, value: Any, req: int | None, what: str) -> Response:
        task_id = request.path_params["task_id"]
        # Through the task's handle: an answer is not sent twice across a supervisor restart.
        offset = await self.answer(self.pool.handle(task_id).arespond(value, req))
        return SafeJSON({"task_id": task_id, "offset": offset, "answer": what},
                            headers={"Cache-Control": "no-store"})

    async def respond(self, request: Request) -> Response:
        """Answer the task's open question (``value``, for request ``request`` when several are open)."""
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"value": True, "request": False})
        return await self._answer(request, body["value"], body.get("request"), "respond")

    async def approve(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"request": False})
        return await self._answer(request, {"approve": True}, body.get("request"), "approve")

    async def reject(self, request: Request) -> Response:
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"reason": False, "request": False})
        reason = body.get("reason") or ""
        if not isinstance(reason, str):
            raise Problem(422, "reason: must be a text", "reason", "InvalidInput")
        return await self._answer(request, {"approve": False, "reason": reason}, body.get("request"), "reject")

    async def send(self, request: Request) -> Response:
        """Append ``message`` to the task's inbox; its agents' later steps see it."""
        self.who(request, SUBMIT)
        body = await self._input_body(request, {"message": True})
        task_id = request.path_params["task_id"]
        offset = await self.answer(self.pool.handle(task_id).asend(body["message"]))  # (not sent twice either)
        return SafeJSON({"task_id": task_id, "offset": offset}, 202, headers={"Cache-Control": "no-store"})

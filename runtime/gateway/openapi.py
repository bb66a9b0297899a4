"""The gateway's OpenAPI 3.1 document, written out by hand so it says what the routes
do (the WebSocket stream, which OpenAPI cannot describe, is in the description)."""

from __future__ import annotations

from typing import Any

from threadbound.agents.events import STATUSES

from ..task import MAX_COST_BUDGET, MAX_INPUTS_DEPTH, MAX_PRIORITY, MAX_ROUNDS, MAX_SECONDS

_ERROR = {"$ref": "#/components/schemas/Error"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


_COMMON = {"401": _err("no token, or one this gateway does not know"),
           "429": _err("this token's rate limit; see Retry-After")}
_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_REQUEST = {"type": ["integer", "null"], "minimum": 1,
            "description": "which request (the number in input_requested), when several are open"}
_OFFSET = {"description": "recorded: the offset of its event (input_received or message_received)",
           "content": {"application/json": {"schema": {
               "type": "object", "required": ["task_id", "offset"],
               "properties": {"task_id": {"type": "string"}, "offset": {"type": "integer", "minimum": 0},
                              "answer": {"type": "string"}}}}}}
_INPUT_ERRORS = {"400": _err("malformed JSON"), "403": _err("a read-only token"), "404": _err("no such task"),
                 "409": _err("the task is not waiting for input, the request was answered already, or the task "
                             "has ended"),
                 "413": _err("the body is too large"), "422": _err("an answer or message the task cannot take")}


def _input_body(properties: dict[str, Any], required: list[str], *, required_body: bool = True) -> dict[str, Any]:
    return {"required": required_body, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "required": required, "properties": properties}}}}

DESCRIPTION = """\
threadbound's HTTP gateway: tasks over REST, their event logs over Server-Sent Events
(`GET /v1/tasks/{task_id}/events`) and WebSocket (`GET /v1/tasks/{task_id}/stream`,
JSON frames `{"offset", "kind", "agent", "data", "ts"}` from `?after=N`; the client may
send `{"cancel": true}` (answered with an error message if the token may not cancel);
closed with code 1000 after the terminal event, 4401/4404/4400 for a bad token, task or
offset). Authenticate with `Authorization: Bearer <token>`;
a WebSocket client that cannot send headers offers the subprotocols `threadbound.v1` and
`bearer.<token>`. Event ids are the log's offsets: resume with `Last-Event-ID` or `?after=N`.
"""


def document() -> dict[str, Any]:
    """The OpenAPI document served at ``/openapi.json``."""
    task_props: dict[str, Any] = {
        "goal": {"type": "string", "description": "what to achieve, in words (at most policy.max_goal_bytes)"},
        "workspace": {"type": ["string", "null"],
                      "description": "a directory under one of the gateway's --workspace-root directories"},
        "agents": {"type": ["array", "null"], "items": {"type": "string"}},
        "after": {"type": ["object", "null"], "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        "inputs": {"type": "object", "description": f"plain data for the agents, nested at most {MAX_INPUTS_DEPTH} "
                   "deep (the pool's policy may say less: policy.max_inputs_depth, policy.max_inputs_bytes)",
                   "properties": {"sandbox": {"type": "object", "additionalProperties": False, "properties": {
                       "wall_s": {"type": "number", "exclusiveMinimum": 0},
                       "cpu_s": {"type": "integer", "exclusiveMinimum": 0},
                       "memory_mb": {"type": "integer", "exclusiveMinimum": 0},
                       "max_procs": {"type": "integer", "exclusiveMinimum": 0},
                       "file_mb": {"type": "integer", "exclusiveMinimum": 0},
                       "disk_mb": {"type": "integer", "exclusiveMinimum": 0},
                       "max_files": {"type": "integer", "exclusiveMinimum": 0},
                       "network": {"type": "boolean"}}}}},
        "priority": {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY},
        "max_rounds": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_ROUNDS,
                       "description": "the pool's policy may allow fewer (policy.max_rounds)"},
        "step_timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        "task_timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        "wait_timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        "level": {"oneOf": [{"type": "integer", "enum": [1, 2, 3, 4]}, {"type": "string", "enum": ["auto"]},
                            {"type": "null"}]},
        "cost_budget": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_COST_BUDGET},
        "degrade": {"type": "boolean"},
        "idempotency_key": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
    }
    summary = {
        "type": "object",
        "required": ["task_id", "status", "goal", "agents", "round", "events", "submitted_at"],
        "properties": {
            "task_id": {"type": "string"}, "status": {"type": "string", "enum": list(STATUSES)},
            "goal": {"type": "string"}, "agents": {"type": "array", "items": {"type": "string"}},
            "round": {"type": "integer"}, "events": {"type": "integer"}, "submitted_at": {"type": "number"},
            "finished_at": {"type": ["number", "null"]}, "error": {"type": ["string", "null"]},
            "idempotency_key": {"type": ["string", "null"]},
            "truncated": {"type": "boolean", "description": "in a page of GET /v1/tasks: the goal or error is "
                                                            "cut to a preview (GET /v1/tasks/{task_id} has it whole)"},
        },
    }
    accepted = {"type": "object", "required": ["task_id", "status", "created"],
                "properties": {"task_id": {"type": "string"}, "status": {"type": "string"},
                               "created": {"type": "boolean"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "threadbound gateway", "version": "1", "description": DESCRIPTION},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Task": {"type": "object", "required": ["goal"], "properties": task_props,
                         "additionalProperties": False},
                "TaskSummary": summary,
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["type", "message"],
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                                   "field": {"type": ["string", "null"]}}}}},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Whether the pool answers (no token needed)", "security": [],
                                 "responses": {"200": {"description": "the pool answers"},
                                               "503": {"description": "it does not"}}}},
            "/metrics": {"get": {"summary": "The pool's Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {
                    "type": "string"}}}},
                "503": _err("this pool has no metrics"), **_COMMON}}},
            "/v1/tasks": {
                "post": {
                    "summary": "Submit a task",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Task"}}}},
                    "responses": {
                        "201": {"description": "a new task", "headers": {"Location": {"schema": {"type": "string"}}},
                                "content": {"application/json": {"schema": accepted}}},
                        "200": {"description": "the task this Idempotency-Key already made",
                                "content": {"application/json": {"schema": accepted}}},
                        "400": _err("malformed JSON"), "403": _err("a read-only token"),
                        "413": _err("the body is too large"), "422": _err("an invalid task"),
                        "503": _err("the pool is shutting down"), **_COMMON}},
                "get": {
                    "summary": "List tasks, oldest first, in pages bounded by count (limit) and by bytes; goals "
                               "and errors cut to a preview",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"},
                         "description": "comma-separated statuses"},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                    "maximum": 500}},
                        {"name": "after", "in": "query", "schema": {"type": "string"},
                         "description": "the last task id of the previous page (its `next`)"}],
                    "responses": {"200": {"description": "a page", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["tasks", "next"], "properties": {
                            "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/TaskSummary"}},
                            "next": {"type": ["string", "null"]}}}}}},
                        "400": _err("a bad parameter"), **_COMMON}}},
            "/v1/tasks/{task_id}": {"get": {
                "summary": "A task's summary, and its result once it has ended",
                "parameters": [_TASK_ID, {"name": "wait", "in": "query", "schema": {
                    "type": "number", "minimum": 0, "maximum": 60},
                    "description": "seconds to wait for the result"}],
                "responses": {"200": {"description": "the summary, with `result` (null until final)"},
                              "400": _err("a bad parameter"), "404": _err("no such task"), **_COMMON}}},
            "/v1/tasks/{task_id}/cancel": {"post": {
                "summary": "Cancel a task (idempotent); its stream ends with the cancelled event",
                "parameters": [_TASK_ID],
                "responses": {"202": {"description": "the task's status after the cancel"},
                              "403": _err("a read-only token"), "404": _err("no such task"), **_COMMON}}},
            "/v1/tasks/{task_id}/respond": {"post": {
                "summary": "Answer the task's question (an agent's ctx.interrupt, or the approval); the first "
                           "answer wins",
                "parameters": [_TASK_ID],
                "requestBody": _input_body({"value": {"description": "the answer: any JSON value"},
                                            "request": _REQUEST}, ["value"]),
                "responses": {"200": _OFFSET, **_INPUT_ERRORS, **_COMMON}}},
            "/v1/tasks/{task_id}/approve": {"post": {
                "summary": "Approve the change the task waits with (inputs.approve): applied, and the task succeeds",
                "parameters": [_TASK_ID],
                "requestBody": _input_body({"request": _REQUEST}, [], required_body=False),
                "responses": {"200": _OFFSET, **_INPUT_ERRORS, **_COMMON}}},
            "/v1/tasks/{task_id}/reject": {"post": {
                "summary": "Reject the change the task waits with: it fails with the reason",
                "parameters": [_TASK_ID],
                "requestBody": _input_body({"reason": {"type": "string"}, "request": _REQUEST}, [], required_body=False),
                "responses": {"200": _OFFSET, **_INPUT_ERRORS, **_COMMON}}},
            "/v1/tasks/{task_id}/messages": {"post": {
                "summary": "Send input to the task: a message_received event; its agents' later steps see it "
                           "in ctx.inbox",
                "parameters": [_TASK_ID],
                "requestBody": _input_body({"message": {"description": "any JSON value"}}, ["message"]),
                "responses": {"202": _OFFSET, **_INPUT_ERRORS, **_COMMON}}},
            "/v1/tasks/{task_id}/events": {"get": {
                "summary": "The task's events as Server-Sent Events, to the terminal one",
                "parameters": [_TASK_ID,
                               {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": -1},
                                "description": "the last offset the client has"},
                               {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                                "description": "as after; wins over it"}],
                "responses": {"200": {"description": "id = offset, event = kind, data = the event as JSON",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              "400": _err("a bad offset"), "404": _err("no such task"), **_COMMON}}},
        },
    }

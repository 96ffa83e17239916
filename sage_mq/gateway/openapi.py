"""The gateway's OpenAPI document, as the gateway really answers.

FastAPI documents what a route returns when all goes well and its own 422; the gateway also
refuses with keys (401/403), sizes (413), our errors (400/404/409/503/504) and, on OpenAI's
routes, OpenAI's error shape with 400 for a bad body. The inference routes, served ahead of
FastAPI, are added by hand. A client generator, and schemathesis in the tests, read this.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message", "retryable"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "retryable": {"type": "boolean"},
            },
        }
    },
}
"""Management errors: ``{"error": {type, message, retryable}}``."""

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
"""Errors everywhere else, in OpenAI's shape."""

_WHY = {
    400: "The request cannot succeed as written (the message says what to change)",
    401: "A key is missing or wrong",
    403: "No key opens this route here (management without an admin key)",
    404: "No such id, or no such model",
    409: "Refused by the fleet: no capacity, not allowed on any node, or failed",
    413: "The body is larger than this gateway takes",
    422: "A field does not fit its type or range",
    502: "The engine failed mid-answer",
    503: "Redis, or every replica, cannot be reached now; try again",
    504: "Not done within the time asked to wait",
}

_MANAGEMENT = (400, 401, 403, 409, 413, 422, 503, 504)
_OPENAI = (400, 401, 404, 413, 503)
_INFERENCE = (400, 401, 404, 413, 502, 503)


def document(app: FastAPI, *, keyed: bool = False) -> dict[str, Any]:
    """The document for ``app`` (made once, then kept, as FastAPI's own). ``keyed``: the
    gateway has keys, so every route but ``/health`` wants a bearer key."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update({"Error": ERROR, "OpenAIError": OPENAI_ERROR})
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            _refusals(path, operation)
    schema["paths"].update(inference_paths())
    if keyed:
        components["securitySchemes"] = {"key": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"key": []}]
        schema["paths"]["/health"]["get"]["security"] = []
    schema["components"]["schemas"].pop("HTTPValidationError", None)
    schema["components"]["schemas"].pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


def _refusals(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's own shape, which the gateway never sends
    if path == "/health":
        return
    if path == "/metrics":
        responses["200"] = {
            "description": "Prometheus' text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
        _add(responses, (401, 503), "OpenAIError")
    elif path.startswith("/v1/management"):
        names = "{engine_id}" in path or path.endswith("/presets/apply")
        statuses = (*_MANAGEMENT, 404) if names else _MANAGEMENT
        _add(responses, statuses, "Error")
    else:
        _add(responses, _OPENAI, "OpenAIError")
    if path.endswith("/content"):
        responses["200"] = {
            "description": "The file's lines",
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
        }


def _add(responses: dict[str, Any], statuses: tuple[int, ...], shape: str) -> None:
    ref = {"$ref": f"#/components/schemas/{shape}"}
    for status in statuses:
        responses[str(status)] = {
            "description": _WHY[status],
            "content": {"application/json": {"schema": ref}},
        }


_ASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "/v1/chat/completions": (
        "chat completion",
        {"messages": {"type": "array", "minItems": 1, "items": {"type": "object"}}},
    ),
    "/v1/completions": ("completion", {"prompt": {"type": "string"}}),
    "/v1/embeddings": (
        "embeddings",
        {
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string"}},
                ]
            }
        },
    ),
}
"""What each inference route asks for beyond ``model`` (what OpenAI requires too)."""


def inference_paths() -> dict[str, Any]:
    """The OpenAI inference routes: an OpenAI request body for a ``model``; the answer is the
    engine's (JSON, or server-sent events with ``stream``)."""
    paths: dict[str, Any] = {}
    for path, (name, asks) in _ASKS.items():
        body = {
            "type": "object",
            "required": ["model", *asks],
            "properties": {
                "model": {"type": "string", "minLength": 1},
                "stream": {"type": "boolean"},
                **asks,
            },
            "additionalProperties": True,
        }
        responses: dict[str, Any] = {
            "200": {
                "description": f"The engine's {name}",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        }
        _add(responses, _INFERENCE, "OpenAIError")
        paths[path] = {
            "post": {
                "summary": f"Create a {name} on a RUNNING replica of the model",
                "operationId": f"create_{name.replace(' ', '_')}",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": body}},
                },
                "responses": responses,
            }
        }
    return paths

"""The machine-readable description of the HTTP API (OpenAPI 3.1), served at
``/api/openapi.json``. tests/test_openapi.py checks it against the app's routes (nothing
missing, nothing extra) and fuzzes the live server from it."""

from __future__ import annotations

from typing import Any

from .. import __version__

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    },
}
_JSON = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
_CODE = {
    "name": "code",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
}
_ID = {"name": "result_id", "in": "path", "required": True,
       "schema": {"type": "integer", "minimum": 0}}


def _op(summary: str, ok: dict | None = None, errors=(404,), **extra: Any) -> dict:
    responses: dict[str, Any] = {"200": ok or _JSON}
    for code in errors:
        responses[str(code)] = _ERROR
    return {"summary": summary, "responses": responses, **extra}


def document() -> dict[str, Any]:
    stored = {"201": {"description": "classified and stored (durable: it has an id)",
                      "content": {"application/json": {"schema": {"type": "object",
                                                                  "required": ["id", "label"]}}}},
              "400": _ERROR, "401": _ERROR, "409": _ERROR, "413": _ERROR, "503": _ERROR,
              "507": _ERROR}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FieldScope",
            "version": __version__,
            "description": "Offline image screening kit. Programs authenticate with "
            "`Authorization: Bearer TOKEN`; browsers with a session cookie and the "
            "X-CSRFToken header (see docs/api.md).",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "session"},
            }
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/api/health": {"get": _op("States of camera, storage, clock and inference",
                                       errors=(503,), security=[])},
            "/api/session": {"get": _op("A CSRF token for browser sessions", errors=(),
                                        security=[])},
            "/api/openapi.json": {"get": _op("This document", errors=(), security=[])},
            "/api/status": {"get": _op("Live result, smoothed state, backend, counters",
                                       errors=(401,))},
            "/api/model": {"get": _op("The running model: bundle, ensemble members, views, "
                                      "decision rule and backend", errors=(401,))},
            "/api/profiles": {"get": _op("The use profiles and the running one", errors=(401,))},
            "/api/profile": {"post": {
                "summary": "Switch to another profile (model, source, settings) without a restart",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["profile"], "properties": {
                        "profile": {"type": "string"}}}}}},
                "responses": {"200": _JSON, "400": _ERROR, "401": _ERROR, "404": _ERROR,
                              "503": _ERROR},
            }},
            "/api/results": {"get": _op(
                "Stored results, newest first", errors=(400, 401),
                parameters=[
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "before", "in": "query", "schema": {"type": "integer"}},
                    {"name": "sample", "in": "query", "schema": {"type": "string"}},
                ],
            )},
            "/api/results/{result_id}": {"get": _op("One stored result", errors=(401, 404),
                                                    parameters=[_ID])},
            "/api/results/{result_id}/snapshot": {"get": _op(
                "The stored image of a result",
                ok={"description": "JPEG", "content": {"image/jpeg": {}}},
                errors=(401, 404), parameters=[_ID],
            )},
            "/api/results/{result_id}/map.png": {"get": _op(
                "The stored image with the activation map over it: where the model looked",
                ok={"description": "PNG", "content": {"image/png": {}}},
                errors=(400, 401, 404),
                parameters=[_ID, {"name": "kind", "in": "query", "schema": {
                    "enum": ["group", "class"]},
                    "description": "the decision group's map (default) or the top class's"}],
            )},
            "/snapshots/{name}": {"get": _op(
                "A stored image by its file name",
                ok={"description": "JPEG", "content": {"image/jpeg": {}}},
                errors=(401, 404),
                parameters=[{"name": "name", "in": "path", "required": True,
                             "schema": {"type": "string"}}],
            )},
            "/api/classify": {"post": {
                "summary": "Classify an uploaded image and store it",
                "requestBody": {"required": True, "content": {"multipart/form-data": {
                    "schema": {"type": "object", "required": ["image"], "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "sample_code": {"type": "string"},
                    }}}}},
                "responses": stored,
            }},
            "/api/capture": {"post": {
                "summary": "Capture a full-quality still, classify and store it",
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {
                        "sample_code": {"type": "string"}}}}}},
                "responses": stored,
            }},
            "/api/samples": {"get": _op("Samples with counts and scores", errors=(401,))},
            "/api/samples/{code}": {"get": _op("One sample's summary and fields",
                                               errors=(400, 401, 404), parameters=[_CODE])},
            "/api/samples/{code}/fhir": {"get": _op(
                "One sample as a FHIR R4 Bundle (DiagnosticReport + an Observation per field)",
                ok={"description": "FHIR JSON", "content": {"application/fhir+json": {}}},
                errors=(400, 401, 404), parameters=[_CODE],
            )},
            "/api/samples/{code}/export.csv": {"get": _op(
                "One sample's fields as CSV",
                ok={"description": "CSV", "content": {"text/csv": {}}},
                errors=(400, 401, 404), parameters=[_CODE],
            )},
            "/metrics": {"get": _op("Prometheus metrics",
                                    ok={"description": "text", "content": {"text/plain": {}}},
                                    errors=(401,))},
            "/stream.mjpg": {"get": _op(
                "Live view (MJPEG); 503 past [web] max_streams",
                ok={"description": "multipart JPEG stream",
                    "content": {"multipart/x-mixed-replace": {}}},
                errors=(401, 503),
            )},
        },
    }

"""What leaves the kit, as JSON: one message per result, a sample's summary, the kit's status.

A result message is the API's result (``GET /api/results/<id>``) plus the kit's id and the
message's own unique id; a sample message is ``GET /api/samples/<code>`` with its fields'
ids instead of the fields. Both are read from the store when sent, so they say what is stored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..daemon.outbox import Message
from ..daemon.store import Store
from ..errors import FieldScopeError


class Gone(FieldScopeError):
    """What a message was about is no longer stored (retention removed it): it is dropped."""


class Refused(FieldScopeError):
    """The destination refused the message for good (not a passing failure): it is dropped."""


def short_reason(exc: BaseException) -> str:
    """What went wrong in a few words for the System page: the innermost operating-system
    error ("Connection refused") rather than a library's page of wrapping."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "…"


def stable_uuid(*parts: object) -> uuid.UUID:
    """A name-based UUID of ``parts``: the same stored things give the same id (DICOM UIDs,
    FHIR resource ids), so a resend or a second export replaces rather than duplicates."""
    return uuid.uuid5(uuid.NAMESPACE_URL, "fieldscope:" + ":".join(map(str, parts)))


def unassessed_reason(row: dict[str, Any]) -> str:
    """Why a stored field has no finding: the scope check rejected it, or its quality did."""
    if not row.get("in_scope", True):
        return "not assessable (out of scope: not an image for this model)"
    return "not assessable (image quality)"


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def result_message(store: Store, msg: Message, kit_id: str) -> dict[str, Any]:
    row = store.get(msg.result_id) if msg.result_id is not None else None
    if row is None:
        raise Gone(f"result {msg.result_id} is no longer stored")
    return {
        "message_id": msg.message_id,
        "kit": kit_id,
        "type": "result",
        "created_utc": iso(row["created"]),
        **row,
    }


def sample_message(store: Store, msg: Message, kit_id: str) -> dict[str, Any]:
    summary = store.sample_summary(msg.sample_code or "")
    if summary is None:
        raise Gone(f"sample {msg.sample_code} is no longer stored")
    results = summary.pop("results")
    return {
        "message_id": msg.message_id,
        "kit": kit_id,
        "type": "sample",
        **summary,
        "result_ids": [r["id"] for r in results],
        "updated_utc": iso(max(r["created"] for r in results)),
    }


def status_message(kit_id: str, state: str, **extra: Any) -> bytes:
    return json.dumps(
        {"kit": kit_id, "state": state, "at_utc": iso(time.time()), **extra}, separators=(",", ":")
    ).encode()


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

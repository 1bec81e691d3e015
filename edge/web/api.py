"""JSON API. An answer that carries an ``id`` means the result is stored durably."""

from __future__ import annotations

import csv
import io
import json
import re
import time

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    jsonify,
    make_response,
    request,
    send_file,
)
from flask_wtf.csrf import generate_csrf

from ..capture import SourceError
from ..daemon.budget import Busy
from ..daemon.pipeline import ProfileError, UnknownProfile
from ..daemon.results import SampleProfileError
from ..daemon.store import StorageError
from ..errors import ImageError

bp = Blueprint("api", __name__)
# Matched whole (fullmatch): with match, "$" would also accept a code ending in a newline.
SAMPLE_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _ctx():
    ext = current_app.extensions["fieldscope"]
    return ext["pipeline"], ext["cfg"]


def _error(message: str, status: int):
    return jsonify(error=message), status


def _sample_code(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or not SAMPLE_CODE.fullmatch(raw):
        abort(make_response(_error("sample_code: 1–64 letters, digits, '.', '_' or '-'", 400)))
    return raw


@bp.get("/api/health")
def health():
    pipe, _ = _ctx()
    body, alive = pipe.health()
    return jsonify(body), 200 if alive else 503


@bp.get("/api/session")
def session_info():
    """A CSRF token for scripts and pages (sent back as the X-CSRFToken header)."""
    from .auth import login_required_enabled

    return jsonify(csrf_token=generate_csrf(), login_required=login_required_enabled())


@bp.get("/api/openapi.json")
def openapi():
    from .openapi import document

    return jsonify(document())


@bp.get("/api/status")
def status():
    pipe, _ = _ctx()
    return jsonify(pipe.status())


@bp.get("/api/model")
def model():
    """The running profile's model: the bundle (members, views, decision rule) and the backend
    that runs it."""
    pipe, _ = _ctx()
    return jsonify(bundle=pipe.model.describe(), backend=pipe.backend())


@bp.get("/api/profiles")
def profiles():
    pipe, _ = _ctx()
    return jsonify(profiles=pipe.profiles(), active=pipe.profile.describe())


def switch_to(profile_id: object):
    """Switch profiles (shared by the API and the page's one-tap form); (answer, status)."""
    pipe, _ = _ctx()
    if not isinstance(profile_id, str) or not profile_id:
        return {"error": 'send {"profile": ID}; GET /api/profiles lists them'}, 400
    try:
        return {"active": pipe.switch_profile(profile_id)}, 200
    except UnknownProfile as exc:
        return {"error": str(exc)}, 404
    except ProfileError as exc:
        return {"error": str(exc)}, 503


@bp.post("/api/profile")
def switch_profile():
    body = request.get_json(silent=True)
    profile_id = body.get("profile") if isinstance(body, dict) else request.form.get("profile")
    answer, code = switch_to(profile_id)
    return jsonify(answer), code


@bp.get("/api/results")
def results():
    pipe, _ = _ctx()
    try:
        limit = int(request.args.get("limit", 50))
        before = int(request.args["before"]) if "before" in request.args else None
    except ValueError:
        return _error("limit and before must be integers", 400)
    sample = _sample_code(request.args.get("sample"))
    return jsonify(results=pipe.results.list(limit, before, sample))


@bp.get("/api/results/<int:result_id>")
def result(result_id: int):
    pipe, _ = _ctx()
    row = pipe.results.get(result_id)
    return jsonify(row) if row else _error(f"no result {result_id}", 404)


@bp.get("/api/results/<int:result_id>/snapshot")
def result_snapshot(result_id: int):
    pipe, _ = _ctx()
    row = pipe.results.get(result_id)
    path = pipe.results.snapshot_path(row["snapshot"]) if row and row["snapshot"] else None
    if path is None:
        return _error(f"no snapshot for result {result_id}", 404)
    return send_file(path, mimetype="image/jpeg")


@bp.get("/api/results/<int:result_id>/map.png")
def result_map(result_id: int):
    """The stored snapshot with the activation map over it (?kind=group|class)."""
    from .overlay import overlay_png

    pipe, _ = _ctx()
    kind = request.args.get("kind", "group")
    if kind not in ("group", "class"):
        return _error("kind must be group or class", 400)
    row = pipe.results.get(result_id)
    if row is None or not row.get("map"):
        return _error(f"no activation map for result {result_id}", 404)
    path = pipe.results.snapshot_path(row["snapshot"]) if row["snapshot"] else None
    if path is None:
        return _error(f"no snapshot for result {result_id}", 404)
    values = row["map"].get(kind) or row["map"]["class"]
    bundle = pipe.bundles(row.get("profile"))
    spec = bundle.input_spec if bundle is not None else {"size": [1, 1], "resize": "squash"}
    png = overlay_png(path, values, tuple(spec["size"]), str(spec["resize"]))
    return Response(png, mimetype="image/png")


@bp.get("/snapshots/<path:name>")
def snapshot_file(name: str):
    pipe, _ = _ctx()
    path = pipe.results.snapshot_path(name)
    if path is None:
        return _error("no such snapshot", 404)
    return send_file(path, mimetype="image/jpeg")


def _stored(fn, *args):
    try:
        doc = fn(*args)
    except (ImageError, SampleProfileError) as exc:
        return _error(str(exc), exc.status)
    except StorageError as exc:
        return _error(f"{exc}; the result was not stored", 507)
    except Busy as exc:
        answer = _error(str(exc), 503)
        answer[0].headers["Retry-After"] = str(Busy.retry_after_s)
        return answer
    except MemoryError:
        # Never a 500 (nor a dead daemon): the kit is short of memory right now.
        current_app.logger.error("out of memory while classifying an upload")
        answer = _error("the kit is short of memory right now; try again shortly", 503)
        answer[0].headers["Retry-After"] = "10"
        return answer
    return jsonify(doc), 201


@bp.post("/api/classify")
def classify():
    pipe, _ = _ctx()
    upload = request.files.get("image")
    if upload is None:
        return _error("send the image as multipart form field 'image'", 400)
    data = upload.read()
    if not data:
        return _error("the uploaded image is empty", 400)
    code = _sample_code(request.form.get("sample_code"))
    return _stored(pipe.results.classify_and_store, data, "upload", code)


@bp.post("/api/capture")
def capture():
    pipe, _ = _ctx()
    body = request.get_json(silent=True)
    if body is None and request.is_json and request.get_data():
        return _error('the body is not valid JSON; send e.g. {"sample_code": "P-001"}', 400)
    if body is None:
        body = {}
    elif not isinstance(body, dict):
        return _error('the JSON body must be an object, e.g. {"sample_code": "P-001"}', 400)
    code = _sample_code(body.get("sample_code") or request.form.get("sample_code"))
    if pipe.state.camera != "ok":
        return _error(f"camera not available: {pipe.state.camera_error or pipe.state.camera}", 503)
    try:
        return _stored(pipe.results.capture, code)
    except SourceError as exc:
        return _error(str(exc), 503)


@bp.get("/api/samples")
def samples():
    pipe, _ = _ctx()
    return jsonify(samples=pipe.results.samples())


@bp.get("/api/samples/<code>")
def sample(code: str):
    pipe, _ = _ctx()
    summary = pipe.results.sample_summary(_sample_code(code) or "")
    return jsonify(summary) if summary else _error(f"no sample {code}", 404)


@bp.get("/api/samples/<code>/fhir")
def sample_fhir(code: str):
    """The sample as a FHIR R4 Bundle (a DiagnosticReport and an Observation per field)."""
    from ..outbound.fhir import sample_bundle
    from ..outbound.messages import Gone

    pipe, cfg = _ctx()
    code = _sample_code(code) or ""
    try:
        doc = sample_bundle(pipe.store, code, cfg.kit_id, pipe.bundles)
    except Gone:
        return _error(f"no sample {code}", 404)
    return Response(json.dumps(doc), mimetype="application/fhir+json")


@bp.get("/api/samples/<code>/export.csv")
def sample_csv(code: str):
    from ..outbound.messages import unassessed_reason

    pipe, _ = _ctx()
    summary = pipe.results.sample_summary(_sample_code(code) or "")
    if not summary:
        return _error(f"no sample {code}", 404)
    # The labels of the model that made the sample (its profile's), not of the running one.
    labels = list(dict.fromkeys(k for r in summary["results"] for k in r["probabilities"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "id",
            "time_utc",
            "label",
            "score",
            "decision",
            "group_score",
            "assessable",
            "in_scope",
            "focus",
            *[f"p_{lab}" for lab in labels],
            "model",
            "backend",
            "profile",
        ]
    )
    for r in reversed(summary["results"]):
        q = r["quality"] or {}
        w.writerow(
            [
                r["id"],
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created"])),
                r["label"],
                f"{r['score']:.4f}",
                (r["decision_outcome"] or "") if r["assessable"] else unassessed_reason(r),
                "" if r["group_score"] is None else f"{r['group_score']:.4f}",
                int(r["assessable"]),
                int(r["in_scope"]),
                q.get("focus", ""),
                *[f"{r['probabilities'].get(lab, 0):.4f}" for lab in labels],
                r["model"],
                r["backend"],
                r["profile"] or "",
            ]
        )
    return Response(
        buf.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="fieldscope-{code}.csv"'},
    )

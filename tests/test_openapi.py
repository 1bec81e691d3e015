"""The OpenAPI document: it describes exactly the app's API routes, and a property-based
fuzzer (schemathesis) driven by it finds no server error on the daemon process (loopback,
bounded in examples and time)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, settings

from tests.conftest import require_module
from tests.test_web import daemon  # noqa: F401  (the fixture)

API_SPACE = re.compile(r"^/(api/|metrics$|stream\.mjpg$|snapshots/)")
TOKEN = "fuzzing-token-0123456789abcdef"


def _rules(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        if not API_SPACE.match(path):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((method.lower(), path))
    return out


def test_openapi_document_matches_the_routes(daemon):  # noqa: F811
    from edge.web.openapi import document

    _, app = daemon()
    doc = app.test_client().get("/api/openapi.json").get_json()
    assert doc == document() and doc["openapi"].startswith("3.")
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == _rules(app)


@pytest.fixture(scope="module")
def live_kit(tmp_path_factory):
    """The daemon as a user runs it with everything on: two profiles, an MQTT broker and a
    PACS configured (unreachable: their queues grow while the fuzzer runs), a sample stored."""
    from tests.daemon_helpers import Client, free_port
    from tests.test_profiles import BLOOD, start, stop, write_config

    tmp = tmp_path_factory.mktemp("fuzz-live")
    config = write_config(tmp, extra=(
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n'
        f'[dicom]\nstow_url = "http://127.0.0.1:{free_port()}/dicom-web"\n'
        f'[web]\napi_tokens = ["{TOKEN}"]\n'))
    proc, base = start(tmp, config)
    img = sorted((BLOOD / "samples").glob("*.jpg"))[0].read_bytes()
    assert Client(base).upload(img, sample_code="A")[0] == 201  # a code the fuzzer may hit
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def api_schema():
    require_module("schemathesis", "the API fuzzer (dev extra)")
    import schemathesis

    from edge.web.openapi import document

    doc = document()
    doc["paths"].pop("/stream.mjpg")  # an endless response: checked by its own tests
    return schemathesis.openapi.from_dict(doc)


def test_fuzzing_the_api_finds_no_server_error(api_schema, live_kit):
    """Every operation, generated from the document (valid and invalid inputs), with a bearer
    token: no answer is a 5xx (503 only where the document allows it)."""
    from hypothesis import given

    failures, calls = [], []

    def fuzz(operation) -> None:
        allowed = set(operation.definition.raw.get("responses", {}))

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            resp = case.call(base_url=live_kit, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=30)
            calls.append(operation.label)
            if resp.status_code >= 500 and str(resp.status_code) not in allowed:
                failures.append((operation.label, resp.status_code, resp.text[:200]))

        run()

    operations = [result.ok() for result in api_schema.get_all_operations()]
    # The document has every route (test above): an empty list would fuzz nothing and pass.
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        fuzz(operation)
    assert not failures, failures[:5]
    assert set(calls) == {op.label for op in operations}  # every operation was exercised

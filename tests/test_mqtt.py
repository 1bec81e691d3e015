"""Results to a fleet broker: the daemon as a process, a real Mosquitto on loopback, a
programme's collector subscribed with a persistent session. Results arrive with unique ids;
uploads made while the broker is down arrive once it is back, once per id; a daemon killed with
-9 while the broker is down delivers after its restart; the status topic says online/offline."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import require_module
from tests.daemon_helpers import Client, eventually
from tests.servers import Collector, Mosquitto, make_pki, need
from tests.test_profiles import BLOOD, SKIN, start, stop, write_config

require_module("paho", "MQTT delivery (the edge extra)")
IMAGES = sorted((BLOOD / "samples").glob("*.jpg"))


def mqtt_config(tmp_path: Path, broker: Mosquitto, keepalive: int = 30, **mqtt: str) -> Path:
    """Two profiles delivering to ``broker``; ``mqtt``: more [mqtt] options (strings)."""
    more = "".join(f'{key} = "{value}"\n' for key, value in mqtt.items())
    return write_config(tmp_path, extra=f"""
[kit]
id = "kit-07"
[outbox]
retry_max_s = 2.0
[mqtt]
url = "{broker.url}"
keepalive_s = {keepalive}
timeout_s = 5.0
{more}""")


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def upload(client: Client, n: int, code: str) -> list[int]:
    ids = []
    for i in range(n):
        status, doc = client.upload(IMAGES[i % len(IMAGES)].read_bytes(), sample_code=code)
        assert status == 201, doc
        ids.append(doc["id"])
    return ids


def outbox(client: Client) -> dict:
    return client.get_json("/api/status")[1]["outbox"]["mqtt"]


def test_results_and_samples_arrive_with_their_ids_and_the_status_is_retained(tmp_path, broker):
    collector = Collector(broker)
    proc, base = start(tmp_path, mqtt_config(tmp_path, broker))
    try:
        client = Client(base)
        ids = upload(client, 3, "SMEAR-1")
        results = collector.wait_for("results", 3)
        assert sorted(r["id"] for r in results) == sorted(ids)
        assert len({r["message_id"] for r in results}) == 3
        for r in results:
            stored = client.get_json(f"/api/results/{r['id']}")[1]
            # The API's result shape, plus the kit and the message's own id.
            assert {k: r[k] for k in stored} == stored
            assert r["kit"] == "kit-07" and r["profile"] == "blood-smear"
            assert r["sample_code"] == "SMEAR-1"
        samples = collector.wait_for("samples", 1)
        # The summary follows the sample.
        eventually(lambda: collector.on("samples")[-1]["fields"] == 3, 20,
                   lambda: collector.on("samples"))
        last = collector.on("samples")[-1]
        assert last["code"] == "SMEAR-1" and sorted(last["result_ids"]) == sorted(ids)
        assert len({s["message_id"] for s in samples}) == len(samples)
        # A dermoscopy image in the smear's sample: out of scope, so the summary counts it
        # as such and never as flagged or in the scores; its result message says so.
        flagged = last["flagged"]
        skin = sorted((SKIN / "samples").glob("*.jpg"))[0]
        status, odd = client.upload(skin.read_bytes(), sample_code="SMEAR-1")
        assert status == 201 and odd["scope"]["in_scope"] is False
        eventually(lambda: collector.on("samples")[-1]["fields"] == 4, 20,
                   lambda: collector.on("samples"))
        last = collector.on("samples")[-1]
        assert last["out_of_scope"] == 1 and last["not_assessable"] >= 1
        assert last["flagged"] == flagged
        message = next(r for r in collector.wait_for("results", 4) if r["id"] == odd["id"])
        assert message["in_scope"] is False and message["assessable"] is False
        assert message["decision_outcome"] == "out of scope"
        assert collector.on("status")[0]["state"] == "online"
        eventually(lambda: outbox(client)["queued"] == 0, 10, lambda: outbox(client))
        o = outbox(client)
        assert o["delivered"] >= 4 and o["connected"] and o["oldest_age_s"] is None
        # The same counts on the System page and in the Prometheus metrics.
        with client.opener.open(base + "/system", timeout=10) as r:
            page = r.read().decode()
        assert 'id="outbox"' in page
        assert f'<span class="delivered">{o["delivered"]} delivered' in page
        with client.opener.open(base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert f'fieldscope_outbox_delivered_total{{destination="mqtt"}} {o["delivered"]}.0' \
            in metrics
        assert 'fieldscope_outbox_queued{destination="mqtt"} 0.0' in metrics
    finally:
        stop(proc)
    # A clean stop says so on the retained status (no last will is sent for a clean stop).
    eventually(lambda: collector.on("status")[-1]["state"] == "offline", 10,
               lambda: collector.on("status"))
    collector.close()


def test_uploads_while_the_broker_is_down_arrive_once_when_it_is_back(tmp_path, broker):
    collector = Collector(broker)
    proc, base = start(tmp_path, mqtt_config(tmp_path, broker))
    try:
        client = Client(base)
        first = upload(client, 1, "SMEAR-2")
        collector.wait_for("results", 1)
        broker.stop()
        ids = upload(client, 5, "SMEAR-2")  # every one stored (201) while the broker is down
        o = eventually(lambda: (x := outbox(client))["queued"] >= 5 and not x["connected"] and x,
                       30, lambda: outbox(client))
        assert o["oldest_age_s"] is not None
        broker.start()
        collector.wait_for("results", 6, timeout=60)
        # The kit has nothing left to send (every message acknowledged): a message sent twice
        # would have been sent by now, so what arrived is all that will.
        eventually(lambda: (x := outbox(client))["queued"] == 0 and x["delivered"] >= 6, 60,
                   lambda: outbox(client))
        results = collector.on("results")
        assert sorted(r["id"] for r in results) == sorted(first + ids)
        assert len({r["message_id"] for r in results}) == len(results) == 6
        o = outbox(client)
        assert o["failed"] >= 1 and o["delivered"] >= 6
    finally:
        stop(proc)
        collector.close()


def test_a_daemon_killed_while_the_broker_is_down_delivers_after_its_restart(tmp_path, broker):
    collector = Collector(broker)
    config = mqtt_config(tmp_path, broker, keepalive=5)
    proc, base = start(tmp_path, config)
    try:
        client = Client(base)
        upload(client, 1, "SMEAR-3")
        collector.wait_for("results", 1)
        # Killed while connected: the broker publishes the last will.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        eventually(lambda: collector.on("status")[-1]["state"] == "offline", 20,
                   lambda: collector.on("status"))
        assert [s["state"] for s in collector.on("status")] == ["online", "offline"]
        # Started again with the broker down; results stored; killed again, mid-backoff.
        broker.stop()
        proc, base = start(tmp_path, config)
        ids = upload(Client(base), 3, "SMEAR-3")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        broker.start()
        proc, base = start(tmp_path, config)
        results = collector.wait_for("results", 4, timeout=60)
        assert set(ids) <= {r["id"] for r in results}
        assert len({r["message_id"] for r in results}) == len(results)
    finally:
        stop(proc)
        collector.close()


def test_a_tls_broker_with_client_certificates_and_a_password(tmp_path):
    """mqtts:// against a broker that requires a client certificate signed by its CA and a
    user/password: delivered with the right ones; with a wrong password nothing is delivered
    and the System page's error says the broker refused."""
    import subprocess

    pki = make_pki(tmp_path / "pki")
    passwords = tmp_path / "passwd"
    subprocess.run([need("mosquitto_passwd", "mosquitto"), "-c", "-b", str(passwords), "kit-07",
                    "s3cret-kit"], check=True, capture_output=True)
    broker = Mosquitto(tmp_path / "mosquitto", scheme="mqtts", listener=(
        f"cafile {pki['ca.pem']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}\n"
        f"require_certificate true\npassword_file {passwords}\nallow_anonymous false\n"))
    broker.start()
    collector = Collector(broker, tls=(pki["ca.pem"], pki["client.pem"], pki["client.key"]),
                          auth=("kit-07", "s3cret-kit"))

    def config(password: str) -> Path:
        folder = tmp_path / password
        folder.mkdir()
        return mqtt_config(folder, broker, username="kit-07", password=password,
                           ca_file=pki["ca.pem"], cert_file=pki["client.pem"],
                           key_file=pki["client.key"])

    try:
        proc, base = start(tmp_path / "s3cret-kit", config("s3cret-kit"))
        try:
            ids = upload(Client(base), 2, "SMEAR-6")
            assert sorted(r["id"] for r in collector.wait_for("results", 2)) == sorted(ids)
        finally:
            stop(proc)
        proc, base = start(tmp_path / "wrong", config("wrong"))
        try:
            client = Client(base)
            upload(client, 1, "SMEAR-6")
            o = eventually(lambda: (x := outbox(client))["failed"] >= 1 and x, 20,
                           lambda: outbox(client))
            assert o["queued"] >= 1 and not o["connected"]
            assert "refused" in o["last_error"] and "Not authorized" in o["last_error"]
            # A second refused try (the retry, after its backoff), and still nothing arrived.
            eventually(lambda: outbox(client)["failed"] >= o["failed"] + 1, 30,
                       lambda: outbox(client))
            assert len(collector.on("results")) == 2
        finally:
            stop(proc)
    finally:
        collector.close()
        broker.stop()

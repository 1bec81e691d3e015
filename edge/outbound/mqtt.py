"""MQTT (paho-mqtt) to a site's broker or a programme's: QoS 1, results and sample summaries,
a retained status with a last will.

Topics under ``[mqtt] topic_prefix`` (default ``fieldscope/<kit id>``): ``status`` (retained:
``online`` on connect, ``offline`` on a clean stop and as the broker-sent last will),
``results`` (one message per stored result) and ``samples`` (a sample's summary). A new
client is made for each connection, so a message is only ever re-sent by the outbox (with its
id), never also by the client library behind its back. See docs/fleet.md.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from .. import __version__
from ..daemon.outbox import Message
from ..daemon.store import Store
from ..destinations.mqtt import MqttSection
from .messages import Gone, Refused, encode, result_message, sample_message, status_message
from .sender import Destination


class MqttDestination(Destination):
    name = "mqtt"

    def __init__(self, cfg: MqttSection, kit_id: str, store: Store,
                 bundle_for: object = None) -> None:
        # bundle_for: the senders' common signature; the programme's messages need no bundle.
        u = urlsplit(cfg.url)
        self.cfg = cfg
        self.tls = u.scheme == "mqtts"
        self.host = u.hostname or ""
        self.port = u.port or (8883 if self.tls else 1883)
        self.kit_id = kit_id
        self.store = store
        self.prefix = cfg.topic_prefix or f"fieldscope/{kit_id}"
        self._client: Any = None  # a connected paho Client
        self._lost = threading.Event()

    def describe(self) -> str:
        return f"MQTT {'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{leaf}"

    def open(self) -> None:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"fieldscope-{self.kit_id}", clean_session=True)
        client.will_set(self.topic("status"), status_message(self.kit_id, "offline"), qos=1,
                        retain=True)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password or None)
        if self.tls:
            client.tls_set(ca_certs=self.cfg.ca_file or None,
                           certfile=self.cfg.cert_file or None,
                           keyfile=self.cfg.key_file or None,
                           cert_reqs=ssl.CERT_REQUIRED)
        answered = threading.Event()
        outcome: list = []

        def on_connect(_c, _u, _flags, reason, _props) -> None:
            outcome.append(reason)
            answered.set()

        def on_disconnect(_c, _u, _flags, _reason, _props) -> None:
            self._lost.set()  # the sender starts over with a new client (see send)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        self._lost = threading.Event()
        try:
            client.connect(self.host, self.port, keepalive=self.cfg.keepalive_s)
        except OSError as exc:
            raise ConnectionError(exc.strerror or str(exc)) from exc
        client.loop_start()
        if not answered.wait(self.cfg.timeout_s) or outcome[0].is_failure:
            why = str(outcome[0]) if outcome else "no answer"
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"the broker refused the connection: {why}")
        self._client = client
        self._publish(self.topic("status"),
                      status_message(self.kit_id, "online", version=__version__), retain=True)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(self.cfg.timeout_s)  # raises when it could not be queued
        if not info.is_published():
            raise TimeoutError(f"no acknowledgement within {self.cfg.timeout_s:.0f} s")

    def _check_connected(self) -> None:
        if self._client is None or self._lost.is_set():
            # Never publish into a client that lost its broker: it would keep the message and
            # send it again on its own reconnect, beside the outbox's own retry.
            raise ConnectionError("connection lost")

    def _encode(self, msg: Message) -> tuple[str, bytes]:
        if msg.kind == "result":
            return self.topic("results"), encode(result_message(self.store, msg, self.kit_id))
        if msg.kind == "sample":
            return self.topic("samples"), encode(sample_message(self.store, msg, self.kit_id))
        raise Refused(f"MQTT does not carry {msg.kind!r} messages")

    def send(self, msg: Message) -> None:
        self._check_connected()
        self._publish(*self._encode(msg))

    def send_batch(self, batch: list[Message]) -> Iterator[tuple[Message, Exception | None]]:
        """Publish the whole batch, then collect the acknowledgements in order: up to a batch
        in flight at once, so a link with a long round trip is not paid once per message."""
        try:
            self._check_connected()
        except ConnectionError as exc:
            yield batch[0], exc
            return
        pending: list[tuple[Message, Any, Exception | None]] = []
        for msg in batch:
            try:
                topic, payload = self._encode(msg)
                pending.append((msg, self._client.publish(topic, payload, qos=1), None))
            except (Gone, Refused) as exc:
                pending.append((msg, None, exc))
            except Exception as exc:  # could not even be queued: the rest waits its turn
                pending.append((msg, None, exc))
                break
        for msg, info, error in pending:
            if error is not None:
                yield msg, error
                if not isinstance(error, (Gone, Refused)):
                    return
                continue
            try:
                info.wait_for_publish(self.cfg.timeout_s)
                if not info.is_published():
                    raise TimeoutError(f"no acknowledgement within {self.cfg.timeout_s:.0f} s")
            except Exception as exc:
                yield msg, exc
                return
            yield msg, None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            # A clean disconnect sends no last will: say "offline" ourselves, if we still can.
            if not self._lost.is_set():
                client.publish(self.topic("status"), status_message(self.kit_id, "offline"),
                               qos=1, retain=True).wait_for_publish(2.0)
        except Exception:
            pass
        finally:
            client.disconnect()
            client.loop_stop()

"""[mqtt]: results and sample summaries to a screening programme's MQTT broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..configfile import PATH, ConfigError
from .spec import DestinationSpec, Owed, Stored


@dataclass
class MqttSection:
    url: str = ""  # mqtt://host:1883 or mqtts://host:8883; empty: off
    topic_prefix: str = ""  # default: fieldscope/<kit id>
    username: str = ""
    password: str = ""
    ca_file: str = field(default="", metadata=PATH)  # mqtts: the broker's CA (default: system)
    cert_file: str = field(default="", metadata=PATH)  # mqtts: a client certificate and its key
    key_file: str = field(default="", metadata=PATH)
    keepalive_s: int = 30
    timeout_s: float = 10.0  # to connect, and for each message's acknowledgement


def check(mq: MqttSection) -> None:
    u = urlsplit(mq.url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"[mqtt].url: {mq.url!r} is not mqtt://HOST[:PORT] or "
                          "mqtts://HOST[:PORT]")
    if any(c in mq.topic_prefix for c in "+#") or mq.topic_prefix.endswith("/"):
        raise ConfigError("[mqtt].topic_prefix: no '+', '#' or trailing '/'")
    if bool(mq.cert_file) != bool(mq.key_file):
        raise ConfigError("[mqtt]: a client certificate needs both cert_file and key_file")
    if (mq.ca_file or mq.cert_file) and u.scheme != "mqtts":
        raise ConfigError("[mqtt]: ca_file and cert_file need an mqtts:// url")
    if mq.keepalive_s < 5 or mq.timeout_s <= 0:
        raise ConfigError("[mqtt]: keepalive_s ≥ 5 and timeout_s > 0")


def owes(stored: Stored) -> list[Owed]:
    # Every result, and its sample's summary (read when sent, so it is always current).
    return [Owed("result")] + ([Owed("sample", per_sample=True)] if stored.sample_code else [])


SPEC = DestinationSpec(
    name="mqtt", section=MqttSection, enabled=lambda s: bool(s.url), owes=owes, check=check,
    modules=(("paho.mqtt", "edge"),), sender="edge.outbound.mqtt:MqttDestination",
)

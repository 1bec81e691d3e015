"""Real servers for the delivery tests, from Debian's packages, on loopback: Mosquitto (MQTT)
and Orthanc with its DICOMweb plugin (a PACS). `.ci/run` installs them; without CI a missing
one skips its tests."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CI
from tests.daemon_helpers import eventually, free_port

ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists()
                                  else None)
    if path is None:
        if CI:
            pytest.fail(f"{tool} missing: .ci/run installs Debian's {package}")
        pytest.skip(f"{tool} not installed (apt install {package})")
    return path


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


class Mosquitto:
    """A broker that can be stopped and started again on the same port; its persistence keeps
    the test collector's session (and the QoS 1 messages for it) across a restart."""

    def __init__(self, folder: Path, listener: str = "allow_anonymous true\n",
                 scheme: str = "mqtt") -> None:
        """``listener``: the listener's options (default: anonymous, plain TCP)."""
        self.binary = need("mosquitto", "mosquitto")
        self.port = free_port()
        self.scheme = scheme
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        # Run as whoever runs the tests: a broker started as root would otherwise drop to the
        # mosquitto user, which cannot write the test's (private) folder, and would lose its
        # persisted sessions on a restart without a word but a log line.
        self.conf.write_text(
            f"user {getpass.getuser()}\n"
            f"per_listener_settings true\nlistener {self.port} 127.0.0.1\n{listener}"
            f"persistence true\npersistence_location {folder}/\nlog_dest stderr\n"
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        # Kept beside the test's files: what the broker saw, when a test fails.
        self.log = open(self.conf.parent / "mosquitto.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=self.log, stderr=self.log)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None
            self.log.close()


class Collector:
    """A programme's subscriber: a persistent session on ``topic`` at QoS 1, every message
    kept (topic, payload as JSON, retained flag)."""

    def __init__(self, broker: Mosquitto, topic: str = "fieldscope/#", tls=None,
                 auth: tuple[str, str] | None = None) -> None:
        """``tls``: (CA, client certificate, key) files for a TLS broker."""
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-collector",
                        clean_session=False)
        c.reconnect_delay_set(0.2, 1.0)

        def on_connect(client, _u, _f, _r, _p):
            client.subscribe(topic, qos=1)

        def on_subscribe(*_args):
            self._subscribed.set()

        def on_message(_c, _u, m):
            with self._lock:
                self.messages.append((m.topic, json.loads(m.payload), bool(m.retain)))

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        if tls:
            c.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        if auth:
            c.username_pw_set(*auth)
        c.connect("127.0.0.1", broker.port, keepalive=5)
        c.loop_start()
        assert self._subscribed.wait(10), "the collector could not subscribe"
        self.client = c

    def on(self, leaf: str) -> list[dict]:
        with self._lock:
            return [doc for topic, doc, _ in self.messages if topic.endswith("/" + leaf)]

    def wait_for(self, leaf: str, count: int, timeout: float = 30.0) -> list[dict]:
        eventually(lambda: len(self.on(leaf)) >= count, timeout,
                   lambda: (leaf, count, self.on(leaf)))
        return self.on(leaf)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Orthanc:
    """Orthanc with its DICOMweb plugin, HTTP on loopback only, no DICOM port."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None) -> None:
        """``users``: HTTP basic-auth users it requires (none: open, on loopback only)."""
        self.binary = need("Orthanc", "orthanc")
        if not ORTHANC_DICOMWEB.exists():
            if CI:
                pytest.fail("the DICOMweb plugin is missing: .ci/run installs orthanc-dicomweb")
            pytest.skip("orthanc-dicomweb not installed")
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "FieldScopeTestPACS",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "Plugins": [str(ORTHANC_DICOMWEB)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }))
        self.proc: subprocess.Popen | None = None

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/system",
                                            timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # up, and asking for its login
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "Orthanc did not start"
            assert self.proc.poll() is None, "Orthanc exited"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    tool = need("openssl", "openssl")
    folder.mkdir(parents=True, exist_ok=True)
    f = {name: folder / name for name in ("ca.key", "ca.pem", "server.key", "server.pem",
                                          "client.key", "client.pem")}

    def run(*args: str) -> None:
        subprocess.run([tool, *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
        "-keyout", str(f["ca.key"]), "-out", str(f["ca.pem"]))
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                     ("client", "keyUsage=digitalSignature")):
        csr = folder / f"{who}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", str(f[f"{who}.key"]), "-out", str(csr))
        extfile = folder / f"{who}.ext"
        extfile.write_text(ext + "\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(f["ca.pem"]), "-CAkey", str(f["ca.key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(extfile), "-out", str(f[f"{who}.pem"]))
    return f

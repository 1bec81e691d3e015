"""The daemon's own configuration sections: each a dataclass read from one TOML table, with
the checks that need nothing but its own values (what spans sections is in ``schema``).
A destination's section lives with the rest of it, in ``edge/destinations``."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..configfile import PATH, ConfigError


@dataclass
class ModelSection:
    bundle: str = field(default="", metadata=PATH)  # folder or .tflite; default: blood-smear
    labels: str = field(default="", metadata=PATH)
    backend: str = "auto"
    device: str = ""
    threads: int = 2
    # The previous good bundle, used when `bundle` is refused.
    fallback_bundle: str = field(default="", metadata=PATH)

    def check(self) -> None:
        if self.backend not in ("auto", "cpu", "edgetpu"):
            raise ConfigError(f"[model].backend: {self.backend!r} is not auto, cpu or edgetpu")
        if not 1 <= self.threads <= 64:
            raise ConfigError("[model].threads must be between 1 and 64")
        if self.device:
            # A typo here would silently mean "CPU" under backend = "auto": the backend's own
            # check, at load time.
            from ..errors import EdgeTpuError
            from ..inference.backends.edgetpu import parse_device

            try:
                parse_device(self.device)
            except EdgeTpuError as exc:
                raise ConfigError(f"[model].device: {exc.message}", exc.hint) from exc


@dataclass
class SourceSection:
    kind: str = "replay"  # replay | picamera2 | v4l2
    path: str = ""  # replay folder or video file; v4l2 device path or index
    fps: float = 2.0  # replay rate / capture rate limit
    width: int = 640
    height: int = 480
    still_width: int = 0  # full-quality capture size (0: the sensor's / image's own)
    still_height: int = 0
    loop: bool = True
    timeout_s: float = 15.0  # no frame for this long: the camera is stalled (watchdog stops)
    # Fixed exposure and colour, for consistent colour under a microscope (0 / empty: auto).
    exposure_us: int = 0  # exposure time in microseconds (picamera2, V4L2)
    gain: float = 0.0  # analogue gain (picamera2) or the driver's gain value (V4L2)
    colour_gains: list = field(default_factory=list)  # [red, blue] white balance (picamera2)
    white_balance_k: int = 0  # white balance colour temperature in kelvin (V4L2)

    def check(self, camera: bool = True) -> None:
        """``camera`` False: a command that never opens it (an export) needs no source."""
        if self.kind not in ("replay", "picamera2", "v4l2"):
            raise ConfigError(f"[source].kind: {self.kind!r} is not replay, picamera2 or v4l2")
        if camera and self.kind == "replay" and not self.path:
            raise ConfigError("[source].path: replay needs a folder of images or a video file")
        if self.exposure_us < 0 or self.gain < 0 or self.white_balance_k < 0:
            raise ConfigError(
                "[source] exposure_us, gain and white_balance_k must be ≥ 0 (0: auto)")
        if self.colour_gains and not (
            len(self.colour_gains) == 2
            and all(isinstance(g, (int, float)) and 0 < g < 32 for g in self.colour_gains)
        ):
            raise ConfigError("[source].colour_gains must be [red, blue], each between 0 and 32")
        if self.timeout_s <= 0:
            raise ConfigError("[source].timeout_s must be positive")
        if not 0 < self.fps <= 120:
            raise ConfigError("[source].fps must be between 0 and 120")
        if not (0 < self.width <= 8192 and 0 < self.height <= 8192):
            raise ConfigError("[source] width and height must be between 1 and 8192 pixels")
        if (self.still_width > 0) != (self.still_height > 0) or min(
                self.still_width, self.still_height) < 0 or max(
                self.still_width, self.still_height) > 16384:
            raise ConfigError(
                "[source] still_width and still_height: both 0 (the camera's own size) or "
                "both between 1 and 16384")


@dataclass
class PipelineSection:
    max_fps: float = 0.0  # cap on classifications per second (0: as fast as frames come)
    smoothing: int = 5  # frames averaged for the live result
    hold: int = 3  # frames a new state must hold before it is shown
    min_focus: float = 5.0  # variance of the Laplacian below which a frame is not assessable
    max_clipped: float = 0.6  # fraction of clipped pixels above which it is not assessable
    store_every_s: float = 30.0  # continuous mode: store a live result this often (0: never)
    top_k: int = 3

    def check(self) -> None:
        if self.smoothing < 1 or self.hold < 1:
            raise ConfigError("[pipeline].smoothing and hold must be at least 1")
        if not 0 <= self.max_clipped <= 1:
            raise ConfigError("[pipeline].max_clipped is a fraction between 0 and 1")


@dataclass
class StorageSection:
    data_dir: str = field(default="data", metadata=PATH)
    retention_days: int = 90
    min_free_mb: int = 500
    snapshot_quality: int = 90

    def check(self) -> None:
        if not 10 <= self.snapshot_quality <= 100:
            raise ConfigError("[storage].snapshot_quality must be between 10 and 100")


@dataclass
class WebSection:
    host: str = "127.0.0.1"
    port: int = 8080
    password: str = ""  # plain, or a werkzeug hash ("scrypt:..." / "pbkdf2:...")
    max_upload_mb: int = 16
    # Connections (edge/web/guard.py): at most this many at once (then the longest-waiting
    # idle one is closed for a new one), at most per_client_connections from one address, and
    # a request's line and headers must arrive within header_timeout_s of its first byte.
    connection_limit: int = 200
    per_client_connections: int = 32
    header_timeout_s: float = 10.0
    # Host names the page answers to besides the kit's own (localhost, fieldscope.local, the
    # host name, the kit id) and any IP address: others get 400 (DNS rebinding).
    allowed_hosts: list = field(default_factory=list)
    # Login sessions (kept on the kit) end after this long unused, and this long after login.
    session_idle_minutes: float = 720.0
    session_max_days: float = 7.0
    # Images with more pixels are refused before decoding (a decompression bomb guard).
    max_megapixels: float = 50.0
    # Memory for the full-size pixels of uploads decoded at once (a 49 MP float TIFF is 196 MB;
    # one larger than the budget runs alone);
    # an upload that finds no room within 10 s is answered 503 with Retry-After.
    decode_budget_mb: int = 192
    # Threads for pages and the API; live views get threads of their own (max_streams), so
    # viewers can never take the threads that logins, uploads and health checks need.
    threads: int = 8
    stream_fps: float = 5.0
    # Live views (MJPEG) at once; one more is answered 503 with Retry-After.
    max_streams: int = 24
    # Tokens for programs (Authorization: Bearer TOKEN): plain, or "sha256:<hex>" of the token.
    # Also from the environment variable FIELDSCOPE_API_TOKEN (comma-separated).
    api_tokens: list = field(default_factory=list)
    # Reverse proxies in front of the kit whose X-Forwarded-For is trusted (0: none; the
    # client address is the connection's). Needed for a per-client login rate limit behind one.
    trusted_proxies: int = 0

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"[web].port: {self.port} is not a TCP port")
        if not 2 <= self.threads <= 64:
            raise ConfigError("[web].threads must be between 2 and 64")
        for token in self.api_tokens:
            if not isinstance(token, str) or (
                not token.startswith("sha256:") and len(token.strip()) < 16
            ):
                raise ConfigError(
                    "[web].api_tokens: each token must be at least 16 characters (or sha256:<hex>)",
                    'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"',
                )
        if not 0 <= self.trusted_proxies <= 5:
            raise ConfigError("[web].trusted_proxies must be between 0 and 5")
        if not 0 <= self.max_streams <= 200:
            raise ConfigError("[web].max_streams must be between 0 (no live view) and 200")
        if self.connection_limit < self.threads + self.max_streams:
            raise ConfigError(
                f"[web].connection_limit ({self.connection_limit}) must be at least threads + "
                f"max_streams ({self.threads + self.max_streams})"
            )
        if not 1 <= self.per_client_connections <= self.connection_limit:
            raise ConfigError("[web].per_client_connections must be between 1 and connection_limit")
        if not 1 <= self.header_timeout_s <= 300:
            raise ConfigError("[web].header_timeout_s must be between 1 and 300 seconds")
        if not 1 <= self.session_idle_minutes <= 60 * 24 * 30:
            raise ConfigError("[web].session_idle_minutes must be between 1 and 43200")
        if not 0.01 <= self.session_max_days <= 365:
            raise ConfigError("[web].session_max_days must be between 0.01 and 365")
        if not 0.1 <= self.max_megapixels <= 500:
            raise ConfigError("[web].max_megapixels must be between 0.1 and 500")
        if self.decode_budget_mb < 16:
            raise ConfigError("[web].decode_budget_mb must be at least 16")
        if self.max_upload_mb < 1:
            raise ConfigError("[web].max_upload_mb must be at least 1")


@dataclass
class KitSection:
    id: str = ""  # this kit's name in messages and exports (default: the host name)


@dataclass
class OutboxSection:
    # Undelivered messages older than this, or past the count, are dropped (and counted).
    max_age_days: int = 30
    max_messages: int = 100000
    retry_max_s: float = 300.0  # the longest wait between two tries of a destination



def parse_source(spec: str) -> tuple[str, str]:
    """``picamera2``, ``v4l2:/dev/video0`` (or ``v4l2:0``), ``replay:DIR`` → (kind, path)."""
    kind, _, path = spec.partition(":")
    if kind not in ("picamera2", "v4l2", "replay"):
        raise ConfigError(f"--source {spec!r}: use picamera2, v4l2:/dev/videoN or replay:DIR")
    if kind == "replay" and not path:
        raise ConfigError("--source replay needs a folder or video: replay:DIR")
    return kind, path



GENERIC_HOSTNAMES = {"raspberrypi", "localhost", "fieldscope", "pi", "debian", "ubuntu"}


def default_kit_id(hostname: str | None = None, machine_id: Path = Path("/etc/machine-id")) -> str:
    """The host name, unless it is one every fresh Pi has ("raspberrypi"): then the host name
    and the start of /etc/machine-id, unique per installed system. Two kits left on the
    default name would otherwise share an MQTT client id and topics, and the broker would
    disconnect one whenever the other connects."""
    host = hostname or socket.gethostname()
    if host.split(".")[0].lower() not in GENERIC_HOSTNAMES:
        return host
    try:
        mid = machine_id.read_text().strip()
    except OSError:
        return host
    return f"{host}-{mid[:8]}" if re.fullmatch(r"[0-9a-f]{32}", mid) else host



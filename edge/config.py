"""Daemon configuration: one TOML file, validated with clear messages; CLI flags override it.

See ``docs/fieldscope.example.toml`` for every option with a comment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .configfile import PATH, ConfigError, build, check_table, read_toml
from .destinations import DESTINATIONS
from .destinations.dicom import DicomSection
from .destinations.mqtt import MqttSection
from .paths import default_bundle

__all__ = ["Config", "ConfigError", "DicomSection", "MqttSection", "check_table", "load_config",
           "read_toml"]


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
            from .errors import EdgeTpuError
            from .inference.backends.edgetpu import parse_device

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


PROFILE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
IMPLICIT_PROFILE = "default"


@dataclass
class Profile:
    """A named use of the kit: a bundle with the source and pipeline settings that go with it
    (for example "Blood smear — microscope", "Skin — dermatoscope"). The daemon switches between
    profiles without a restart (see docs/profiles.md)."""

    id: str
    name: str = ""  # shown on the page; empty: the bundle's own name
    bundle: str = ""
    labels: str = ""
    fallback_bundle: str = ""
    source: SourceSection = field(default_factory=SourceSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)


PROFILE_KEYS = {"name", "bundle", "labels", "fallback_bundle", "source", "pipeline"}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    source: SourceSection = field(default_factory=SourceSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    storage: StorageSection = field(default_factory=StorageSection)
    web: WebSection = field(default_factory=WebSection)
    kit: KitSection = field(default_factory=KitSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    dicom: DicomSection = field(default_factory=DicomSection)
    path: str = ""
    # [profiles.<id>] tables; empty: one implicit profile made of [model] and [source].
    profiles: dict[str, Profile] = field(default_factory=dict)
    default_profile: str = ""  # [profiles] default: the profile of a kit's very first start
    profile: str = ""  # the profile this configuration is resolved for (see for_profile)

    def all_profiles(self) -> dict[str, Profile]:
        """The configured profiles, or the implicit one a config without [profiles] has."""
        if self.profiles:
            return self.profiles
        m = self.model
        return {
            IMPLICIT_PROFILE: Profile(
                IMPLICIT_PROFILE, "", m.bundle, m.labels, m.fallback_bundle, self.source,
                self.pipeline,
            )
        }

    def first_profile(self) -> str:
        return self.default_profile or next(iter(self.all_profiles()))

    def for_profile(self, profile_id: str) -> Config:
        """This configuration with the profile's bundle, source and pipeline settings in
        [model], [source] and [pipeline]: what the running parts read."""
        profiles = self.all_profiles()
        if profile_id not in profiles:
            raise ConfigError(
                f"no profile {profile_id!r}", f"profiles: {', '.join(profiles) or 'none'}"
            )
        p = profiles[profile_id]
        model = replace(self.model, bundle=p.bundle, labels=p.labels,
                        fallback_bundle=p.fallback_bundle)
        return replace(self, model=model, source=p.source, pipeline=p.pipeline,
                       profile=profile_id)

    @property
    def bundle_path(self) -> Path:
        return Path(self.model.bundle) if self.model.bundle else default_bundle()

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    @property
    def kit_id(self) -> str:
        return self.kit.id or default_kit_id()

    @property
    def destinations(self) -> tuple[str, ...]:
        """Where results are delivered (each through the outbox): the destinations whose
        section turns them on (edge/destinations)."""
        return tuple(d.name for d in DESTINATIONS if d.enabled(getattr(self, d.name)))

    @property
    def network_bound(self) -> bool:
        try:
            return not ipaddress.ip_address(self.web.host).is_loopback
        except ValueError:
            return self.web.host != "localhost"


SECTIONS = {
    "model": ModelSection,
    "source": SourceSection,
    "pipeline": PipelineSection,
    "storage": StorageSection,
    "web": WebSection,
    "kit": KitSection,
    "outbox": OutboxSection,
    **{d.name: d.section for d in DESTINATIONS},  # each destination's own (edge/destinations)
}
# Chosen per profile (with [profiles], these belong in each profile, not in [model]/[source]).
PROFILE_OVERRIDES = ("model.bundle", "model.labels", "model.fallback_bundle")


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


def _path_keys() -> tuple[tuple[str, str], ...]:
    """(section, key) of every option marked as a path (``metadata=PATH``), in every section."""
    return tuple((name, f.name) for name, cls in SECTIONS.items() for f in fields(cls)
                 if f.metadata.get("path"))


PATH_KEYS = _path_keys()


def _absolute_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the path options in ``raw`` absolute against ``base`` (a replay source's path
    too; a V4L2 device path or index is left alone)."""
    keys = list(PATH_KEYS)
    source = raw.get("source")
    if isinstance(source, dict) and source.get("kind", "replay") == "replay":
        keys.append(("source", "path"))
    for section, key in keys:
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            p = Path(table[key]).expanduser()
            table[key] = os.path.normpath(p if p.is_absolute() else (base / p))


def _profiles(raw: Any, top: dict[str, Any], base: Path | None) -> tuple[dict[str, Profile], str]:
    """Parse ``[profiles]``: ``default = ID`` and one ``[profiles.ID]`` table per profile. A
    profile's [source] and [pipeline] options are laid over the top-level ones."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[profiles]: expected a table, got {type(raw).__name__}")
    default = raw.get("default", "")
    if not isinstance(default, str):
        raise ConfigError(f"[profiles].default: expected a profile id, got {default!r}")
    profiles: dict[str, Profile] = {}
    for pid, table in raw.items():
        if pid == "default":
            continue
        where = f"[profiles.{pid}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
        if not PROFILE_ID.match(pid):
            raise ConfigError(f"{where}: a profile id is 1–32 lower-case letters, digits, - or _")
        unknown = sorted(set(table) - PROFILE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}",
                              f"known options: {', '.join(sorted(PROFILE_KEYS))}")
        for key in ("name", "bundle", "labels", "fallback_bundle"):
            if not isinstance(table.get(key, ""), str):
                raise ConfigError(f"{where}.{key}: expected a string, got {table[key]!r}")
        if not table.get("bundle"):
            raise ConfigError(f"{where}.bundle: each profile names its model bundle")
        for key in ("source", "pipeline"):
            if not isinstance(table.get(key, {}), dict):
                raise ConfigError(f"{where}.{key}: expected a table, got "
                                  f"{type(table[key]).__name__}")
        # The profile's options over the shared ones, then its paths made absolute: a replay
        # folder is a path, a V4L2 index is not, whichever table says the kind.
        own = {
            "model": {k: table[k] for k in ("bundle", "labels", "fallback_bundle") if k in table},
            "source": {**top.get("source", {}), **table.get("source", {})},
        }
        if base is not None:
            _absolute_paths(own, base)
        pipeline = {**top.get("pipeline", {}), **table.get("pipeline", {})}
        profiles[pid] = Profile(
            id=pid,
            name=table.get("name", ""),
            bundle=own["model"]["bundle"],
            labels=own["model"].get("labels", ""),
            fallback_bundle=own["model"].get("fallback_bundle", ""),
            source=build(SourceSection, own["source"], f"{where}.source"),
            pipeline=build(PipelineSection, pipeline, f"{where}.pipeline"),
        )
    if not profiles:
        raise ConfigError("[profiles]: no profile defined", "add a [profiles.<id>] table")
    if default and default not in profiles:
        raise ConfigError(f"[profiles].default: no profile {default!r}",
                          f"profiles: {', '.join(profiles)}")
    return profiles, default


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    camera: bool = True,
) -> Config:
    """The configuration, checked. ``camera`` False: for a command that never opens the
    camera (an export), a missing camera source is not an error."""
    raw: dict[str, Any] = read_toml(path) if path else {}
    profiles_raw = raw.pop("profiles", None)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}",
            f"sections are {', '.join(SECTIONS)}",
        )
    # Paths written in a config file mean the file's folder; paths given on the command line
    # (overrides) mean the working directory. Both become absolute here, so nothing later
    # (Flask's send_file, a thread that changed directory) resolves them differently.
    # A profile's source is the shared [source] with its own options laid over: its path is
    # made absolute after that merge (is "0" a V4L2 index or a replay folder? the merged kind
    # says), so the profiles get the shared table as written.
    shared_source = dict(raw.get("source", {})) if isinstance(raw.get("source"), dict) else {}
    if path:
        _absolute_paths(raw, Path(path).resolve().parent)
    given: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if profiles_raw is not None and (dotted in PROFILE_OVERRIDES
                                         or dotted.startswith("source.")):
            raise ConfigError(
                f"{path} defines [profiles]: the model and source are chosen per profile",
                "pick one with --profile ID instead of --model/--source",
            )
        section, key = dotted.split(".", 1)
        given.setdefault(section, {})[key] = value
    _absolute_paths(given, Path.cwd())
    for section, values in given.items():
        raw.setdefault(section, {}).update(values)
    cfg = Config(
        **{
            name: build(cls, dict(raw.get(name, {})), f"{path} [{name}]" if path else f"[{name}]")
            for name, cls in SECTIONS.items()
        },
        path=str(path or ""),
    )
    if profiles_raw is not None:
        if cfg.model.bundle or cfg.model.labels or cfg.model.fallback_bundle:
            raise ConfigError(
                "[model] bundle, labels and fallback_bundle belong in each [profiles.<id>] "
                "table when the config has profiles"
            )
        top = {"source": shared_source, "pipeline": dict(raw.get("pipeline", {}))}
        cfg.profiles, cfg.default_profile = _profiles(
            profiles_raw, top, Path(path).resolve().parent if path else None
        )
    password_from_env(cfg)
    for pid in cfg.all_profiles():
        try:
            validate(cfg.for_profile(pid), camera=camera)
        except ConfigError as exc:
            if not cfg.profiles:
                raise
            raise ConfigError(f"profile {pid!r}: {exc.message}", exc.hint) from exc
    return cfg


def validate(cfg: Config, camera: bool = True) -> None:
    """Each section's own checks, then what spans sections."""
    cfg.model.check()
    cfg.source.check(camera)
    cfg.pipeline.check()
    cfg.web.check()
    cfg.storage.check()
    w = cfg.web
    if cfg.network_bound and not w.password:
        raise ConfigError(
            f"[web].host is {w.host}: serving to the network needs a password",
            "set [web].password (or FIELDSCOPE_PASSWORD), or keep host = 127.0.0.1",
        )
    validate_delivery(cfg)


def validate_delivery(cfg: Config) -> None:
    """[kit], [outbox], and each destination's own section (its checks live with it)."""
    o = cfg.outbox
    if cfg.kit.id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", cfg.kit.id):
        raise ConfigError("[kit].id: 1–64 letters, digits, '.', '_' or '-'")
    if o.max_age_days < 1 or o.max_messages < 100 or o.retry_max_s < 1:
        raise ConfigError("[outbox]: max_age_days ≥ 1, max_messages ≥ 100, retry_max_s ≥ 1")
    for d in DESTINATIONS:
        d.check_section(getattr(cfg, d.name))


def password_from_env(cfg: Config) -> None:
    env = os.environ.get("FIELDSCOPE_PASSWORD")
    if env and not cfg.web.password:
        cfg.web.password = env
    tokens = os.environ.get("FIELDSCOPE_API_TOKEN", "")
    cfg.web.api_tokens = list(cfg.web.api_tokens) + [t for t in tokens.split(",") if t.strip()]

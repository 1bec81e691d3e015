"""The whole configuration: every section, the profiles, and the checks that span sections.

Which sections there are is said once, in ``SECTIONS``: the daemon's own (``sections``) and one
per destination, found in ``edge/destinations`` (a new destination adds no field here).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..configfile import ConfigError
from ..destinations import DESTINATIONS
from ..paths import default_bundle
from .sections import (
    KitSection,
    ModelSection,
    OutboxSection,
    PipelineSection,
    SourceSection,
    StorageSection,
    WebSection,
    default_kit_id,
)

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
    # Each destination's section ([mqtt], [dicom], ...), by name: see ``section``.
    destination: dict[str, Any] = field(default_factory=lambda: {
        d.name: d.section() for d in DESTINATIONS})
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
        return tuple(d.name for d in DESTINATIONS if d.enabled(self.section(d.name)))

    def section(self, name: str) -> Any:
        """The section read from ``[name]``: the daemon's own or a destination's."""
        if name in OWN_SECTIONS:
            return getattr(self, name)
        if name in self.destination:
            return self.destination[name]
        raise KeyError(f"no section [{name}] (sections: {', '.join(SECTIONS)})")

    @property
    def network_bound(self) -> bool:
        try:
            return not ipaddress.ip_address(self.web.host).is_loopback
        except ValueError:
            return self.web.host != "localhost"


OWN_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "source": SourceSection,
    "pipeline": PipelineSection,
    "storage": StorageSection,
    "web": WebSection,
    "kit": KitSection,
    "outbox": OutboxSection,
}
# Every table a config file may have: the daemon's own, then each destination's.
SECTIONS: dict[str, type] = {**OWN_SECTIONS, **{d.name: d.section for d in DESTINATIONS}}
# Chosen per profile (with [profiles], these belong in each profile, not in [model]/[source]).
PROFILE_OVERRIDES = ("model.bundle", "model.labels", "model.fallback_bundle")


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
        d.check_section(cfg.section(d.name))


